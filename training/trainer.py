"""The SAE trainer: consumes an iterator of activation batches, one SAE per site.

It knows nothing about models: ``Trainer.fit`` takes ``{site: SiteBatch}`` dicts (random data in tests,
harvested activations in ``run.py``) and trains every site's SAE on its own batch each step.

Objective per site (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
``||x - x_hat||^2 / ||x - mean(x)||^2`` (normalised MSE, so the loss reads as FVU) plus
``auxk_alpha`` times the AuxK loss: the top ``auxk_k`` *dead* latents reconstruct the residual
``x - x_hat`` (section A.2). Decoder rows stay unit-norm; the gradient component parallel to each row is
removed before the Adam step.

Several processes (``training/distributed.py``): in data-parallel mode each rank sees its share of the
global batch. The normalisers (the batch mean and variance of ``x`` and of the AuxK residual) are sums
over the *global* batch, all-reduced before the loss is formed; each rank's loss is its own share of the
numerator over that global denominator, so the per-rank gradients sum to the single-process gradient of
the global batch, and summing them (not averaging) reproduces the single-process step. Firing counts are
summed the same way, so every rank sees the same dead latents. Statistics are accumulated in float64 so a
split batch rounds like the whole one.

Checkpoints (``checkpoints/step_N``) hold the SAEs in SAELens' layout, ``trainer_state.pt`` (optimizer,
step, dead-latent counters, RNG states and data position of every rank) and ``manifest.json`` (size and
sha256 of every file, written last). A checkpoint is built under a temporary name and renamed, so a
``step_N`` directory is always complete; :meth:`Trainer.restore` verifies it against its manifest.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sae_lens_attn import __version__
from sae_lens_attn.activations import NonFiniteActivationError, SiteBatch
from sae_lens_attn.files import atomic_write, fsync_dir
from sae_lens_attn.interop import check_version
from sae_lens_attn.kernels import keep_freed_host_memory, sparse_decode, topk_indices
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site

from .distributed import Dist

CHECKPOINT_FORMAT = "sae_lens_attn.checkpoint"
#: Bumped when trainer_state.pt changes shape; a newer checkpoint is refused with a clear message.
CHECKPOINT_VERSION = 1
STATE_FILENAME = "trainer_state.pt"
MANIFEST_FILENAME = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. ENOSPC); the earlier checkpoints are untouched."""


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


class LayoutAwareAdam(torch.optim.Adam):
    """torch's fused Adam (one kernel per tensor for the whole update: about 2x faster than the default
    foreach path on a CPU, where Adam over the two [d_sae, d_in] matrices is a large share of a step), fed
    contiguous aliases of transposed parameters.

    ``SAE.W_enc`` is a transposed view of a contiguous [d_sae, d_in] buffer; the fused kernel would copy such
    a parameter (and its gradient and moments) to contiguous memory and back every step. Its transpose is
    contiguous and shares storage, and Adam is elementwise, so updating the transposes updates the
    parameter in place with the same arithmetic. State and checkpoints are torch.optim.Adam's own.
    """

    def __init__(self, params, **kw):
        kw.setdefault("fused", True)
        super().__init__(params, **kw)

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        out = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        for i, p in enumerate(params):
            quad = (p, grads[i], exp_avgs[i], exp_avg_sqs[i])
            if p.dim() == 2 and not p.is_contiguous() and all(t.T.is_contiguous() for t in quad):
                params[i], grads[i], exp_avgs[i], exp_avg_sqs[i] = (t.T for t in quad)
        return out


