"""Feature dashboards: one self-contained HTML page per feature and an index page, opened from file://.

Each page shows what Kissane et al. (2024) put on theirs: top-activating examples with tokens coloured by
activation, examples at every activation level, DFA by head and source position for the top example, the
head shares of the decoder (hook_z SAEs), the activation histogram, and the top and bottom logits. Plotly's
JavaScript is inlined once per page (``plotlyjs="inline"``, the default: the page needs nothing else), or
written once next to the pages (``plotlyjs="file"``: much smaller pages, the folder must stay together).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sae_lens_attn.files import ensure_dir, write_json, write_text
from sae_lens_attn.models import model_name
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import UnsupportedModelError, model_spec

from ._common import decode_token, sae_site
from .dfa import dfa_by_source
from .features import Example, FeatureStats, logit_effects
from .heads import head_shares

PlotlyJS = Literal["inline", "file"]
PLOTLY_FILE = "plotly.min.js"

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px 0; } h2 { font-size: 17px; margin: 22px 0 8px 0; }
.meta { color: #555; font-size: 14px; }
/* explicit grid tracks: a card's width is known before the figures after it exist, so plotly sizes it right */
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 12px; }
@media (max-width: 900px) { .grid { grid-template-columns: minmax(0, 1fr); } }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; overflow: hidden; }
.ex { font-family: ui-monospace, Menlo, monospace; font-size: 13px; padding: 3px 0; border-bottom: 1px solid #eee;
      white-space: pre-wrap; }
.ex .val { display: inline-block; width: 64px; color: #666; }
.tok { border-radius: 2px; } .tok.center { outline: 1.5px solid #c0392b; }
table { border-collapse: collapse; font-size: 14px; } td, th { padding: 4px 10px; border-bottom: 1px solid #eee; text-align: left; }
th { background: #f4f4f4; } a { color: #1f5fa8; }
"""


@dataclass
class DashboardConfig:
    """What goes on each page."""

    n_top: int = 12
    """Top-activating examples shown."""
    n_bins: int = 4
    """Activation-level bins of sampled examples."""
    per_bin: int = 3
    """Examples per bin."""
    n_logits: int = 10
    """Top and bottom logit tokens shown."""
    plotlyjs: PlotlyJS = "inline"
    """``inline``: plotly.js inside every page (self-contained); ``file``: one plotly.min.js beside the pages."""

    def __post_init__(self) -> None:
        if self.plotlyjs not in ("inline", "file"):
            raise ValueError(f"DashboardConfig.plotlyjs must be 'inline' or 'file', got {self.plotlyjs!r}")


@dataclass
class DashboardFiles:
    index: Path
    pages: dict[int, Path] = field(default_factory=dict)


def _tok_text(tokenizer, t: int) -> str:
    if t < 0:
        return ""
    s = decode_token(tokenizer, t)
    return s.replace("\n", "\u23ce")


def _example_html(tokenizer, ex: Example, vmax: float) -> str:
    spans = []
    for i, (t, a) in enumerate(zip(ex.tokens, ex.acts)):
        if t < 0:
            continue
        alpha = 0.0 if vmax <= 0 else max(0.0, min(1.0, a / vmax))
        cls = "tok center" if i == ex.center else "tok"
        spans.append(
            f'<span class="{cls}" style="background: rgba(255,120,0,{alpha:.3f})" title="{a:.4g}">'
            f"{html.escape(_tok_text(tokenizer, t))}</span>"
        )
    return f'<div class="ex"><span class="val">{ex.activation:.3g}</span>{"".join(spans)}</div>'


class _Figures:
    """Plotly figures of one page; the first carries plotly.js when it is inlined."""

    def __init__(self, plotlyjs: PlotlyJS):
        self.plotlyjs = plotlyjs
        self.first = True

    def html(self, fig) -> str:
        include = self.plotlyjs == "inline" and self.first
        self.first = False
        fig.update_layout(margin=dict(l=50, r=20, t=50, b=40), template="plotly_white", autosize=True)
        return fig.to_html(full_html=False, include_plotlyjs=include, config={"displaylogo": False, "responsive": True},
                           default_height=f"{fig.layout.height or 300}px")


