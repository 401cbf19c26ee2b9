"""Metrics shared by training and analysis: L0, FVU, CE loss recovered (zero and mean ablation), KL, dead.

CE loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean), where the spliced run replaces the
site's activation by the SAE's reconstruction at every text position (structural tokens such as BOS keep
their clean value, as the SAE never saw them), and the ablated run replaces it by zeros or by its mean over
the evaluation tokens. The loss is the model kind's own (:mod:`sae_lens_attn.objective`): next-token CE for
causal LMs, masked-token CE for encoders (KL then on the masked positions too). A model with newly
initialised weights (e.g. an encoder saved without its masked-LM head) gets no CE/KL numbers: they are
``None`` with the reason in ``lm_note``; the reconstruction metrics are exact either way.

**When CE recovered means nothing.** The ratio divides by CE_ablated - CE_clean. Where ablating the site
barely moves the loss (less than :data:`MIN_ABLATION_GAP` nats per token: a middle layer of a 30-layer
model can be that redundant) or *lowers* it (mean ablation can), the ratio is noise over a tiny or negative
denominator (SmolLM2-135M layer 15 printed 118% and -61%). It is still reported, with the reason in
``ce_recovered_zero_note`` / ``ce_recovered_mean_note``, marked ``*`` in the table; the raw losses and KL
are the numbers to read then.

**Memory.** Each evaluation chunk's logits are reduced to per-token losses and KL as they are computed;
at most two chunks of logits are alive (the clean run's, for KL, and the current edit's), and the chunk
holds at most :data:`EVAL_LOGIT_BYTES` of them, so the peak follows the vocabulary times the chunk, not
the number of evaluation rows.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .activations import harvest, splice
from .errors import InputError
from .models import model_device
from .objective import MASK_SHARE, kl_per_position, loss_input, token_losses
from .sae import SAE
from .sites import Site
from .spec import model_spec

#: CE recovered is flagged as unreliable when ablating the site moves the loss by less than this (nats per
#: token), or lowers it. 0.1 nats is about a tenth of what ablating a typical early attention layer costs a
#: small model, and more than the run-to-run spread of the spliced loss on a few thousand tokens.
MIN_ABLATION_GAP = 0.1
#: Bytes of float32 logits two live evaluation chunks may hold together (256 MiB): rows per chunk are
#: ``min(batch_rows, EVAL_LOGIT_BYTES // (2 * 4 * pos * vocab))``, at least one.
EVAL_LOGIT_BYTES = 256 * 1024**2


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
    ce_clean: float | None
    ce_spliced: float | None
    ce_zero_ablated: float | None
    ce_mean_ablated: float | None
    ce_recovered_zero: float | None
    """CE loss recovered against zero-ablation of the site."""
    ce_recovered_mean: float | None
    """CE loss recovered against mean-ablation of the site."""
    kl_spliced: float | None
    """Mean KL(clean || spliced) of the output distributions where the loss is read, nats per position."""
    dead_fraction: float
    """Latents that never fired on the evaluation tokens (``dead_tokens`` of them)."""
    mean_density: float
    """Mean firing frequency per latent."""
    dead_tokens: int = 0
    """Evaluation tokens ``dead_fraction`` and ``mean_density`` were measured over."""
    ce_recovered_zero_note: str = ""
    """Why ``ce_recovered_zero`` is unreliable (ablation barely moves, or lowers, the loss); empty if it is not."""
    ce_recovered_mean_note: str = ""
    """Why ``ce_recovered_mean`` is unreliable; empty if it is not."""
    loss_kind: str = "next-token"
    """``next-token`` (causal LMs) or ``masked-token`` (encoders: MASK_SHARE of text positions masked)."""
    lm_note: str = ""
    """Why the CE/KL fields are None (empty when they are given)."""

    def as_dict(self) -> dict:
        return asdict(self)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x = x.double()
    resid = (x - x_hat.double()).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-30)
    return float(resid / total)


class _Recon:
    """Pass-1 sums: reconstruction error, activation moments, firing counts."""

    def __init__(self, d_sae: int):
        self.counts = torch.zeros(d_sae, dtype=torch.float64)
        self.n_tok = 0
        self.sq_err = 0.0
        self.xs_sum: torch.Tensor | None = None
        self.xs_sq = 0.0
        self.l0_sum = 0.0

    def add(self, sae: SAE, x: torch.Tensor) -> None:
        code = sae.encode_sparse(x)
        x_hat = sae.decode_sparse(code.values, code.indices)
        active = code.values > 0
        self.l0_sum += float(active.sum())
        self.counts.index_add_(0, code.indices[active].cpu(), torch.ones(int(active.sum()), dtype=torch.float64))
        self.sq_err += float((x - x_hat).double().pow(2).sum())
        self.xs_sum = x.double().sum(0) if self.xs_sum is None else self.xs_sum + x.double().sum(0)
        self.xs_sq += float(x.double().pow(2).sum())
        self.n_tok += x.shape[0]


@torch.no_grad()
def evaluate_sae(
    model, sae: SAE, site: Site, rows: torch.Tensor, batch_rows: int = 16, *, allow_transfer: bool | None = None
) -> tuple[SAEMetrics, torch.Tensor]:
    """Metrics of ``sae`` at ``site`` on token ``rows``; also returns each latent's firing frequency.
    ``allow_transfer``: evaluate on another site or model than the SAE's metadata records (see SAE.check_site)."""
    sae.check_site(site, model, allow_transfer=allow_transfer)
    spec = model_spec(model)
    rec = _Recon(sae.cfg.d_sae)
    for chunk in rows.split(batch_rows):
        h = harvest(model, chunk, [site])
        rec.add(sae, h.acts[site][h.mask].to(sae.W_enc.dtype))
    if rec.n_tok == 0:
        raise InputError("evaluation rows hold no text tokens (only the policy's structural tokens)")
    mean_act = (rec.xs_sum / rec.n_tok).to(sae.W_enc.dtype)
    total_var = rec.xs_sq - float((rec.xs_sum**2).sum()) / rec.n_tok
    note = spec.lm_refusal or ""
    ce = None if note else _loss_metrics(model, sae, site, rows, batch_rows, mean_act)
    if note:
        warnings.warn(f"{site.label}: {note}", UserWarning, stacklevel=2)
    fvu_val = rec.sq_err / max(total_var, 1e-30)
    density = rec.counts / rec.n_tok
    get = (lambda k: ce[k]) if ce is not None else (lambda k: None)
    metrics = SAEMetrics(
        site=site.label,
        l0=rec.l0_sum / rec.n_tok,
        fvu=fvu_val,
        explained_variance=1 - fvu_val,
        ce_clean=get("clean"),
        ce_spliced=get("spliced"),
        ce_zero_ablated=get("zero"),
        ce_mean_ablated=get("mean"),
        ce_recovered_zero=_recovered(ce["zero"], ce["spliced"], ce["clean"]) if ce else None,
        ce_recovered_mean=_recovered(ce["mean"], ce["spliced"], ce["clean"]) if ce else None,
        kl_spliced=get("kl"),
        dead_fraction=float((rec.counts == 0).double().mean()),
        mean_density=float(density.mean()),
        dead_tokens=rec.n_tok,
        ce_recovered_zero_note=recovered_note(ce["zero"], ce["clean"], "zero") if ce else "",
        ce_recovered_mean_note=recovered_note(ce["mean"], ce["clean"], "mean") if ce else "",
        loss_kind="next-token" if spec.kind == "causal" else f"masked-token ({MASK_SHARE:.0%} of text positions)",
        lm_note=note,
    )
    return metrics, density.float()