class SiteState:
    """One site's SAE with its optimizer and dead-latent counter.

    ``dist``: the data-parallel group whose batches together form the global batch (``Dist()``: this
    process's batch is the whole batch).
    """

    def __init__(self, sae: SAE, cfg: OptimConfig, dist: Dist | None = None):
        self.sae = sae
        self.cfg = cfg
        self.dist = dist or Dist()
        # step() reads SparseCode.pre only before the next encode, so the SAE may write it into one reused
        # buffer (SAE.reuse_pre_buffer: no fresh [batch, d_sae] allocation per step).
        sae.reuse_pre_buffer = True
        keep_freed_host_memory()  # no fresh pages for the step's large blocks every step (glibc)
        self.opt = LayoutAwareAdam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=6.25e-10)
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.W_dec.device)
        self.fire_counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
        self.tokens_seen = 0
        self.initialised = False
        self.auxk_k = cfg.auxk_k or max(1, sae.cfg.d_in // 2)

    @torch.no_grad()
    def initialise(self, x: torch.Tensor, mean: torch.Tensor) -> None:
        """b_dec <- geometric median of the first (global) batch (Gao et al. 2024, section 2.4; Weiszfeld
        iterations, started from the mean). Sums are all-reduced, so every rank gets the same median."""
        x = x.double()
        median = mean.double()
        for _ in range(32):
            w = 1.0 / (x - median).norm(dim=1).clamp_min(1e-8)
            acc = torch.cat([(w[:, None] * x).sum(0), w.sum().reshape(1)])
            self.dist.all_reduce(acc)
            new = acc[:-1] / acc[-1]
            done = bool((new - median).norm() < 1e-6 * median.norm().clamp_min(1e-8))
            median = new
            if done:
                break
        self.sae.b_dec.copy_(median.to(self.sae.b_dec.dtype))
        self.initialised = True

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def step(self, batch: SiteBatch, step: int) -> StepStats:
        sae, dist = self.sae, self.dist
        x = batch.acts.to(sae.W_enc.device, sae.W_enc.dtype)
        f64 = torch.float64
        # (1) global batch size and sum of x: one reduction. A NaN or inf anywhere makes its column's sum
        # non-finite on every rank (f64 sums of fp32 values cannot overflow), so the [batch, d_in] finiteness
        # mask is only built to count the bad values once there are some.
        count = torch.tensor([x.shape[0]], dtype=f64, device=x.device)
        s1 = dist.all_reduce(torch.cat([x.sum(0, dtype=f64), count]))
        n_f, any_bad = torch.stack([s1[-1], (~torch.isfinite(s1[:-1])).any().to(f64)]).tolist()
        n = int(n_f)
        if any_bad:
            bad = int(dist.all_reduce((~torch.isfinite(x)).sum().to(f64).reshape(1)).item())
            where = "" if dist.world_size == 1 else f" (summed over {dist.world_size} ranks)"
            if not bad:
                raise NonFiniteActivationError(
                    f"training batch at step {step}: no NaN/inf, but its column sums overflow float64{where}; "
                    "the activations are near their dtype's limit: rescale them before training"
                )
            raise NonFiniteActivationError(
                f"NaN/inf in a training batch at step {step}: {bad} non-finite value(s){where}; the model "
                "produced non-finite activations (try --dtype float32) or the activation data is corrupted"
            )
        mean = s1[:-1] / n
        if not self.initialised:
            self.initialise(x, mean)
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(step, self.cfg)
        code = sae.encode_sparse(x, batch.grads)
        err = x - sae.decode_sparse(code.values, code.indices)
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        use_aux = bool(n_dead) and self.cfg.auxk_alpha > 0
        e = err.detach()
        # (2) total variance of x and (for AuxK) the sum of the residual. Squares summed in x's dtype by
        # torch's cascade sum (relative error ~1e-9 at 3M fp32 values; linalg.vector_norm's is ~1e-4), in one
        # reused temporary instead of f64 copies.
        var_x = (x - mean.to(x.dtype)).square_().sum().to(f64).reshape(1)
        s2 = dist.all_reduce(torch.cat([var_x, e.sum(0, dtype=f64)]) if use_aux else var_x)
        total_var = s2[0].clamp_min(1e-12).to(x.dtype)
        sq_err = err.pow(2).sum()
        fvu = sq_err / total_var
        loss = fvu
        auxk = torch.zeros((), device=x.device, dtype=x.dtype)
        aux_var = torch.zeros(1, dtype=f64, device=x.device)
        aux_num = torch.zeros((), device=x.device, dtype=x.dtype)
        if use_aux:
            e_hat = self._auxk_reconstruction(x, code.pre, dead, n_dead)
            aux_var = (e.to(f64) - s2[1:] / n).pow(2).sum().reshape(1)
            aux_num = (e - e_hat).pow(2).sum()
        # (3) the residual's variance, and whether any rank's loss is non-finite (all ranks stop together).
        local_bad = (~torch.isfinite(sq_err.detach()) | ~torch.isfinite(aux_num.detach())).to(f64).reshape(1)
        s3 = dist.all_reduce(torch.cat([aux_var, local_bad]))
        if use_aux:
            auxk = aux_num / s3[0].clamp_min(1e-12).to(x.dtype)
            loss = loss + self.cfg.auxk_alpha * auxk
        if s3[1].item() > 0:
            raise FloatingPointError(f"the loss became non-finite at step {step}; lower the learning rate")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._reduce_grads()
        sae.remove_parallel_decoder_grad()
        self.opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            # (4) firing counts (they decide which latents are dead, so every rank must agree) and stats.
            active = code.values > 0
            counts = torch.bincount(code.indices[active], minlength=sae.cfg.d_sae).to(f64)
            tail = torch.stack([active.sum().to(f64), fvu.detach().to(f64), auxk.detach().to(f64)])
            s4 = dist.all_reduce(torch.cat([counts, tail]))
            counts = s4[: sae.cfg.d_sae]
            self.tokens_since_fired += n
            self.tokens_since_fired[counts > 0] = 0
            self.fire_counts += counts.cpu()
            self.tokens_seen += n
            n_active, fvu_g, auxk_g = s4[sae.cfg.d_sae :].tolist()
        loss_g = fvu_g + (self.cfg.auxk_alpha * auxk_g if use_aux else 0.0)
        return StepStats(loss_g, fvu_g, auxk_g, n_active / n, n_dead / sae.cfg.d_sae)

    def _auxk_reconstruction(self, x: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, n_dead: int) -> torch.Tensor:
        """The AuxK reconstruction of the residual: each row's ``auxk_k`` dead latents with the largest
        pre-activations, ReLU'd and decoded (differentiable).

        Only the dead columns of ``pre`` are searched (a [batch, n_dead] gather instead of masking the whole
        [batch, d_sae] matrix). While few latents are dead, their pre-activations and the decoding are dense
        GEMMs over the dead columns alone (six [batch, d_in] x [d_in, n_dead]-sized products with backward,
        cheap next to gathering batch * auxk_k rows); with many dead latents, the sparse gather path.
        """
        sae = self.sae
        k_aux = min(self.auxk_k, n_dead)
        dead_idx = dead.nonzero().squeeze(1)
        pos = topk_indices(pre.detach().index_select(1, dead_idx), k_aux)  # [batch, k_aux] among the dead
        if n_dead <= 16 * k_aux:
            # rows of W_enc.T (its contiguous storage), so the gradient keeps W_enc's column-major layout
            enc_rows = sae.W_enc.T.index_select(0, dead_idx)  # [n_dead, d_in]
            pre_dead = sae.center(x) @ enc_rows.T + sae.b_enc.index_select(0, dead_idx)
            code = torch.zeros_like(pre_dead).scatter(1, pos, pre_dead.gather(1, pos).relu())
            return code @ sae.W_dec.index_select(0, dead_idx)
        idx = dead_idx[pos]
        return sparse_decode(sae.pre_at(x, idx, pre).relu(), idx, sae.W_dec)

    def _reduce_grads(self) -> None:
        """Sum the gradients over the data-parallel ranks (one flat buffer, one collective)."""
        if self.dist.world_size == 1:
            return
        params = [p for p in self.sae.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.dist.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p, g in zip(params, grads):
            summed = flat[offset : offset + g.numel()].reshape(g.shape)
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)  # copy_ keeps the grad's own layout (W_enc's is transposed)
            offset += g.numel()

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
        self.fire_counts = d["fire_counts"].to(torch.float64)
        self.tokens_seen = int(d["tokens_seen"])
        self.initialised = bool(d["initialised"])


def _rng_state() -> dict:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    """Trains one SAE per site from a shared stream of batches.

    ``dist``: the process group (``Dist()`` for one process). In ``dp`` mode every rank passes the same
    SAEs and its own share of each batch; in ``sites`` mode each rank passes only its own sites' SAEs.
    ``loggers``: callables receiving each JSONL log record (e.g. Weights & Biases), on rank 0 only.
    """

    def __init__(
        self,
        saes: Mapping[Site, SAE],
        cfg: OptimConfig,
        out_dir: str | os.PathLike | None = None,
        dist: Dist | None = None,
        loggers: Sequence[Callable[[dict], None]] = (),
    ):
        if not saes:
            raise ValueError("Trainer needs at least one SAE")
        self.cfg = cfg
        self.dist = dist or Dist()
        group = self.dist if self.dist.data_parallel else Dist()
        self.states = {site: SiteState(sae, cfg, group) for site, sae in saes.items()}
        self.step_idx = 0
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.loggers = list(loggers)
        self._log = None
        self.batches_consumed = 0
        """Batches taken from the iterator so far (restored from a checkpoint): the data position."""
        self.extra: dict = {}
        """Stored in every checkpoint (``run.py`` records how its batches are made)."""

    @property
    def saes(self) -> dict[Site, SAE]:
        return {s: st.sae for s, st in self.states.items()}

    @property
    def _writes(self) -> bool:
        return self.out_dir is not None and self.dist.is_main

    def fit(self, batches: Iterator[Mapping[Site, SiteBatch]], progress=None) -> dict[Site, StepStats]:
        """Run until ``cfg.steps`` steps are done or ``batches`` ends; returns the last step's stats.

        After :meth:`restore`, ``batches`` must start at the checkpoint's data position
        (``batches_consumed``), which is what ``run.py`` arranges.
        """
        last: dict[Site, StepStats] = {}
        t0 = time.perf_counter()
        if self._writes:
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
                    where = f"; the last good checkpoint is {kept} (resume from it with --resume)" if kept else ""
                    raise type(err)(f"{err}{where}") from err
                self.step_idx += 1
                self.batches_consumed += 1
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
        if self.dist.mode == "sites" and self.dist.world_size > 1:
            parts = self.dist.gather_object({s.label: st._asdict() for s, st in stats.items()})
            merged = {k: v for part in parts or [] for k, v in part.items()}
        else:
            merged = {s.label: st._asdict() for s, st in stats.items()}
        if not self.dist.is_main:
            return
        for label in sorted(merged, key=lambda lab: Site.parse(lab)):
            rec = {"step": self.step_idx, "site": label, "elapsed_s": round(elapsed, 3), **merged[label]}
            if self._log is not None:
                self._log.write(json.dumps(rec) + "\n")
            for logger in self.loggers:
                logger(rec)
        if self._log is not None:
            self._log.flush()

    # --- checkpoints ----------------------------------------------------------------------------------
    def _site_payloads(self) -> dict[str, dict]:
        """Everything a checkpoint holds for this rank's sites, as CPU objects."""
        out = {}
        for site, st in self.states.items():
            out[site.label] = {
                "cfg": dataclasses.replace(st.sae.cfg, device="cpu"),
                "params": {n: p.detach().cpu().clone() for n, p in st.sae.named_parameters()},
                "log_sparsity": st.log_sparsity(),
                "state": st.state_dict(),
            }
        return out

    def gather_saes(self) -> dict[Site, SAE]:
        """Every site's SAE on rank 0 (collective in ``sites`` mode); other ranks get their own SAEs."""
        if not (self.dist.mode == "sites" and self.dist.world_size > 1):
            return self.saes
        parts = self.dist.gather_object(
            {s.label: (dataclasses.replace(st.sae.cfg, device="cpu"), st.sae.state_dict()) for s, st in self.states.items()}
        )
        if not self.dist.is_main:
            return self.saes
        device = next(iter(self.states.values())).sae.W_dec.device
        out: dict[Site, SAE] = {}
        for part in parts or []:
            for label, (cfg, sd) in part.items():
                sae = SAE(dataclasses.replace(cfg, device=str(device)), init=False)
                sae.load_state_dict(sd)
                out[Site.parse(label)] = sae
        return dict(sorted(out.items()))

    def gather_log_sparsity(self) -> dict[Site, torch.Tensor]:
        """Every site's log10 firing frequency on rank 0 (collective in ``sites`` mode)."""
        local = {s.label: st.log_sparsity() for s, st in self.states.items()}
        if not (self.dist.mode == "sites" and self.dist.world_size > 1):
            return {Site.parse(k): v for k, v in local.items()}
        parts = self.dist.gather_object(local) or []
        return {Site.parse(k): v for part in parts for k, v in part.items()}

    def checkpoint(self, extra: dict | None = None) -> Path | None:
        """Write ``checkpoints/step_N`` atomically (a collective: every rank calls it; rank 0 writes).

        Raises :class:`CheckpointWriteError` on every rank when rank 0 cannot write (e.g. a full disk); the
        partial directory is removed and the earlier checkpoints are untouched.
        """
        if self.out_dir is None:
            return None
        rank_info = {"rank": self.dist.rank, "rng": _rng_state(), "batches_consumed": self.batches_consumed,
                     "extra": {**self.extra, **(extra or {})}}
        multi = self.dist.world_size > 1
        sites_mode = self.dist.mode == "sites" and multi
        payload_parts = self.dist.gather_object(self._site_payloads()) if sites_mode else None
        ranks = self.dist.gather_object(rank_info) if multi else [rank_info]
        final, error = None, None
        if self.dist.is_main:
            payloads = (
                {k: v for part in payload_parts or [] for k, v in part.items()} if sites_mode else self._site_payloads()
            )
            try:
                final = self._write_checkpoint(payloads, ranks or [rank_info])
            except OSError as err:
                error = err
        ok = self.dist.all_agree(error is None)
        if error is not None:
            raise error
        if not ok:
            raise CheckpointWriteError(f"rank 0 could not write the checkpoint at step {self.step_idx}; see its error")
        return final

    def _write_checkpoint(self, payloads: dict[str, dict], ranks: list[dict]) -> Path:
        root = self.out_dir / "checkpoints"
        final = root / f"step_{self.step_idx:08d}"
        tmp: Path | None = None
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp_"))
            for label, p in payloads.items():
                sae = SAE(p["cfg"], init=False)
                with torch.no_grad():
                    for name, t in p["params"].items():
                        getattr(sae, name).copy_(t)
                sae.save(tmp / label, p["log_sparsity"])
            state = {
                "format": CHECKPOINT_FORMAT,
                "format_version": CHECKPOINT_VERSION,
                "sae_lens_attn_version": __version__,
                "step": self.step_idx,
                "sites": {label: p["state"] for label, p in payloads.items()},
                "world_size": self.dist.world_size,
                "mode": self.dist.mode,
                "ranks": ranks,
                # Kept for checkpoints read by older code: rank 0's RNG and extra.
                "torch_rng": ranks[0]["rng"]["torch"],
                "extra": ranks[0]["extra"],
            }
            atomic_write(tmp / STATE_FILENAME, lambda f: torch.save(state, f))
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {
                "format": CHECKPOINT_FORMAT,
                "format_version": CHECKPOINT_VERSION,
                "sae_lens_attn_version": __version__,
                "step": self.step_idx,
                "sites": sorted(payloads),
                "files": {
                    str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files
                },
            }
            atomic_write(tmp / MANIFEST_FILENAME, lambda f: Path(f).write_text(json.dumps(manifest, indent=2)))
            if final.exists():  # a re-run of the same step after a resume: replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            tmp = None
            fsync_dir(root)
        except OSError as err:
            last = latest_checkpoint(self.out_dir)
            kept = f"the last complete checkpoint {last} is intact" if last else "no earlier checkpoint exists"
            hint = "free some space, then " if err.errno == errno.ENOSPC else ""
            raise CheckpointWriteError(
                err.errno, f"could not write checkpoint {final}: {err.strerror or err}; {kept}; {hint}rerun with "
                "--resume to continue"
            ) from err
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _last_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out_dir) if self.out_dir is not None else None

    def restore(self, ckpt: str | os.PathLike) -> dict:
        """Load this rank's SAE weights and trainer state from a checkpoint directory; returns its ``extra``.

        The checkpoint is verified first (manifest sizes and sha256, format version); any problem raises
        :class:`CheckpointError` naming the file. Sets ``step_idx`` and ``batches_consumed``.
        """
        ckpt = Path(ckpt)
        verify_checkpoint(ckpt)
        state = load_trainer_state(ckpt)
        missing = [s.label for s in self.states if s.label not in state["sites"]]
        if missing:
            raise CheckpointError(
                f"{ckpt / STATE_FILENAME} has no state for site(s) {missing} (it holds {sorted(state['sites'])}); "
                "resume with the same --layers/--site/--head, or start in a new --out-dir"
            )
        for site, st in self.states.items():
            check_version(ckpt / site.label)
            loaded = SAE.load(ckpt / site.label, device=st.sae.W_dec.device)
            if (loaded.cfg.d_in, loaded.cfg.d_sae, loaded.cfg.k) != (st.sae.cfg.d_in, st.sae.cfg.d_sae, st.sae.cfg.k):
                raise CheckpointError(
                    f"{ckpt / site.label}: the checkpoint's SAE has d_in={loaded.cfg.d_in}, d_sae={loaded.cfg.d_sae}, "
                    f"k={loaded.cfg.k}, but this run builds d_in={st.sae.cfg.d_in}, d_sae={st.sae.cfg.d_sae}, "
                    f"k={st.sae.cfg.k}; resume with the original settings"
                )
            with torch.no_grad():
                for name, p in st.sae.named_parameters():
                    p.copy_(getattr(loaded, name))
            st.load_state_dict(state["sites"][site.label])
        self.step_idx = int(state["step"])
        ranks = state.get("ranks") or [{"rng": {"torch": state["torch_rng"]}, "batches_consumed": self.step_idx,
                                        "extra": state.get("extra", {})}]
        mine = ranks[self.dist.rank] if len(ranks) == self.dist.world_size else ranks[0]
        self.batches_consumed = int(mine.get("batches_consumed", self.step_idx))
        _set_rng_state(mine.get("rng", {}))
        return dict(mine.get("extra") or {}, world_size=int(state.get("world_size", 1)),
                    mode=str(state.get("mode", "none")))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(ckpt: str | os.PathLike) -> None:
    """Check a checkpoint against its manifest (every file present, same size and sha256) and its format
    version; :class:`CheckpointError` naming the file otherwise. Checkpoints without a manifest (written
    before it existed) are only checked for ``trainer_state.pt``."""
    ckpt = Path(ckpt)
    mpath = ckpt / MANIFEST_FILENAME
    if not mpath.exists():
        if not (ckpt / STATE_FILENAME).exists():
            raise CheckpointError(f"{ckpt} is not a checkpoint: it has neither {MANIFEST_FILENAME} nor {STATE_FILENAME}")
        return
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{mpath}: unreadable checkpoint manifest ({err}); delete {ckpt} to resume from "
                              "the previous checkpoint") from err
    _check_format_version(manifest, mpath)
    for rel, info in files.items():
        f = ckpt / rel
        if not f.exists():
            raise CheckpointError(f"{f} is missing (listed in {mpath}); delete {ckpt} to resume from the previous "
                                  "checkpoint")
        size = f.stat().st_size
        if size != info["size"] or _sha256(f) != info["sha256"]:
            what = "truncated" if size < info["size"] else "corrupted"
            raise CheckpointError(
                f"{f} is {what} ({size} bytes, sha256 differs from {mpath}); delete {ckpt} to resume from the "
                "previous checkpoint"
            )


