"""The SAE trainer: consumes an iterator of activation batches, one SAE per site.

It knows nothing about models: ``Trainer.fit`` takes ``{site: SiteBatch}`` dicts (random data in tests,
harvested activations in ``run.py``) and trains every site's SAE on its own batch each step.

Objective per site (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
``||x - x_hat||^2 / ||x - mean(x)||^2`` (normalised MSE, so the loss reads as FVU) plus
``auxk_alpha`` times the AuxK loss: the top ``auxk_k`` *dead* latents reconstruct the residual
``x - x_hat`` (section A.2). Decoder rows stay unit-norm; the gradient component parallel to each row is
removed before the Adam step.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from sae_lens_attn.activations import NonFiniteActivationError, SiteBatch
from sae_lens_attn.kernels import sparse_decode
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site


@dataclass
class OptimConfig:
    """What the trainer needs to know; ``TrainConfig`` fills it for the CLI."""

    lr: float = 2e-3
    """Adam learning rate after warm-up."""
    steps: int = 1000
    """Total optimizer steps."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    decay_fraction: float = 0.2
    """Final share of steps over which the rate decays linearly to 0."""
    auxk_alpha: float = 1 / 32
    """AuxK loss weight."""
    auxk_k: int | None = None
    """Dead latents per token in AuxK (default d_in // 2)."""
    dead_tokens: int = 250_000
    """Tokens without firing after which a latent counts as dead."""
    log_every: int = 10
    """Steps between log records."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: none)."""


class StepStats(NamedTuple):
    loss: float
    fvu: float
    auxk: float
    l0: float
    dead_fraction: float


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last ``decay_fraction`` of training."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
    if step >= decay_start and cfg.steps > decay_start:
        return max(0.0, (cfg.steps - step) / (cfg.steps - decay_start))
    return 1.0