def eval_chunk_rows(model, n_pos: int, batch_rows: int) -> int:
    """Rows per evaluation chunk: ``batch_rows``, fewer where two chunks' logits would pass EVAL_LOGIT_BYTES."""
    per_row = 2 * 4 * n_pos * int(model.cfg.d_vocab)
    return max(1, min(batch_rows, EVAL_LOGIT_BYTES // max(per_row, 1)))


def _loss_metrics(model, sae: SAE, site: Site, rows: torch.Tensor, batch_rows: int, mean_act: torch.Tensor) -> dict:
    """Mean loss of the clean, spliced, zero- and mean-ablated runs, and the spliced run's KL. Each run's
    logits are reduced to its summed loss (and KL) before the next run starts."""
    spec = model_spec(model)
    device = model_device(model)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "mean": 0.0, "kl": 0.0}
    n_pred = 0
    edits = {
        "spliced": lambda flat: sae(flat),
        "zero": lambda flat: torch.zeros_like(flat),
        "mean": lambda flat: mean_act.to(flat.dtype).expand_as(flat),
    }
    for chunk in rows.split(eval_chunk_rows(model, rows.shape[1], batch_rows)):
        inp = loss_input(chunk.to(device).long(), spec)
        keep = spec.tokens.keep(inp.tokens)
        read = inp.targets != -100
        clean = model(inp.tokens, return_type="logits")
        sums["clean"] += float(token_losses(clean, inp.targets).sum())
        for key, fn in edits.items():
            with splice(model, site, fn, keep):
                logits = model(inp.tokens, return_type="logits")
            sums[key] += float(token_losses(logits, inp.targets).sum())
            if key == "spliced":
                sums["kl"] += float(kl_per_position(clean, logits)[read].sum())
            del logits
        del clean
        n_pred += int(read.sum())
    if n_pred == 0:
        raise InputError("evaluation rows have no position where the loss is read")
    return {k: v / n_pred for k, v in sums.items()}


def recovered_note(ablated: float, clean: float, how: str) -> str:
    """Why CE recovered against ``how``-ablation is unreliable, or ``""`` (see the module docstring)."""
    gap = ablated - clean
    if gap < 0:
        return (f"{how}-ablating the site lowers the loss ({ablated:.3f} < clean {clean:.3f} nats), so the ratio has "
                "no meaning; read the raw losses and KL")
    if gap < MIN_ABLATION_GAP:
        return (f"{how}-ablating the site raises the loss by only {gap:.3f} nats (< {MIN_ABLATION_GAP}), so the ratio "
                "divides by noise; read the raw losses and KL")
    return ""


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    denom = ablated - clean
    return float("nan") if abs(denom) < 1e-12 else (ablated - spliced) / denom


def _cell(m: SAEMetrics, attr: str, fmt: str) -> str:
    value = getattr(m, attr)
    if value is None:
        return "refused"
    flagged = attr.startswith("ce_recovered_") and getattr(m, f"{attr}_note", "")
    return fmt.format(value) + ("*" if flagged else "")


def format_metrics_table(metrics: list[SAEMetrics]) -> str:
    """A plain-text table, one row per site: the ratios, the raw losses they come from, and footnotes for
    every ratio marked ``*`` as unreliable (:func:`recovered_note`) and for what ``dead`` was counted over."""
    cols = [
        ("site", "site", "{}"),
        ("L0", "l0", "{:.1f}"),
        ("FVU", "fvu", "{:.3f}"),
        ("CE rec (zero)", "ce_recovered_zero", "{:.1%}"),
        ("CE rec (mean)", "ce_recovered_mean", "{:.1%}"),
        ("KL", "kl_spliced", "{:.4f}"),
        ("CE clean", "ce_clean", "{:.3f}"),
        ("CE spliced", "ce_spliced", "{:.3f}"),
        ("CE zero", "ce_zero_ablated", "{:.3f}"),
        ("CE mean", "ce_mean_ablated", "{:.3f}"),
        ("dead", "dead_fraction", "{:.1%}"),
    ]
    cells = [[_cell(m, attr, fmt) for _, attr, fmt in cols] for m in metrics]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, (h, _, _) in enumerate(cols)]
    line = "  ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths))
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    notes = sorted({f"{m.site}: {m.lm_note}" for m in metrics if m.lm_note})
    flags = [f"* {m.site} CE rec ({how}): {note}" for m in metrics
             for how, note in (("zero", m.ce_recovered_zero_note), ("mean", m.ce_recovered_mean_note)) if note]
    kinds = sorted({m.loss_kind for m in metrics})
    foot = [f"loss: {', '.join(kinds)}"] if kinds != ["next-token"] else []
    counted = sorted({m.dead_tokens for m in metrics if m.dead_tokens})
    if counted:
        foot.append(f"dead: latents that never fired on the {', '.join(f'{n:,}' for n in counted)} evaluation tokens")
    return "\n".join([line, "-" * len(line), *body, *flags, *foot, *notes])