def _check_format_version(d: Mapping, where: Path) -> None:
    fv = d.get("format_version", 1)
    if not isinstance(fv, int) or fv > CHECKPOINT_VERSION:
        made_by = d.get("sae_lens_attn_version", "a newer version")
        raise CheckpointError(
            f"{where}: checkpoint format_version {fv!r} was written by sae_lens_attn {made_by}; this is "
            f"sae_lens_attn {__version__}, which reads format_version <= {CHECKPOINT_VERSION}: upgrade "
            "sae_lens_attn to resume it"
        )


def load_trainer_state(ckpt: str | os.PathLike) -> dict:
    """``trainer_state.pt`` of a checkpoint, read with ``weights_only=True``; :class:`CheckpointError`
    naming the file when it is missing, truncated, corrupted or from a newer format."""
    f = Path(ckpt) / STATE_FILENAME
    if not f.exists():
        raise CheckpointError(f"{f} is missing; {ckpt} is not a complete checkpoint")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # zipfile/pickle/RuntimeError: a truncated or corrupted file
        raise CheckpointError(
            f"{f}: unreadable trainer state ({type(err).__name__}: {err}); the file is truncated or corrupted. "
            f"Delete {Path(ckpt)} to resume from the previous checkpoint"
        ) from err
    if not isinstance(state, dict) or "step" not in state or "sites" not in state:
        raise CheckpointError(f"{f}: not a trainer state (no 'step'/'sites')")
    _check_format_version(state, f)
    return state


def remove_partial_checkpoints(out_dir: str | os.PathLike) -> list[str]:
    """Delete ``checkpoints/.tmp_*``: checkpoints a killed run was still building (never renamed into place)."""
    root = Path(out_dir) / "checkpoints"
    removed = []
    if root.exists():
        for p in root.glob(".tmp_*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoints/step_N`` under ``out_dir`` (None if there is none).

    A ``step_N`` directory only ever appears whole (it is renamed into place), so this does not read the
    files; :meth:`Trainer.restore` verifies them.
    """
    root = Path(out_dir) / "checkpoints"
    if not root.exists():
        return None
    done = sorted(
        p for p in root.iterdir()
        if p.name.startswith("step_") and ((p / MANIFEST_FILENAME).exists() or (p / STATE_FILENAME).exists())
    )
    return done[-1] if done else None