class SiteState:
    """One site's SAE with its optimizer and dead-latent counter."""

    def __init__(self, sae: SAE, cfg: OptimConfig):
        self.sae = sae
        self.cfg = cfg
        self.opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=6.25e-10)
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.W_dec.device)
        self.fire_counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
        self.tokens_seen = 0
        self.initialised = False
        self.auxk_k = cfg.auxk_k or max(1, sae.cfg.d_in // 2)

    @torch.no_grad()
    def initialise(self, x: torch.Tensor) -> None:
        """b_dec <- geometric median of the first batch (Gao et al. 2024, section 2.4; Weiszfeld iterations)."""
        x = x.to(self.sae.b_dec.dtype)
        median = x.mean(0)
        for _ in range(32):
            w = 1.0 / (x - median).norm(dim=1).clamp_min(1e-8)
            new = (w[:, None] * x).sum(0) / w.sum()
            if (new - median).norm() < 1e-6 * median.norm().clamp_min(1e-8):
                median = new
                break
            median = new
        self.sae.b_dec.copy_(median)
        self.initialised = True

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def step(self, batch: SiteBatch, step: int) -> StepStats:
        sae = self.sae
        x = batch.acts.to(sae.W_enc.device, sae.W_enc.dtype)
        if not torch.isfinite(x).all():
            raise NonFiniteActivationError("NaN/inf in a training batch; the model produced non-finite activations")
        if not self.initialised:
            self.initialise(x)
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(step, self.cfg)
        out = sae(x, batch.grads)
        err = x - out.x_hat
        total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = err.pow(2).sum() / total_var
        loss = fvu
        dead = self.dead_mask()
        auxk = torch.zeros((), device=x.device)
        n_dead = int(dead.sum())
        if n_dead and self.cfg.auxk_alpha > 0:
            k_aux = min(self.auxk_k, n_dead)
            masked = out.code.pre.detach().masked_fill(~dead, float("-inf"))
            idx = masked.topk(k_aux, dim=-1, sorted=False).indices
            e_hat = sparse_decode(sae.pre_at(x, idx, out.code.pre).relu(), idx, sae.W_dec)
            e = err.detach()
            auxk = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
            loss = loss + self.cfg.auxk_alpha * auxk
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad()
        self.opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
            active = out.code.values > 0
            fired[out.code.indices[active]] = True
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0
            self.fire_counts += torch.bincount(
                out.code.indices[active].flatten().cpu(), minlength=sae.cfg.d_sae
            ).double()
            self.tokens_seen += x.shape[0]
            l0 = float(active.sum()) / x.shape[0]
        return StepStats(loss.item(), fvu.item(), auxk.item(), l0, n_dead / sae.cfg.d_sae)

    def log_sparsity(self) -> torch.Tensor:
        freq = self.fire_counts / max(1, self.tokens_seen)
        return torch.log10(freq + 1e-10).float()

    def state_dict(self) -> dict:
        return {
            "opt": self.opt.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "fire_counts": self.fire_counts,
            "tokens_seen": self.tokens_seen,
            "initialised": self.initialised,
        }

    def load_state_dict(self, d: Mapping) -> None:
        self.opt.load_state_dict(d["opt"])
        self.tokens_since_fired = d["tokens_since_fired"].to(self.tokens_since_fired.device)
        self.fire_counts = d["fire_counts"]
        self.tokens_seen = int(d["tokens_seen"])
        self.initialised = bool(d["initialised"])


class Trainer:
    """Trains one SAE per site from a shared stream of batches."""

    def __init__(self, saes: Mapping[Site, SAE], cfg: OptimConfig, out_dir: str | os.PathLike | None = None):
        if not saes:
            raise ValueError("Trainer needs at least one SAE")
        self.cfg = cfg
        self.states = {site: SiteState(sae, cfg) for site, sae in saes.items()}
        self.step_idx = 0
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._log = None

    @property
    def saes(self) -> dict[Site, SAE]:
        return {s: st.sae for s, st in self.states.items()}

    def fit(self, batches: Iterator[Mapping[Site, SiteBatch]], progress=None) -> dict[Site, StepStats]:
        """Run until ``cfg.steps`` steps are done or ``batches`` ends; returns the last step's stats."""
        last: dict[Site, StepStats] = {}
        t0 = time.perf_counter()
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._log = (self.out_dir / "log.jsonl").open("a")
        try:
            while self.step_idx < self.cfg.steps:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                missing = [s.label for s in self.states if s not in batch]
                if missing:
                    raise KeyError(f"batch lacks sites {missing}")
                try:
                    last = {site: st.step(batch[site], self.step_idx) for site, st in self.states.items()}
                except (NonFiniteActivationError, FloatingPointError) as err:
                    kept = self._last_checkpoint()
                    where = f"; the last good checkpoint is {kept}" if kept else ""
                    raise type(err)(f"{err}{where}") from err
                self.step_idx += 1
                if progress is not None:
                    progress(self.step_idx, last)
                if self.step_idx % self.cfg.log_every == 0 or self.step_idx == self.cfg.steps:
                    self._write_log(last, time.perf_counter() - t0)
                if self.cfg.checkpoint_every and self.step_idx % self.cfg.checkpoint_every == 0:
                    self.checkpoint()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return last

    def _write_log(self, stats: Mapping[Site, StepStats], elapsed: float) -> None:
        if self._log is None:
            return
        for site, st in stats.items():
            rec = {"step": self.step_idx, "site": site.label, "elapsed_s": round(elapsed, 3), **st._asdict()}
            self._log.write(json.dumps(rec) + "\n")
        self._log.flush()

    # --- checkpoints ----------------------------------------------------------------------------------
    def checkpoint(self, extra: dict | None = None) -> Path | None:
        """Write ``checkpoints/step_N`` atomically: built under a temporary name, then renamed."""
        if self.out_dir is None:
            return None
        root = self.out_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{self.step_idx:08d}"
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp_"))
        try:
            for site, st in self.states.items():
                st.sae.save(tmp / site.label, st.log_sparsity())
            state = {
                "step": self.step_idx,
                "sites": {s.label: st.state_dict() for s, st in self.states.items()},
                "torch_rng": torch.get_rng_state(),
                "extra": extra or {},
            }
            torch.save(state, tmp / "trainer_state.pt")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _last_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out_dir) if self.out_dir is not None else None

    def restore(self, ckpt: str | os.PathLike) -> dict:
        """Load SAE weights and trainer state from a checkpoint directory; returns its ``extra``."""
        ckpt = Path(ckpt)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        for site, st in self.states.items():
            loaded = SAE.load(ckpt / site.label, device=st.sae.W_dec.device)
            with torch.no_grad():
                for name, p in st.sae.named_parameters():
                    p.copy_(getattr(loaded, name))
            st.load_state_dict(state["sites"][site.label])
        self.step_idx = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        return state.get("extra", {})


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    root = Path(out_dir) / "checkpoints"
    if not root.exists():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / "trainer_state.pt").exists())
    return done[-1] if done else None

