"""The figures of a feature's dashboard page, and the DFA-by-source numbers behind two of them.

* :func:`example_dfa`: DFA by head and source position of a feature at each of its top examples
  (:func:`~.dfa.dfa_by_source` on the row as the model saw it);
* :func:`source_profile`: those examples aggregated by *relative* source position (the token itself, one
  back, ...; the start token and everything further back in their own columns), averaged over the
  examples: where the feature's heads read from in general, not only on its top example;
* plotly figures for head shares, the activation histogram (log axis with ticks at 1-2-5 steps, each
  labelled with its value), logit effects, the top example's DFA and the source profile. They carry a
  minimal template (a few hundred bytes instead of plotly_white's 7 kB per figure).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float

from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import model_spec

from ._common import decode_token
from .dfa import dfa_by_source
from .features import Example, FeatureStats

#: Layout shared by every figure (white background, light grid), small enough to repeat on every page.
TEMPLATE = {"layout": {"paper_bgcolor": "white", "plot_bgcolor": "white", "font": {"size": 12},
                       "xaxis": {"gridcolor": "#ebf0f8", "zerolinecolor": "#ebf0f8"},
                       "yaxis": {"gridcolor": "#ebf0f8", "zerolinecolor": "#ebf0f8"}}}


def tok_text(tokenizer, t: int) -> str:
    """A token for display: decoded, newlines as a return sign, nothing for window padding (-1)."""
    return "" if t < 0 else decode_token(tokenizer, t).replace("\n", "\u23ce")


def short(values, digits: int = 5):
    """Values rounded to ``digits`` significant digits for plotting (hover labels show 4)."""
    if isinstance(values, list):
        return [short(v, digits) for v in values]
    return float(f"{float(values):.{digits}g}")


class Figures:
    """Plotly figures of one page; the first carries plotly.js when it is inlined."""

    def __init__(self, plotlyjs: str):
        self.plotlyjs = plotlyjs
        self.first = True

    def html(self, fig) -> str:
        import plotly.graph_objects as go

        include = self.plotlyjs == "inline" and self.first
        self.first = False
        fig.layout.template = go.layout.Template(TEMPLATE)  # assigned, not merged into plotly's default template
        fig.update_layout(margin=dict(l=50, r=20, t=50, b=40), autosize=True)
        return fig.to_html(full_html=False, include_plotlyjs=include, config={"displaylogo": False, "responsive": True},
                           default_height=f"{fig.layout.height or 300}px")


def log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Tick values and labels for a log axis over ``[lo, hi]``: 1, 2, 5 times powers of ten (every integer
    multiple when that gives fewer than three; the ends and middle, to 3 digits where that stays inside, when even that gives fewer
    than two), each labelled with its own value (``0.2``, ``5``, ``1000``)."""
    if not (lo > 0 and hi >= lo):
        raise ValueError(f"a log axis needs 0 < lo <= hi, got lo={lo}, hi={hi}")
    d0, d1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1, 2, 5), tuple(range(1, 10))):
        vals = [m * 10.0**d for d in range(d0, d1 + 1) for m in mults if lo <= m * 10.0**d * (1 + 1e-9)
                and m * 10.0**d <= hi * (1 + 1e-9)]
        if len(vals) >= 3:
            break
    if len(vals) < 2:  # the range lies inside one integer step: its ends and (geometric) middle
        vals = [lo, math.sqrt(lo * hi), hi] if hi > lo else [lo]
        vals = [next((r for d in (3, 4, 5, 6) if lo <= (r := float(f"{v:.{d}g}")) <= hi), v) for v in vals]
    vals = [float(f"{v:.6g}") for v in vals]
    return vals, [f"{v:g}" for v in vals]