def _dfa_figure(model, sae: SAE, site: Site, stats: FeatureStats, feature: int, ex: Example):
    import plotly.graph_objects as go

    if stats.rows is not None:  # the row as the model saw it (all of it for an encoder, which sees ahead too)
        encoder = model_spec(model).kind == "encoder"
        tokens = stats.rows[ex.row] if encoder else stats.rows[ex.row, : ex.pos + 1]
        note = ""
        q = ex.pos
    else:  # only the stored window: re-run it framed by the policy (attention sees less context than it did)
        policy = model_spec(model).tokens
        window = [t for t in ex.tokens[: ex.center + 1] if t >= 0 and t not in policy.special]
        tokens = torch.tensor(policy.wrap(window))
        note = " (context window only)"
        q = len(window) - 1 + int(policy.start is not None)
    res = dfa_by_source(model, sae, tokens, [feature], site)
    n_src = tokens.shape[-1] if model_spec(model).kind == "encoder" else q + 1  # causal: no source after q
    src = res.by_source[0, q, :, :n_src, 0].cpu()  # [head, k]
    labels = [f"{i}:{_tok_text(model.tokenizer, int(t))}" for i, t in enumerate(tokens.tolist())]
    fig = go.Figure(go.Heatmap(
        z=src.tolist(), x=labels, y=[f"H{h}" for h in range(src.shape[0])], colorscale="RdBu", zmid=0,
        hovertemplate="head %{y}<br>source %{x}<br>DFA %{z:.4g}<extra></extra>",
    ))
    fig.update_layout(title=f"DFA by head and source position, top example{note}", height=160 + 24 * src.shape[0],
                      xaxis=dict(tickangle=-60, tickfont=dict(size=9), automargin=True))
    by_head = res.by_head[0, q, :, 0].cpu()
    return fig, float(res.pre[0, q, 0]), by_head


