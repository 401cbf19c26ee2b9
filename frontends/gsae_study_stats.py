"""Paired statistics, the table and the figure of the g-SAE study (:mod:`.gsae_study` runs it).

Each g-SAE is paired with the TopK SAE of the same (layer, k, seed): same initialisation, same batches in the
same order, same evaluation rows. For every metric the paired difference d_s = g-SAE - TopK is formed per
seed, and two 95% intervals are given for its mean over seeds:

* **t-interval over seeds** (the answer uses this one): mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n). It holds
  the training randomness (initialisation and data order) and the evaluation sample alike.
* **paired bootstrap over evaluation rows**: the rows are resampled with replacement (the same resample for
  both rules and every seed), each metric recomputed exactly from its per-row sums, and the 2.5th-97.5th
  percentiles of mean(d) taken. It holds the evaluation noise only, with the trained SAEs fixed, so it shows
  whether a difference is measured precisely on *these* SAEs; it cannot say whether another seed would show
  it. (Mean ablation keeps the mean of the full evaluation sample; the steering rows are resampled on their
  own.) Dead fraction is not bootstrapped: a resample leaves out about a third of the rows, so latents that
  fire in few rows die in it and the resampled dead fraction is biased upwards; a percentile interval of it
  would not cover the sample's value fairly.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import NamedTuple

import torch

from sae_lens_attn.errors import InputError
from sae_lens_attn.files import write_bytes, write_text

#: (key in the results, label, scale, unit) in the table's order; the table shows value * scale in unit.
METRICS = (
    ("ce_recovered_zero", "CE recovered (zero abl.)", 100, "%"),
    ("ce_recovered_mean", "CE recovered (mean abl.)", 100, "%"),
    ("kl_spliced", "KL", 1000, "mnat/token"),
    ("fvu", "FVU", 100, "%"),
    ("dead_fraction", "dead fraction", 100, "%"),
    ("steering", "steering", 100, "% prob. mass"),
)

#: Metrics without a bootstrap interval (module docstring).
NOT_BOOTSTRAPPED = ("dead_fraction",)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with integer ``df``, by bisection on its exact CDF.

    P(|T| < t) for integer df in closed form (Abramowitz & Stegun 26.7.3-4), with theta = atan(t / sqrt(df)).
    """
    if df < 1 or not 0.5 < p < 1:
        raise InputError(f"t_quantile needs df >= 1 and 0.5 < p < 1, got df={df}, p={p}")

    def two_sided(t: float) -> float:
        th = math.atan(t / math.sqrt(df))
        c2 = math.cos(th) ** 2
        if df % 2:  # odd: (2/pi)(theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ... up to c^(df-3)))
            term, s = 1.0, 1.0 if df > 1 else 0.0
            for j in range(1, (df - 1) // 2):
                term *= (2 * j) / (2 * j + 1) * c2
                s += term
            return 2 / math.pi * (th + math.sin(th) * math.cos(th) * s)
        term, s = 1.0, 1.0  # even: sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        for j in range(1, df // 2):
            term *= (2 * j - 1) / (2 * j) * c2
            s += term
        return math.sin(th) * s

    target = 2 * p - 1
    lo, hi = 0.0, 1.0
    while two_sided(hi) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if two_sided(mid) < target else (lo, mid)
    return (lo + hi) / 2


class Interval(NamedTuple):
    mean: float
    lo: float
    hi: float

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def t_interval(diffs: list[float], level: float = 0.95) -> Interval:
    """Mean of ``diffs`` with its two-sided t-interval (df = n - 1); needs at least two values."""
    n = len(diffs)
    if n < 2:
        raise InputError(f"a t-interval needs at least 2 seeds, got {n}; run with --seeds 0,1,2")
    mean = statistics.fmean(diffs)
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half)