def histogram_figure(stats: FeatureStats, feature: int):
    """Activation histogram on the statistics' log-spaced bins, or None when the feature never fired."""
    import plotly.graph_objects as go

    centres, counts = stats.histogram(feature)
    nz = (counts > 0).nonzero()[:, 0]
    if not len(nz):
        return None
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    edges = stats.hist_edges
    x0, x1 = float(edges[lo]), float(edges[hi])
    vals, labels = log_ticks(x0, x1)
    fig = go.Figure(go.Scatter(x=short(centres[lo:hi].tolist()), y=counts[lo:hi].tolist(), mode="lines", line_shape="hvh",
                               fill="tozeroy", line_color="#f58518"))
    fig.update_layout(title="Activation histogram (non-zero, log-spaced bins)", height=280, yaxis=dict(title="tokens"),
                      xaxis=dict(type="log", title="activation", tickvals=vals, ticktext=labels,
                                 range=[math.log10(x0), math.log10(x1)]))
    return fig


def head_share_figure(shares: Sequence[float]):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[f"H{h}" for h in range(len(shares))], y=short(list(shares)), marker_color="#4c78a8"))
    fig.update_layout(title="Decoder-norm share per head", height=280, yaxis=dict(range=[0, 1]))
    return fig


def logit_figure(tokenizer, eff, n: int):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names_top = [repr(tok_text(tokenizer, int(t))) for t in eff.top_tokens[0]]
    names_bot = [repr(tok_text(tokenizer, int(t))) for t in eff.bottom_tokens[0]]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("top logits", "bottom logits"), horizontal_spacing=0.25)
    fig.add_trace(go.Bar(y=names_top[::-1], x=short(eff.top_values[0].tolist()[::-1]), orientation="h",
                         marker_color="#54a24b"), row=1, col=1)
    fig.add_trace(go.Bar(y=names_bot[::-1], x=short(eff.bottom_values[0].tolist()[::-1]), orientation="h",
                         marker_color="#e45756"), row=1, col=2)
    fig.update_layout(title="Direct logit effect", height=90 + 22 * n, showlegend=False)
    return fig


class ExampleDFA(NamedTuple):
    """DFA of one feature at one top example."""

    example: Example
    tokens: list[int]
    """The tokens the model read (the row, or the re-framed window when the rows were not kept)."""
    q: int
    """The example's position in ``tokens``."""
    by_source: Float[torch.Tensor, "n_heads n_src"]
    """``DFA_{h,s}`` at ``q`` for every source the token can attend to (causal: s <= q)."""
    pre: float
    by_head: Float[torch.Tensor, " n_heads"]
    windowed: bool
    """True when only the stored context window was re-run (attention saw less than it did)."""


@torch.no_grad()
def example_dfa(model, sae: SAE, site: Site, stats: FeatureStats, feature: int,
                examples: Sequence[Example]) -> list[ExampleDFA]:
    """:class:`ExampleDFA` for each example: one :func:`~.dfa.dfa_by_source` call per row (examples of one
    row share it; causal rows are cut after the last example's token)."""
    spec = model_spec(model)
    encoder = spec.kind == "encoder"
    out: dict[int, ExampleDFA] = {}
    if stats.rows is not None:  # the rows as the model saw them
        by_row: dict[int, list[int]] = {}
        for i, ex in enumerate(examples):
            by_row.setdefault(ex.row, []).append(i)
        for row, members in by_row.items():
            end = stats.rows.shape[1] if encoder else max(examples[i].pos for i in members) + 1
            tokens = stats.rows[row, :end]
            res = dfa_by_source(model, sae, tokens, [feature], site)
            for i in members:
                q = examples[i].pos
                n_src = end if encoder else q + 1
                out[i] = ExampleDFA(examples[i], tokens.tolist(), q, res.by_source[0, q, :, :n_src, 0].cpu(),
                                    float(res.pre[0, q, 0]), res.by_head[0, q, :, 0].cpu(), False)
    else:  # only the stored window: re-run it framed by the policy
        policy = spec.tokens
        for i, ex in enumerate(examples):
            window = [t for t in (ex.tokens if encoder else ex.tokens[: ex.center + 1]) if t >= 0 and t not in policy.special]
            tokens = policy.wrap(window)
            q = ex.center - sum(1 for t in ex.tokens[: ex.center] if t < 0 or t in policy.special) + int(policy.start is not None)
            res = dfa_by_source(model, sae, torch.tensor(tokens), [feature], site)
            n_src = len(tokens) if encoder else q + 1
            out[i] = ExampleDFA(ex, tokens, q, res.by_source[0, q, :, :n_src, 0].cpu(), float(res.pre[0, q, 0]),
                                res.by_head[0, q, :, 0].cpu(), True)
    return [out[i] for i in range(len(examples))]


