"""Metrics shared by training and analysis: L0, FVU, CE loss recovered (zero and mean ablation), KL, dead.

CE loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean), where the spliced run replaces the
site's activation by the SAE's reconstruction at every non-BOS position (BOS keeps its clean value, as the
SAE never saw it), and the ablated run replaces it by zeros or by its mean over the evaluation tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .activations import harvest, splice
from .models import bos_token_id, model_device
from .sae import SAE
from .sites import Site


@dataclass
class SAEMetrics:
    """Evaluation of one SAE at one site over a fixed set of token rows."""

    site: str
    l0: float
    """Mean number of active (non-zero) latents per token."""
    fvu: float
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    explained_variance: float
    """1 - FVU."""
    ce_clean: float
    ce_spliced: float
    ce_zero_ablated: float
    ce_mean_ablated: float
    ce_recovered_zero: float
    """CE loss recovered against zero-ablation of the site."""
    ce_recovered_mean: float
    """CE loss recovered against mean-ablation of the site."""
    kl_spliced: float
    """Mean KL(clean || spliced) of the next-token distributions, nats per token."""
    dead_fraction: float
    """Latents that never fired on the evaluation tokens."""
    mean_density: float
    """Mean firing frequency per latent."""

    def as_dict(self) -> dict:
        return asdict(self)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x = x.double()
    resid = (x - x_hat.double()).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-30)
    return float(resid / total)


@torch.no_grad()
def evaluate_sae(
    model, sae: SAE, site: Site, rows: torch.Tensor, batch_rows: int = 16, *, allow_transfer: bool | None = None
) -> tuple[SAEMetrics, torch.Tensor]:
    """Metrics of ``sae`` at ``site`` on token ``rows``; also returns each latent's firing frequency.
    ``allow_transfer``: evaluate on another site or model than the SAE's metadata records (see SAE.check_site)."""
    sae.check_site(site, model, allow_transfer=allow_transfer)
    device = model_device(model)
    bos = bos_token_id(model)
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n_tok = 0
    sq_err = 0.0
    xs_sum = None
    xs_sq = 0.0
    l0_sum = 0.0
    # First pass: reconstruction statistics and the site's mean activation (for mean-ablation).
    for chunk in rows.split(batch_rows):
        h = harvest(model, chunk, [site])
        x = h.acts[site][h.mask].to(sae.W_enc.dtype)
        code = sae.encode(x)
        x_hat = sae.decode(code.values, code.indices)
        active = code.values > 0
        l0_sum += float(active.sum())
        counts.index_add_(0, code.indices[active].cpu(), torch.ones(int(active.sum()), dtype=torch.float64))
        sq_err += float((x - x_hat).double().pow(2).sum())
        xs_sum = x.double().sum(0) if xs_sum is None else xs_sum + x.double().sum(0)
        xs_sq += float(x.double().pow(2).sum())
        n_tok += x.shape[0]
    if n_tok == 0:
        raise ValueError("evaluation rows hold no non-BOS tokens")
    mean_act = (xs_sum / n_tok).to(sae.W_enc.dtype)
    total_var = xs_sq - float((xs_sum**2).sum()) / n_tok
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "mean": 0.0}
    kl_sum = 0.0
    n_pred = 0
    for chunk in rows.split(batch_rows):
        chunk = chunk.to(device)
        keep = chunk != bos
        clean_logits = model(chunk, return_type="logits")
        with splice(model, site, lambda flat: sae.reconstruct(flat), keep):
            spliced_logits = model(chunk, return_type="logits")
        with splice(model, site, lambda flat: torch.zeros_like(flat), keep):
            zero_logits = model(chunk, return_type="logits")
        with splice(model, site, lambda flat: mean_act.to(flat.dtype).expand_as(flat), keep):
            mean_logits = model(chunk, return_type="logits")
        for key, logits in (("clean", clean_logits), ("spliced", spliced_logits), ("zero", zero_logits), ("mean", mean_logits)):
            ce[key] += float(_next_token_ce(logits, chunk).sum())
        lp_clean = F.log_softmax(clean_logits[:, :-1].double(), -1)
        lp_spl = F.log_softmax(spliced_logits[:, :-1].double(), -1)
        kl_sum += float((lp_clean.exp() * (lp_clean - lp_spl)).sum())
        n_pred += chunk.shape[0] * (chunk.shape[1] - 1)
    ce = {k: v / n_pred for k, v in ce.items()}
    fvu_val = sq_err / max(total_var, 1e-30)
    density = counts / n_tok
    metrics = SAEMetrics(
        site=site.label,
        l0=l0_sum / n_tok,
        fvu=fvu_val,
        explained_variance=1 - fvu_val,
        ce_clean=ce["clean"],
        ce_spliced=ce["spliced"],
        ce_zero_ablated=ce["zero"],
        ce_mean_ablated=ce["mean"],
        ce_recovered_zero=_recovered(ce["zero"], ce["spliced"], ce["clean"]),
        ce_recovered_mean=_recovered(ce["mean"], ce["spliced"], ce["clean"]),
        kl_spliced=kl_sum / n_pred,
        dead_fraction=float((counts == 0).double().mean()),
        mean_density=float(density.mean()),
    )
    return metrics, density.float()


def _next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1), reduction="none"
    )


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    denom = ablated - clean
    return float("nan") if abs(denom) < 1e-12 else (ablated - spliced) / denom


def format_metrics_table(metrics: list[SAEMetrics]) -> str:
    """A plain-text table, one row per site."""
    cols = [
        ("site", "site", "{}"),
        ("L0", "l0", "{:.1f}"),
        ("FVU", "fvu", "{:.3f}"),
        ("CE rec (zero)", "ce_recovered_zero", "{:.1%}"),
        ("CE rec (mean)", "ce_recovered_mean", "{:.1%}"),
        ("KL", "kl_spliced", "{:.4f}"),
        ("CE clean", "ce_clean", "{:.3f}"),
        ("CE spliced", "ce_spliced", "{:.3f}"),
        ("dead", "dead_fraction", "{:.1%}"),
    ]
    cells = [[fmt.format(getattr(m, attr)) for _, attr, fmt in cols] for m in metrics]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, (h, _, _) in enumerate(cols)]
    line = "  ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths))
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line, "-" * len(line), *body])