def bootstrap_weights(n_rows: int, n_boot: int, seed: int) -> torch.Tensor:
    """[n_boot, n_rows] float64 counts: how often each row is drawn in each resample of n_rows rows."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_rows, (n_boot, n_rows), generator=gen)
    w = torch.zeros(n_boot, n_rows, dtype=torch.float64)
    return w.scatter_add_(1, draws, torch.ones_like(w))


def _t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def row_metrics(site: dict, sae: dict, d_sae: int, w: torch.Tensor, w_steer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric of one SAE under row weights ``w`` [B, R] (``w_steer`` [B, R_steer] for steering), from
    the per-row sums of ``eval_rows.json``; all-ones weights give the aggregates."""
    ce_clean, ce_zero, ce_mean = (w @ _t(site[k]) for k in ("ce_clean", "ce_zero", "ce_mean"))
    ce_spl = w @ _t(sae["ce_spliced"])
    n_tok = w @ _t(site["n_tok"])
    total_var = w @ _t(site["x_sq"]) - ((w @ _t(site["row_sum_gram"])) * w).sum(1) / n_tok
    fires = torch.zeros(len(sae["rare"]), w.shape[1], dtype=torch.float64)  # [rare latent, row]: fires there
    for i, rows in enumerate(sae["rare"].values()):
        fires[i, rows] = 1.0
    dead = float(sae["never_fired"]) + ((w @ fires.T) == 0).sum(1).double()
    return {
        "ce_recovered_zero": (ce_zero - ce_spl) / (ce_zero - ce_clean),
        "ce_recovered_mean": (ce_mean - ce_spl) / (ce_mean - ce_clean),
        "kl_spliced": (w @ _t(sae["kl"])) / (w @ _t(site["n_pred"])),
        "fvu": (w @ _t(sae["sq_err"])) / total_var,
        "dead_fraction": dead / d_sae,
        "steering": (w_steer @ _t(sae["steer"])) / (w_steer @ _t(sae["steer_n"])),
    }


def run_key(layer: int, k: int, seed: int, rule: str, beta: float | None) -> str:
    return f"L{layer}_k{k}_s{seed}_{rule}" + ("" if beta is None else f"_b{beta:g}")


def paired(results: dict, rows: dict | None, n_boot: int = 2000, boot_seed: int = 0) -> list[dict]:
    """One entry per (layer, k, beta, metric): per-seed TopK, g-SAE and difference, their means, the
    t-interval, and the paired-bootstrap interval (when ``rows`` is given)."""
    runs = {run_key(r["layer"], r["k"], r["seed"], r["rule"], r["beta"]): r for r in results["runs"]}
    cells = sorted({(r["layer"], r["k"], r["beta"]) for r in results["runs"] if r["rule"] == "gsae"})
    out = []
    for layer, k, beta in cells:
        seeds = sorted(r["seed"] for r in results["runs"] if (r["layer"], r["k"], r["rule"], r["beta"]) ==
                       (layer, k, "gsae", beta) and run_key(layer, k, r["seed"], "topk", None) in runs)
        pairs = [(runs[run_key(layer, k, s, "topk", None)], runs[run_key(layer, k, s, "gsae", beta)]) for s in seeds]
        boot = _bootstrap(rows, layer, pairs, n_boot, boot_seed) if rows is not None else {}
        for key, *_ in METRICS:
            diffs = [g[key] - t[key] for t, g in pairs]
            entry = {"layer": layer, "k": k, "beta": beta, "metric": key, "seeds": seeds,
                     "topk": [t[key] for t, _ in pairs], "gsae": [g[key] for _, g in pairs], "diff": diffs,
                     "topk_mean": statistics.fmean(t[key] for t, _ in pairs), "diff_mean": statistics.fmean(diffs)}
            if len(diffs) >= 2:
                iv = t_interval(diffs)
                entry["t95"] = [iv.lo, iv.hi]
            if key in boot:
                entry["boot95"] = boot[key]
            out.append(entry)
    return out


def _bootstrap(rows: dict, layer: int, pairs: list[tuple[dict, dict]], n_boot: int, seed: int) -> dict:
    site = rows["sites"][str(layer)]
    w = bootstrap_weights(len(site["n_tok"]), n_boot, seed)
    w_steer = bootstrap_weights(len(rows["saes"][pairs[0][0]["key"]]["steer"]), n_boot, seed + 1)
    diff: dict[str, torch.Tensor] = {}
    for t, g in pairs:
        mt, mg = (row_metrics(site, rows["saes"][r["key"]], r["d_sae"], w, w_steer) for r in (t, g))
        for key in (k for k in mt if k not in NOT_BOOTSTRAPPED):
            diff[key] = diff.get(key, 0) + (mg[key] - mt[key]) / len(pairs)
    return {key: [float(v.quantile(0.025)), float(v.quantile(0.975))] for key, v in diff.items()}


