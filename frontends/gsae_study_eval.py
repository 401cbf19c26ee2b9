"""Evaluation for the g-SAE study, kept per evaluation row so that a paired bootstrap can recompute it.

Every metric is the one :func:`sae_lens_attn.evals.evaluate_sae` reports (CE loss recovered against zero and
mean ablation, KL, FVU, dead fraction; their aggregates agree, tested), stored as per-row sums from which
the aggregate is a ratio of sums. The parts that do not depend on the SAE (the site's activations, the
clean, zero-ablated and mean-ablated runs) are computed once per layer in :func:`site_eval`; each SAE then
costs one spliced forward pass per chunk (:func:`sae_eval`) plus the steering passes.

Steering (the paper's measure, as we read it; choices the paper leaves open are ours): for a latent i, its
output direction through W_O is u_i (:func:`sae_lens_attn.analysis._common.residual_directions`). Adding
``alpha * mean||attn_out|| * u_i/||u_i||`` to the layer's attention output at every non-BOS position changes
the next-token distribution; the score is the increase of the probability mass on the latent's
``n_tokens`` top direct-logit tokens (``u_i @ W_U``), averaged over the predicted positions at non-BOS
tokens and over the ``n_latents`` most frequently firing latents on the evaluation rows. Defaults: alpha = 2
(in units of the mean attn_out norm over the steering rows' non-BOS positions), 10 tokens, 32 latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_lens_attn.activations import harvest, splice
from sae_lens_attn.analysis._common import residual_directions
from sae_lens_attn.models import model_device, token_policy
from sae_lens_attn.objective import kl_per_position, token_losses
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import model_spec

#: A latent firing in more than this share of the evaluation rows is stored without its row list: a
#: bootstrap resample of R rows misses all of its m > R/4 rows with probability (1 - m/R)^R < 0.75^R
#: (1e-16 at R = 128), so it counts as alive in every resample.
RARE_ROW_SHARE = 0.25


@dataclass
class SteerConfig:
    """The steering measure's free choices (module docstring)."""

    alpha: float = 2.0
    """Added vector's norm in units of the mean attn_out norm over the steering rows' non-BOS positions."""
    n_tokens: int = 10
    """Top direct-logit tokens of a latent whose probability mass is measured."""
    n_latents: int = 32
    """How many of the most frequently firing latents are steered."""
    rows: int = 16
    """Evaluation rows the steering passes run on (the first ones)."""


@dataclass
class SiteEval:
    """What one layer's evaluation needs that no SAE changes: per-row sums, [R] each unless noted."""

    site: Site
    rows: torch.Tensor
    """[R, pos] evaluation tokens."""
    acts: torch.Tensor
    """[R, pos, d_in] the site's clean activations."""
    mask: torch.Tensor
    """[R, pos] non-BOS positions (the tokens the SAE encodes)."""
    clean_logits: torch.Tensor
    """[R, pos, vocab] float32."""
    n_tok: torch.Tensor
    n_pred: torch.Tensor
    """Predicted positions per row (pos - 1)."""
    ce_clean: torch.Tensor
    ce_zero: torch.Tensor
    ce_mean: torch.Tensor
    x_sq: torch.Tensor
    """Sum of ||x||^2 over the row's tokens."""
    row_sum_gram: torch.Tensor
    """[R, R] Gram matrix of the per-row sums of x: the bootstrap's FVU denominator needs ||sum_r w_r s_r||^2."""
    steer_scale: float
    """alpha times the mean attn_out norm on the steering rows."""

    def as_json(self) -> dict:
        keys = ("n_tok", "n_pred", "ce_clean", "ce_zero", "ce_mean", "x_sq", "row_sum_gram")
        return {"steer_scale": self.steer_scale, **{k: getattr(self, k).tolist() for k in keys}}


