"""Feature dashboards: one HTML page per feature and a sortable, filterable index, opened from file://.

Each page shows what Kissane et al. (2024) put on theirs: top-activating examples with tokens coloured by
activation (overlapping windows of one row count once: :attr:`StatsConfig.min_separation`), examples at
every activation level, DFA by head and source position for the top example *and* averaged over the top
examples by relative source position, the head shares of the decoder (hook_z SAEs), the activation
histogram, the top and bottom logits, and why the top example's top head attends to its top source (its QK
attribution, :mod:`.qk`). Plotly's JavaScript is written once per folder
(``plotlyjs="file"``, the default: pages of tens of kB, the folder must stay together) or inlined in every
page (``plotlyjs="inline"``: each page stands alone, at about 5 MB).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae_lens_attn.errors import InputError
from sae_lens_attn.files import ensure_dir, write_json, write_text
from sae_lens_attn.models import model_name
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import UnsupportedModelError, model_spec

from ._common import sae_site
from .dashboard_figures import (
    Figures,
    dfa_top_figure,
    example_dfa,
    head_share_figure,
    histogram_figure,
    logit_figure,
    source_profile,
    source_profile_figure,
    tok_text,
)
from .dashboard_html import PLOTLY_FILE, PlotlyJS, document
from .dashboard_index import index_page
from .dashboard_select import default_features, induction_scores_or_none
from .features import Example, FeatureStats
from .heads import head_shares
from .logits import logit_effects
from .qk import qk_attribution

__all__ = ["PLOTLY_FILE", "DashboardConfig", "DashboardFiles", "default_features", "feature_page", "index_page",
           "write_dashboards"]

@dataclass
class DashboardConfig:
    """What goes on each page."""

    n_top: int = 12
    """Top-activating examples shown (and averaged over in the relative-source DFA figure)."""
    n_bins: int = 4
    """Activation-level bins of sampled examples."""
    per_bin: int = 3
    """Examples per bin."""
    n_logits: int = 10
    """Top and bottom logit tokens shown."""
    max_offset: int = 16
    """Relative source positions shown one by one in the averaged DFA figure (further back: one column)."""
    plotlyjs: PlotlyJS = "file"
    """``file``: one plotly.min.js beside the pages (small pages); ``inline``: plotly.js inside every page."""

    def __post_init__(self) -> None:
        if self.plotlyjs not in ("inline", "file"):
            raise InputError(f"DashboardConfig.plotlyjs must be 'inline' or 'file', got {self.plotlyjs!r}")
        for name in ("n_top", "max_offset"):
            if getattr(self, name) < 1:
                raise InputError(f"DashboardConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class DashboardFiles:
    index: Path
    pages: dict[int, Path] = field(default_factory=dict)


def _example_html(tokenizer, ex: Example, vmax: float) -> str:
    spans = []
    for i, (t, a) in enumerate(zip(ex.tokens, ex.acts)):
        if t < 0:
            continue
        alpha = 0.0 if vmax <= 0 else max(0.0, min(1.0, a / vmax))
        cls = ' class="tok center"' if i == ex.center else ""  # (other tokens: styled by `.ex span[title]`)
        spans.append(f'<span{cls} style="background:rgba(255,120,0,{alpha:.3f})" title="{a:.4g}">'
                     f"{html.escape(tok_text(tokenizer, t))}</span>")
    return f'<div class="ex"><span class="val">{ex.activation:.3g}</span>{"".join(spans)}</div>'


def _dfa_cards(model, sae: SAE, site: Site, stats: FeatureStats, feature: int, top: list[Example], figs: Figures,
               max_offset: int) -> list[str]:
    spec = model_spec(model)
    dfas = example_dfa(model, sae, site, stats, feature, top)
    first = dfas[0]
    heads = ", ".join(f"H{h} {v:+.3g}" for h, v in enumerate(first.by_head.tolist()))
    cards = [figs.html(dfa_top_figure(model.tokenizer, first))
             + f'<div class="meta">pre-activation {first.pre:.4g}; DFA by head: {heads}</div>']
    prof = source_profile(dfas, spec.tokens.start, spec.kind == "encoder", max_offset)
    mean = ", ".join(f"H{h} {v:+.3g}" for h, v in enumerate(prof.by_head.tolist()))
    windowed = " (context windows only)" if first.windowed else ""
    cards.append(figs.html(source_profile_figure(prof))
                 + f'<div class="meta">mean DFA by head over {prof.n_examples} examples{windowed}: {mean}</div>')
    cards.append(_qk_card(model, site, first))
    return cards


def _qk_card(model, site: Site, first) -> str:
    """Why the top example's top head (by DFA) attends to its top source: the largest terms of its QK
    attribution (:func:`~.qk.qk_attribution`), against the source that head attends to most otherwise."""
    head = int(first.by_head.argmax())
    source = int(first.by_source[head].argmax())
    esc, tok = html.escape, lambda p: html.escape(tok_text(model.tokenizer, first.tokens[p]))
    title = f"<h3>Why L{site.layer}H{head} attends from {first.q} &ldquo;{tok(first.q)}&rdquo; to {source} " \
            f"&ldquo;{tok(source)}&rdquo;: QK attribution</h3>"
    try:
        res = qk_attribution(model, torch.tensor([first.tokens]), site.layer, head, first.q, source)
    except ValueError as err:  # a refusal naming the family (UnsupportedModelError), or a masked source
        return title + f'<p class="meta">not shown: {esc(str(err))}</p>'
    rows = "".join(f"<tr><td>{esc(q)}</td><td>{esc(k)}</td><td>{v:+.4g}</td></tr>" for q, k, v in res.top_pairs(6))
    sides = [", ".join(f"{esc(n)} {v:+.3g}" for n, v in res.top(side, 4)) for side in ("query", "key")]
    own = f"{res.model_score:.4g}" if res.model_score is not None else "not exposed"
    text = (f'<div class="meta">score {res.score:.4g} = the sum of all pairs (the model\'s own: {own}); attention '
            f"{res.pattern[0]:.3g}{'; before the softcap' if res.softcap else ''}</div>"
            f"<table><tr><th>query term</th><th>key term</th><th>score part</th></tr>{rows}</table>"
            f'<div class="meta">query side: {sides[0]}<br>key side: {sides[1]}</div>')
    c = res.contrast
    if c is not None:
        keys = ", ".join(f"{esc(n)} {v:+.3g}" for n, v in c.top("key", 3))
        text += (f'<div class="meta">rather than {c.contrast_pos} &ldquo;{tok(c.contrast_pos)}&rdquo; (attention '
                 f"{c.pattern[1]:.3g}): score difference {c.score:+.4g}; key side {keys}</div>")
    return title + text


def feature_page(model, sae: SAE, stats: FeatureStats, feature: int, site: Site | None = None,
                 cfg: DashboardConfig | None = None) -> str:
    """The HTML of one feature's page."""
    cfg = cfg or DashboardConfig()
    site = sae_site(sae, site)
    tok = model.tokenizer
    j = stats.index(feature)
    figs = Figures(cfg.plotlyjs)
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
        cards.append(figs.html(head_share_figure(head_shares(sae, int(model.cfg.n_heads), site)[feature].tolist())))
    hist = histogram_figure(stats, feature)
    if hist is not None:
        cards.append(figs.html(hist))
    try:
        eff = logit_effects(model, sae, [feature], site, k=cfg.n_logits)
        cards.append(figs.html(logit_figure(tok, eff, cfg.n_logits)))
    except UnsupportedModelError as err:  # encoders / post-norm models: no direct logit effect
        cards.append(f"<h3>Direct logit effect</h3><p class=\"meta\">not shown: {html.escape(str(err))}</p>")
    if top:
        cards += _dfa_cards(model, sae, site, stats, feature, top, figs, cfg.max_offset)
    parts.append('<div class="grid">' + "".join(f'<div class="card">{c}</div>' for c in cards) + "</div>")
    parts.append("<h2>Top activations</h2>")
    parts += [_example_html(tok, ex, vmax) for ex in top] or ["<p>This feature never fired.</p>"]
    bins = stats.quantile_examples(feature, cfg.n_bins, cfg.per_bin)
    if bins:
        parts.append("<h2>Examples across activation levels (uniform sample of firing tokens)</h2>")
        for label, group in bins:
            parts.append(f'<div class="meta">activation {html.escape(label)}</div>')
            parts += [_example_html(tok, ex, vmax) for ex in group]
    return document(f"Feature {feature} - {site.label}", "\n".join(parts), cfg.plotlyjs)