def feature_page(model, sae: SAE, stats: FeatureStats, feature: int, site: Site | None = None,
                 cfg: DashboardConfig | None = None) -> str:
    """The HTML of one feature's page."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cfg = cfg or DashboardConfig()
    site = sae_site(sae, site)
    tok = model.tokenizer
    j = stats.index(feature)
    figs = _Figures(cfg.plotlyjs)
    top = stats.top_examples(feature, cfg.n_top)
    vmax = float(stats.max_act[j])
    parts = [
        f"<h1>Feature {feature} &middot; {html.escape(site.label)}</h1>",
        f'<div class="meta">{html.escape(model_name(model))} &middot; {html.escape(site.hook_name)} &middot; density '
        f"{float(stats.density[j]):.3e} over {stats.n_tokens:,} tokens &middot; max activation {vmax:.4g} &middot; "
        f"mean when firing {float(stats.mean_act[j]):.4g}</div>",
    ]
    cards = []
    if site.kind == "z":
        shares = head_shares(sae, int(model.cfg.n_heads), site)[feature].cpu()
        fig = go.Figure(go.Bar(x=[f"H{h}" for h in range(len(shares))], y=shares.tolist(), marker_color="#4c78a8"))
        fig.update_layout(title="Decoder-norm share per head", height=280, yaxis=dict(range=[0, 1]))
        cards.append(figs.html(fig))
    centres, counts = stats.histogram(feature)
    nz = counts > 0
    if nz.any():
        lo, hi = int(nz.nonzero()[0]), int(nz.nonzero()[-1]) + 1
        fig = go.Figure(go.Scatter(x=centres[lo:hi].tolist(), y=counts[lo:hi].tolist(), mode="lines", line_shape="hvh",
                                   fill="tozeroy", line_color="#f58518"))
        fig.update_layout(title="Activation histogram (non-zero, log-spaced bins)", height=280,
                          xaxis=dict(type="log", title="activation"), yaxis=dict(title="tokens"))
        cards.append(figs.html(fig))
    try:
        eff = logit_effects(model, sae, [feature], site, k=cfg.n_logits)
    except UnsupportedModelError as err:  # encoders / post-norm models: no direct logit effect
        eff = None
        cards.append(f"<h3>Direct logit effect</h3><p class=\"meta\">not shown: {html.escape(str(err))}</p>")
    if eff is not None:
        names_top = [_tok_text(tok, int(t)) for t in eff.top_tokens[0]]
        names_bot = [_tok_text(tok, int(t)) for t in eff.bottom_tokens[0]]
        fig = make_subplots(rows=1, cols=2, subplot_titles=("top logits", "bottom logits"), horizontal_spacing=0.25)
        fig.add_trace(go.Bar(y=[repr(n) for n in names_top][::-1], x=eff.top_values[0].tolist()[::-1], orientation="h",
                             marker_color="#54a24b"), row=1, col=1)
        fig.add_trace(go.Bar(y=[repr(n) for n in names_bot][::-1], x=eff.bottom_values[0].tolist()[::-1], orientation="h",
                             marker_color="#e45756"), row=1, col=2)
        fig.update_layout(title="Direct logit effect", height=90 + 22 * cfg.n_logits, showlegend=False)
        cards.append(figs.html(fig))
    if top:
        fig, pre, by_head = _dfa_figure(model, sae, site, stats, feature, top[0])
        heads = ", ".join(f"H{h} {v:+.3g}" for h, v in enumerate(by_head.tolist()))
        cards.append(figs.html(fig) + f'<div class="meta">pre-activation {pre:.4g}; DFA by head: {heads}</div>')
    parts.append('<div class="grid">' + "".join(f'<div class="card">{c}</div>' for c in cards) + "</div>")
    parts.append("<h2>Top activations</h2>")
    parts += [_example_html(tok, ex, vmax) for ex in top] or ["<p>This feature never fired.</p>"]
    bins = stats.quantile_examples(feature, cfg.n_bins, cfg.per_bin)
    if bins:
        parts.append("<h2>Examples across activation levels (uniform sample of firing tokens)</h2>")
        for label, group in bins:
            parts.append(f'<div class="meta">activation {html.escape(label)}</div>')
            parts += [_example_html(tok, ex, vmax) for ex in group]
    return _document(f"Feature {feature} - {site.label}", "\n".join(parts), cfg.plotlyjs)


def _document(title: str, body: str, plotlyjs: PlotlyJS | None) -> str:
    head_js = f'<script src="{PLOTLY_FILE}"></script>' if plotlyjs == "file" else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style>{head_js}</head><body>\n{body}\n</body></html>\n"
    )


def index_page(model, sae: SAE, stats: FeatureStats, pages: dict[int, str], site: Site | None = None,
               extra: dict[str, dict[int, float]] | None = None) -> str:
    """The index: one row per feature with density, max activation, top head share and links."""
    site = sae_site(sae, site)
    shares = head_shares(sae, int(model.cfg.n_heads), site).cpu() if site.kind == "z" else None
    extra = extra or {}
    head = "<tr><th>feature</th><th>density</th><th>max act</th>"
    head += "<th>top head (share)</th>" if shares is not None else ""
    head += "".join(f"<th>{html.escape(k)}</th>" for k in extra) + "<th>top tokens</th></tr>"
    rows = []
    for feature, href in pages.items():
        j = stats.index(feature)
        cells = [f'<td><a href="{html.escape(href)}">{feature}</a></td>', f"<td>{float(stats.density[j]):.3e}</td>",
                 f"<td>{float(stats.max_act[j]):.4g}</td>"]
        if shares is not None:
            h = int(shares[feature].argmax())
            cells.append(f"<td>H{h} ({float(shares[feature, h]):.2f})</td>")
        for values in extra.values():
            v = values.get(feature, math.nan)
            cells.append(f"<td>{v:.3g}</td>")
        cells.append(f"<td>{html.escape(stats.describe(feature))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    body = (
        f"<h1>{html.escape(site.label)} features</h1>"
        f'<div class="meta">{html.escape(model_name(model))} &middot; {html.escape(site.hook_name)} &middot; '
        f"{stats.n_tokens:,} tokens &middot; {len(pages)} features</div>"
        f"<table>{head}{''.join(rows)}</table>"
    )
    return _document(f"{site.label} features", body, None)


def write_dashboards(
    model,
    sae: SAE,
    stats: FeatureStats,
    out_dir: str | Path,
    features: Sequence[int] | None = None,
    site: Site | None = None,
    cfg: DashboardConfig | None = None,
    extra: dict[str, dict[int, float]] | None = None,
) -> DashboardFiles:
    """Write ``feature_<i>.html`` for each feature (default: every tracked feature that fired) and
    ``index.html``; ``extra`` adds index columns (e.g. ``{"induction": {feature: score}}``)."""
    cfg = cfg or DashboardConfig()
    site = sae_site(sae, site)
    out = ensure_dir(out_dir)
    if features is None:
        features = [int(f) for f, c in zip(stats.features.tolist(), stats.fire_count.tolist()) if c > 0]
    if cfg.plotlyjs == "file":
        from plotly.offline import get_plotlyjs

        write_text(out / PLOTLY_FILE, get_plotlyjs())
    files = DashboardFiles(out / "index.html")
    for f in features:
        path = out / f"feature_{int(f)}.html"
        write_text(path, feature_page(model, sae, stats, int(f), site, cfg))
        files.pages[int(f)] = path
    write_text(files.index, index_page(model, sae, stats, {f: p.name for f, p in files.pages.items()}, site, extra))
    write_json(out / "features.json", {"site": site.label, "features": sorted(files.pages)}, indent=1)
    return files