#: An SAE folder's own copy of its evaluation at the end of training (the run folder's metrics.json lists
#: every site): it travels with the folder, so analysis, the explorer and the dashboards can show it.
SITE_METRICS = "metrics.json"


def saved_metrics(sae) -> dict | None:
    """The evaluation saved with ``sae`` at training (its folder's ``metrics.json``, else the run folder's
    entry for its site), or None when it has none (an SAE from elsewhere)."""
    src = getattr(sae, "source", None)
    if not src or not Path(src).is_dir():
        return None
    folder = Path(src)
    try:
        if (folder / SITE_METRICS).is_file():
            d = json.loads((folder / SITE_METRICS).read_text())
            return d if isinstance(d, dict) else None
        if (folder.parent / SITE_METRICS).is_file():
            entries = json.loads((folder.parent / SITE_METRICS).read_text())
            return next((e for e in entries if isinstance(e, dict) and e.get("site") == folder.name), None)
    except (OSError, ValueError):  # a damaged metrics file is not the SAE: show nothing rather than fail
        return None
    return None


def metrics_lines(d: dict) -> list[str]:
    """A saved evaluation (:func:`saved_metrics`) as text lines, with every unreliable ratio marked ``*`` and
    its reason, the raw losses beside the ratios, and what ``dead`` was counted over."""
    def pct(key: str) -> str:
        v = d.get(key)
        return "refused" if v is None else f"{v:.1%}" + ("*" if d.get(f"{key}_note") else "")

    def num(key: str, fmt: str = ".3f") -> str:
        return "refused" if d.get(key) is None else format(d[key], fmt)

    lines = [f"evaluation at training: L0 {d.get('l0', 0):.1f}, FVU {d.get('fvu', 0):.3f}, CE recovered "
             f"{pct('ce_recovered_zero')} (zero-abl.) / {pct('ce_recovered_mean')} (mean-abl.), KL {num('kl_spliced', '.4f')}",
             f"  CE clean {num('ce_clean')}, spliced {num('ce_spliced')}, zero-ablated {num('ce_zero_ablated')}, "
             f"mean-ablated {num('ce_mean_ablated')}; dead {d.get('dead_fraction', 0):.1%}"
             + (f" of the latents on {d['dead_tokens']:,} evaluation tokens" if d.get("dead_tokens") else "")]
    lines += [f"  * CE recovered ({how}): {d[f'ce_recovered_{how}_note']}" for how in ("zero", "mean")
              if d.get(f"ce_recovered_{how}_note")]
    return lines