class SourceProfile(NamedTuple):
    """DFA by head and relative source position, averaged over examples."""

    labels: list[str]
    """Columns: ``start`` (the policy's start token, where it has one), ``<=-{W+1}`` (further back), ``-W`` ..
    ``-1``, ``self``; and for encoders ``+1`` .. ``+W``, ``>=+{W+1}``."""
    values: Float[torch.Tensor, "n_heads bins"]
    """Mean over the examples of the DFA from the sources in each column; rows sum to ``by_head``."""
    by_head: Float[torch.Tensor, " n_heads"]
    """Mean DFA by head over the examples."""
    n_examples: int


def source_profile(dfas: Sequence[ExampleDFA], start_token: int | None, encoder: bool, max_offset: int = 16) -> SourceProfile:
    """Aggregate :func:`example_dfa` results by source position relative to each example's token."""
    W = max_offset
    labels = (["start"] if start_token is not None else []) + [f"\u2264-{W + 1}"] + [str(o) for o in range(-W, 0)] + ["self"]
    if encoder:
        labels += [f"+{o}" for o in range(1, W + 1)] + [f"\u2265+{W + 1}"]
    col = {lab: i for i, lab in enumerate(labels)}
    n_heads = dfas[0].by_source.shape[0] if dfas else 0
    total = torch.zeros(n_heads, len(labels), dtype=torch.float64)
    for d in dfas:
        for s in range(d.by_source.shape[1]):
            off = s - d.q
            if start_token is not None and s == 0 and d.tokens[0] == start_token:
                j = col["start"]
            elif off == 0:
                j = col["self"]
            elif off < -W:
                j = col[f"\u2264-{W + 1}"]
            elif off > W:
                j = col[f"\u2265+{W + 1}"]
            else:
                j = col[str(off) if off < 0 else f"+{off}"]
            total[:, j] += d.by_source[:, s].double()
    n = max(1, len(dfas))
    by_head = sum((d.by_head.double() for d in dfas), torch.zeros(n_heads, dtype=torch.float64)) / n
    return SourceProfile(labels, (total / n).float(), by_head.float(), len(dfas))


def dfa_top_figure(tokenizer, d: ExampleDFA):
    import plotly.graph_objects as go

    src = d.by_source
    labels = [f"{i}:{tok_text(tokenizer, int(t))}" for i, t in enumerate(d.tokens[: src.shape[1]])]
    fig = go.Figure(go.Heatmap(  # RdBu_r: red is positive, as in the explorer
        z=short(src.tolist(), 4), x=labels, y=[f"H{h}" for h in range(src.shape[0])], colorscale="RdBu_r", zmid=0,
        hovertemplate="head %{y}<br>source %{x}<br>DFA %{z:.4g}<extra></extra>",
    ))
    note = " (context window only)" if d.windowed else ""
    fig.update_layout(title=f"DFA by head and source position, top example{note}", height=160 + 24 * src.shape[0],
                      xaxis=dict(tickangle=-60, tickfont=dict(size=9), automargin=True))
    return fig


def source_profile_figure(p: SourceProfile):
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(
        z=short(p.values.tolist(), 4), x=p.labels, y=[f"H{h}" for h in range(p.values.shape[0])], colorscale="RdBu_r",
        zmid=0, hovertemplate="head %{y}<br>source %{x}<br>mean DFA %{z:.4g}<extra></extra>",
    ))
    fig.update_layout(title=f"DFA by relative source position, mean over the top {p.n_examples} examples",
                      height=160 + 24 * p.values.shape[0], xaxis=dict(type="category", tickangle=-60, tickfont=dict(size=9)))
    return fig