def _fmt(v: float) -> str:
    return f"{v:+.3f}".replace("+0.000", "0.000").replace("-0.000", "0.000")


def table(entries: list[dict], interval: str = "t95") -> str:
    """Markdown: per (layer, k, metric) the TopK mean, then per beta the mean paired difference with its
    interval (``t95`` or ``boot95``), in the units of :data:`METRICS` (differences of percentages are
    percentage points); ``*`` marks an interval that excludes 0."""
    betas = sorted({e["beta"] for e in entries})
    by = {(e["layer"], e["k"], e["metric"], e["beta"]): e for e in entries}
    head = "| layer | k | metric (unit) | TopK | " + " | ".join(f"beta={b:g}: g-SAE - TopK" for b in betas) + " |"
    lines = [head, "|" + "---|" * (4 + len(betas))]
    for layer, k in sorted({(e["layer"], e["k"]) for e in entries}):
        for key, label, scale, unit in METRICS:
            row = [e for b in betas if (e := by.get((layer, k, key, b)))]
            cells = []
            for b in betas:
                e = by.get((layer, k, key, b))
                if e is None or interval not in e:
                    why = "not bootstrapped" if interval == "boot95" and key in NOT_BOOTSTRAPPED else "no interval"
                    cells.append("n/a" if e is None else f"{_fmt(scale * e['diff_mean'])} ({why})")
                    continue
                lo, hi = e[interval]
                star = "*" if lo > 0 or hi < 0 else ""
                cells.append(f"{_fmt(scale * e['diff_mean'])} [{_fmt(scale * lo)}, {_fmt(scale * hi)}]{star}")
            lines.append(f"| {layer} | {k} | {label} ({unit}) | {scale * row[0]['topk_mean']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def figure(entries: list[dict], path: Path) -> Path | None:
    """Paired difference against beta, one panel per metric, one trace per (layer, k), t-interval error bars.
    Writes HTML (plotly.js from the CDN) and a PNG when kaleido is installed; returns the PNG path or None."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=3, subplot_titles=[f"{label} ({unit})" for _, label, _, unit in METRICS])
    groups = sorted({(e["layer"], e["k"]) for e in entries})
    betas = sorted({e["beta"] for e in entries})  # the log axis is ticked at the betas themselves
    for gi, (layer, k) in enumerate(groups):
        for mi, (key, _, scale, _) in enumerate(METRICS):
            es = sorted((e for e in entries if (e["layer"], e["k"], e["metric"]) == (layer, k, key)),
                        key=lambda e: e["beta"])
            x = [e["beta"] * (1 + 0.04 * (gi - len(groups) / 2)) for e in es]  # spread the traces apart
            y = [scale * e["diff_mean"] for e in es]
            err = {"type": "data", "symmetric": False,
                   "array": [scale * (e["t95"][1] - e["diff_mean"]) for e in es if "t95" in e],
                   "arrayminus": [scale * (e["diff_mean"] - e["t95"][0]) for e in es if "t95" in e]}
            fig.add_trace(go.Scatter(x=x, y=y, error_y=err if all("t95" in e for e in es) else None,
                                     mode="markers+lines", name=f"layer {layer}, k={k}", legendgroup=f"{layer}-{k}",
                                     showlegend=mi == 0, marker={"color": _PALETTE[gi % len(_PALETTE)]}),
                          row=mi // 3 + 1, col=mi % 3 + 1)
    for mi in range(len(METRICS)):
        fig.add_hline(y=0, line_dash="dot", line_color="grey", row=mi // 3 + 1, col=mi % 3 + 1)
        fig.update_xaxes(type="log", title_text="beta", tickvals=betas, ticktext=[f"{b:g}" for b in betas],
                         row=mi // 3 + 1, col=mi % 3 + 1)
    fig.update_layout(title="g-SAE minus TopK (paired by layer, k, seed): mean over seeds, 95% t-interval",
                      height=750, width=1300)
    write_text(path, fig.to_html(include_plotlyjs="cdn"))
    png = path.with_suffix(".png")
    try:
        image = fig.to_image(format="png")
    except Exception:  # kaleido (and a browser for it) is optional; the HTML is the figure
        return None
    write_bytes(png, image)
    return png
