"""One site's training step: the objective, AuxK, dead-latent counters and the Adam update.

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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from sae_lens_attn.activations import NonFiniteActivationError, SiteBatch
from sae_lens_attn.errors import UserError
from sae_lens_attn.kernels import keep_freed_host_memory, sparse_decode, topk_indices
from sae_lens_attn.sae import SAE, SparseCode

from .config import OptimSettings
from .distributed import Dist


class DivergedError(UserError, FloatingPointError):
    """The training loss became non-finite (the learning rate is too high for this data)."""


@dataclass
class OptimConfig(OptimSettings):
    """What the trainer needs to know: the optimiser settings (:class:`~.config.OptimSettings`) plus the
    run's length and cadence."""

    steps: int = 1000
    """Total optimizer steps."""
    log_every: int = 10
    """Steps between log records."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: none)."""
    batch_size: int | None = None
    """Global activation vectors per step, when known: the log then says ``dead`` is not measured until
    ``dead_tokens`` tokens have been seen (before that, no latent can count as dead)."""

    @classmethod
    def of(cls, settings, **overrides) -> OptimConfig:
        """The trainer's config from any settings object holding these fields by name (``TrainConfig``, the
        g-SAE study's config), so no field is copied by hand; ``overrides`` win."""
        values = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        return cls(**{**values, **overrides})

    def dead_note(self, step: int) -> str:
        """Why the dead fraction at ``step`` means nothing yet, or ``""``."""
        if self.batch_size is None or step * self.batch_size >= self.dead_tokens:
            return ""
        return (f"not measured: {step * self.batch_size:,} tokens seen, fewer than the {self.dead_tokens:,}-token "
                "dead window (--dead-tokens)")


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
        """One optimizer step on this rank's share of the global batch; the statistics are the global
        batch's. The collectives, in order: (1) batch size and sum of x, (2) variance of x and sum of the
        AuxK residual, (3) the residual's variance and a divergence flag, (4) firing counts and statistics."""
        sae = self.sae
        x = batch.acts.to(sae.W_enc.device, sae.W_enc.dtype)
        n, mean = self._global_mean(x, step)
        if not self.initialised:
            self.initialise(x, mean)
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(step, self.cfg)
        code = sae.encode_sparse(x, batch.grads)
        err = x - sae.decode_sparse(code.values, code.indices)
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        use_aux = bool(n_dead) and self.cfg.auxk_alpha > 0
        loss, fvu, auxk = self._objective(x, mean, n, code, err, dead if use_aux else None, n_dead, step)
        self._update(loss)
        n_active, fvu_g, auxk_g = self._record_firing(code, n, fvu, auxk)
        loss_g = fvu_g + (self.cfg.auxk_alpha * auxk_g if use_aux else 0.0)
        return StepStats(loss_g, fvu_g, auxk_g, n_active / n, n_dead / sae.cfg.d_sae)

    def _global_mean(self, x: torch.Tensor, step: int) -> tuple[int, torch.Tensor]:
        """(1) The global batch size and mean of x: one reduction. A NaN or inf anywhere makes its column's
        sum non-finite on every rank (f64 sums of fp32 values cannot overflow), so the [batch, d_in]
        finiteness mask is only built to count the bad values once there are some."""
        f64 = torch.float64
        count = torch.tensor([x.shape[0]], dtype=f64, device=x.device)
        s1 = self.dist.all_reduce(torch.cat([x.sum(0, dtype=f64), count]))
        n_f, any_bad = torch.stack([s1[-1], (~torch.isfinite(s1[:-1])).any().to(f64)]).tolist()
        n = int(n_f)
        if any_bad:
            self._refuse_non_finite(x, step)
        return n, s1[:-1] / n

    def _refuse_non_finite(self, x: torch.Tensor, step: int) -> None:
        """Raise for a batch whose column sums are not finite, counting its NaN/inf values over all ranks."""
        dist = self.dist
        bad = int(dist.all_reduce((~torch.isfinite(x)).sum().to(torch.float64).reshape(1)).item())
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

    def _objective(
        self, x: torch.Tensor, mean: torch.Tensor, n: int, code: SparseCode, err: torch.Tensor, dead: torch.Tensor | None,
        n_dead: int, step: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss (FVU, plus ``auxk_alpha`` times AuxK when ``dead`` is given), its FVU and its AuxK
        term; raises :class:`DivergedError` on every rank when any rank's loss is non-finite."""
        f64, use_aux = torch.float64, dead is not None
        e = err.detach()
        # (2) total variance of x and (for AuxK) the sum of the residual. Squares summed in x's dtype by
        # torch's cascade sum (relative error ~1e-9 at 3M fp32 values; linalg.vector_norm's is ~1e-4), in one
        # reused temporary instead of f64 copies.
        var_x = (x - mean.to(x.dtype)).square_().sum().to(f64).reshape(1)
        s2 = self.dist.all_reduce(torch.cat([var_x, e.sum(0, dtype=f64)]) if use_aux else var_x)
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
        s3 = self.dist.all_reduce(torch.cat([aux_var, local_bad]))
        if use_aux:
            auxk = aux_num / s3[0].clamp_min(1e-12).to(x.dtype)
            loss = loss + self.cfg.auxk_alpha * auxk
        if s3[1].item() > 0:
            raise DivergedError(f"the loss became non-finite at step {step}; lower the learning rate")
        return loss, fvu, auxk

    def _update(self, loss: torch.Tensor) -> None:
        """Backward, the gradients summed over ranks, the decoder-parallel part removed, the Adam step, and
        the decoder rows put back on the unit sphere."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._reduce_grads()
        self.sae.remove_parallel_decoder_grad()
        self.opt.step()
        self.sae.normalize_decoder()

    @torch.no_grad()
    def _record_firing(self, code: SparseCode, n: int, fvu: torch.Tensor, auxk: torch.Tensor) -> list[float]:
        """(4) Firing counts (they decide which latents are dead, so every rank must agree) and the global
        statistics: the counters advance; returns the active-latent count, FVU and AuxK of the global batch."""
        f64, d_sae = torch.float64, self.sae.cfg.d_sae
        active = code.values > 0
        counts = torch.bincount(code.indices[active], minlength=d_sae).to(f64)
        tail = torch.stack([active.sum().to(f64), fvu.detach().to(f64), auxk.detach().to(f64)])
        s4 = self.dist.all_reduce(torch.cat([counts, tail]))
        counts = s4[:d_sae]
        self.tokens_since_fired += n
        self.tokens_since_fired[counts > 0] = 0
        self.fire_counts += counts.cpu()
        self.tokens_seen += n
        return s4[d_sae:].tolist()

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