def _write_plotly(out: Path) -> None:
    """plotly.min.js once per folder (rewritten only when the installed plotly's differs)."""
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    path = out / PLOTLY_FILE
    if not (path.exists() and path.stat().st_size == len(js.encode()) and path.read_text(encoding="utf-8") == js):
        write_text(path, js)


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
    """Write ``feature_<i>.html`` for each feature (default: :func:`default_features`: 20 at evenly spaced
    density quantiles, plus the 5 most induction-like where the model allows induction scores),
    ``index.html`` and ``features.json``; ``extra`` adds index columns (e.g. ``{"induction": {feature: score}}``)."""
    cfg = cfg or DashboardConfig()
    site = sae_site(sae, site)
    out = ensure_dir(out_dir)
    if features is None:
        features = default_features(stats, induction=induction_scores_or_none(model, sae, site, stats))
    if cfg.plotlyjs == "file":
        _write_plotly(out)
    files = DashboardFiles(out / "index.html")
    for f in features:
        path = out / f"feature_{int(f)}.html"
        write_text(path, feature_page(model, sae, stats, int(f), site, cfg))
        files.pages[int(f)] = path
    write_text(files.index, index_page(model, sae, stats, {f: p.name for f, p in files.pages.items()}, site, extra))
    write_json(out / "features.json", {"site": site.label, "features": sorted(files.pages)}, indent=1)
    return files