@dataclass
class SAEEval:
    """One SAE's per-row sums, [R] each, and its firing pattern."""

    ce_spliced: torch.Tensor
    kl: torch.Tensor
    """KL(clean || spliced) summed over the row's predicted positions."""
    sq_err: torch.Tensor
    l0: torch.Tensor
    """Active latents summed over the row's tokens."""
    steer: torch.Tensor
    """[R_steer] the steering deltas summed over the row's scored positions, averaged over latents."""
    steer_n: torch.Tensor
    """[R_steer] scored positions per steering row."""
    density: torch.Tensor
    """[d_sae] firing frequency over all evaluation tokens."""
    never_fired: int
    rare: dict[int, list[int]]
    """Latents firing in at least one and at most RARE_ROW_SHARE * R rows: the rows they fire in."""

    def as_json(self) -> dict:
        keys = ("ce_spliced", "kl", "sq_err", "l0", "steer", "steer_n")
        return {"never_fired": self.never_fired, "rare": {str(i): r for i, r in self.rare.items()},
                **{k: getattr(self, k).tolist() for k in keys}}


def _row_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token CE summed per row (float64), as evaluate_sae sums it."""
    return token_losses(logits[:, :-1], tokens[:, 1:]).sum(1)


@torch.no_grad()
def site_eval(model, site: Site, rows: torch.Tensor, steer: SteerConfig, batch_rows: int = 16,
              clean_logits: torch.Tensor | None = None) -> SiteEval:
    """Clean, zero- and mean-ablated runs of ``rows`` at ``site`` (``clean_logits`` reused across layers)."""
    device = model_device(model)
    h = harvest(model, rows, [site])
    acts, mask = h.acts[site].cpu(), h.mask.cpu()
    x = acts.double() * mask[..., None]
    n_tok = mask.sum(1).double()
    row_sums = x.sum(1)
    mean_act = (row_sums.sum(0) / n_tok.sum()).to(acts.dtype)
    if clean_logits is None:
        clean_logits = torch.cat([model(c.to(device), return_type="logits").cpu() for c in rows.split(batch_rows)])
    ce = {"clean": [], "zero": [], "mean": []}
    for i, chunk in zip(range(0, rows.shape[0], batch_rows), rows.split(batch_rows)):
        chunk = chunk.to(device)
        keep = token_policy(model).keep(chunk)
        ce["clean"].append(_row_ce(clean_logits[i : i + len(chunk)], chunk.cpu()))
        with splice(model, site, lambda flat: torch.zeros_like(flat), keep):
            ce["zero"].append(_row_ce(model(chunk, return_type="logits").cpu(), chunk.cpu()))
        with splice(model, site, lambda flat: mean_act.to(flat.dtype).expand_as(flat), keep):
            ce["mean"].append(_row_ce(model(chunk, return_type="logits").cpu(), chunk.cpu()))
    return SiteEval(
        site=site, rows=rows, acts=acts, mask=mask, clean_logits=clean_logits, n_tok=n_tok,
        n_pred=torch.full((rows.shape[0],), float(rows.shape[1] - 1), dtype=torch.float64),
        ce_clean=torch.cat(ce["clean"]), ce_zero=torch.cat(ce["zero"]), ce_mean=torch.cat(ce["mean"]),
        x_sq=x.pow(2).sum((1, 2)), row_sum_gram=row_sums @ row_sums.T,
        steer_scale=steer.alpha * _attn_out_norm(model, site.layer, rows[: steer.rows]),
    )


def _attn_out_norm(model, layer: int, rows: torch.Tensor) -> float:
    """Mean ||attn_out|| over the kept (non-BOS) positions of ``rows`` at ``layer``."""
    site = Site(layer, "attn_out")
    h = harvest(model, rows, [site])
    return float(h.acts[site][h.mask].norm(dim=-1).mean())


@torch.no_grad()
def sae_eval(model, sae: SAE, base: SiteEval, steer: SteerConfig, batch_rows: int = 16) -> SAEEval:
    """Per-row metrics of ``sae`` on the rows of ``base`` (TopK selection: no gradient at evaluation)."""
    site = base.site
    sae.check_site(site, model.cfg)
    device = model_device(model)
    R = base.rows.shape[0]
    fired = torch.zeros(R, sae.cfg.d_sae, dtype=torch.bool)
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    sq_err = torch.zeros(R, dtype=torch.float64)
    l0 = torch.zeros(R, dtype=torch.float64)
    row_of_tok = base.mask.nonzero()[:, 0]
    x_all = base.acts[base.mask].to(sae.W_enc.dtype)
    for start in range(0, x_all.shape[0], 4096):
        x, rid = x_all[start : start + 4096], row_of_tok[start : start + 4096]
        code = sae.encode_sparse(x)
        x_hat = sae.decode_sparse(code.values, code.indices)
        active = code.values > 0
        l0.index_add_(0, rid, active.sum(1).double())
        sq_err.index_add_(0, rid, (x - x_hat).double().pow(2).sum(1))
        counts.index_add_(0, code.indices[active], torch.ones(int(active.sum()), dtype=torch.float64))
        fired[rid[:, None].expand_as(code.indices)[active], code.indices[active]] = True
    ce_spl, kl = [], []
    for i, chunk in zip(range(0, R, batch_rows), base.rows.split(batch_rows)):
        chunk = chunk.to(device)
        def recon(flat):
            return sae(flat.to(sae.W_dec.dtype)).to(flat.dtype)

        with splice(model, site, recon, token_policy(model).keep(chunk)):
            logits = model(chunk, return_type="logits").cpu()
        ce_spl.append(_row_ce(logits, chunk.cpu()))
        kl.append(kl_per_position(base.clean_logits[i : i + len(chunk), :-1], logits[:, :-1]).sum(1))
    density = counts / base.n_tok.sum()
    rows_fired = fired.sum(0)
    rare_ids = ((rows_fired > 0) & (rows_fired <= RARE_ROW_SHARE * R)).nonzero()[:, 0]
    steer_sum, steer_n = steering_rows(model, sae, base, density, steer)
    return SAEEval(
        ce_spliced=torch.cat(ce_spl), kl=torch.cat(kl), sq_err=sq_err, l0=l0, steer=steer_sum, steer_n=steer_n,
        density=density.float(), never_fired=int((rows_fired == 0).sum()),
        rare={int(i): fired[:, i].nonzero()[:, 0].tolist() for i in rare_ids},
    )


@torch.no_grad()
def steering_rows(model, sae: SAE, base: SiteEval, density: torch.Tensor,
                  steer: SteerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per steering row: the steering deltas summed over its scored positions and averaged over the latents,
    and the number of scored positions (the score is ``sum(first) / sum(second)``)."""
    dirs = residual_directions(model, sae, base.site)
    latents = density.argsort(descending=True, stable=True)[: steer.n_latents]
    device = model_device(model)
    rows = base.rows[: steer.rows].to(device)
    keep = token_policy(model).keep(rows)
    mask = keep[:, :-1].cpu()
    clean_probs = base.clean_logits[: steer.rows, :-1].softmax(-1)
    hook = model_spec(model).capture_hook(Site(base.site.layer, "attn_out"))
    total = torch.zeros(rows.shape[0], dtype=torch.float64)
    for i in latents.tolist():
        u = dirs[i] / dirs[i].norm().clamp_min(1e-8)
        top = (u @ model.W_U).topk(steer.n_tokens).indices.cpu()

        def add(t, hook, u=u):
            return t + base.steer_scale * u * keep[..., None]

        with model.hooks(fwd_hooks=[(hook, add)]):
            probs = model(rows, return_type="logits")[:, :-1].softmax(-1).cpu()
        d = probs[..., top].sum(-1).double() - clean_probs[..., top].sum(-1).double()
        total += (d * mask).sum(1)
    return total / max(len(latents), 1), mask.sum(1).double()
