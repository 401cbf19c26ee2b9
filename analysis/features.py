"""Feature statistics over a token budget, streamed in bounded memory.

Per feature, one pass over the tokens keeps (memory O(d_sae * (n_top + n_samples) * window), independent of
the number of tokens):

* the top ``n_top`` activating examples with their context window (a running top-N, merged batch by batch),
  at most one per stretch of ``separation`` tokens of a row: a token counts only if it is the largest
  activation of its row within ``separation - 1`` tokens either side (ties: the first), so overlapping
  windows around one burst of activity, which would repeat the same text, are one example;
* a uniform sample of ``n_samples`` firing examples (bottom-k sampling by a random key: a reservoir without
  a Python heap), from which :meth:`FeatureStats.quantile_examples` draws examples at every activation level,
  as in Anthropic's feature dashboards (Bricken et al. 2023) and Kissane et al. (2024);
* firing count (density), activation sum and maximum, and a histogram on fixed log-spaced bins.

Each feature's logit effects are :mod:`.logits`' (re-exported here, where they were first defined).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float, Int

from sae_lens_attn.activations import harvest
from sae_lens_attn.errors import InputError
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import model_spec

from ._common import FeatureIds, decode_token, feature_ids, sae_site
from .logits import LogitEffects, logit_effects, logit_weights  # noqa: F401  (their old home)

#: Histogram bin edges: 10 per decade from 1e-4 to 1e3; activations outside land in the end bins.
HIST_EDGES = torch.logspace(-4, 3, 71)


@dataclass
class StatsConfig:
    """What :func:`feature_stats` keeps per feature."""

    n_top: int = 20
    """Top-activating examples kept per feature."""
    n_samples: int = 64
    """Uniformly sampled firing examples kept per feature (for quantile examples)."""
    ctx_left: int = 12
    """Tokens of context kept before the example's token."""
    ctx_right: int = 4
    """Tokens of context kept after it."""
    batch_rows: int = 16
    """Rows per model forward pass."""
    seed: int = 0
    """Seeds the sampling keys."""
    min_separation: int | None = None
    """Top examples from one row are at least this many tokens apart (of two closer ones the smaller is
    dropped); None: half the context window, so two top examples share less than half their windows;
    1 keeps every position."""

    def __post_init__(self) -> None:
        for name in ("n_top", "n_samples", "batch_rows"):
            if getattr(self, name) <= 0:
                raise InputError(f"StatsConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("ctx_left", "ctx_right"):
            if getattr(self, name) < 0:
                raise InputError(f"StatsConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.min_separation is not None and self.min_separation < 1:
            raise InputError(f"StatsConfig.min_separation must be >= 1 (or None), got {self.min_separation}")

    @property
    def window(self) -> int:
        return self.ctx_left + 1 + self.ctx_right

    @property
    def separation(self) -> int:
        """:attr:`min_separation`, or half the window (rounded up) when it is None."""
        return self.min_separation if self.min_separation is not None else (self.window + 1) // 2


def row_maxima(key: Float[torch.Tensor, "b pos f"], separation: int) -> Float[torch.Tensor, "b pos f"]:
    """``key`` with every entry set to -inf that is not the first maximum of its row within
    ``separation - 1`` positions either side (non-maximum suppression along each row)."""
    radius = separation - 1
    if radius <= 0:
        return key
    k = key.permute(0, 2, 1)  # [b, f, pos]: one 1-D signal per row and feature
    # max_pool1d keeps the first of equal maxima, so of two tied neighbours exactly one survives
    _, arg = torch.nn.functional.max_pool1d(k, 2 * radius + 1, stride=1, padding=radius, return_indices=True)
    own = torch.arange(k.shape[-1], device=k.device)
    return k.masked_fill(arg != own, float("-inf")).permute(0, 2, 1)


class Example(NamedTuple):
    """One activating token with its context."""

    feature: int
    activation: float
    row: int
    """Row of the token rows given to :func:`feature_stats`."""
    pos: int
    """Position of the token in its row."""
    tokens: list[int]
    """Context window token ids (-1 where the window runs off the row)."""
    acts: list[float]
    """The feature's activation on each window token."""
    center: int
    """Index of the example's token inside the window."""


class _Pool(NamedTuple):
    """Running top-N per feature by ``key``: the example's value, row, position and context."""

    key: torch.Tensor  # [F, N]
    value: torch.Tensor  # [F, N]
    row: torch.Tensor  # [F, N]
    pos: torch.Tensor  # [F, N]
    tokens: torch.Tensor  # [F, N, W]
    acts: torch.Tensor  # [F, N, W]


def _empty_pool(n_feat: int, n: int, window: int) -> _Pool:
    return _Pool(
        torch.full((n_feat, n), float("-inf")),
        torch.zeros(n_feat, n),
        torch.full((n_feat, n), -1, dtype=torch.long),
        torch.full((n_feat, n), -1, dtype=torch.long),
        torch.full((n_feat, n, window), -1, dtype=torch.long),
        torch.zeros(n_feat, n, window),
    )


def _merge(pool: _Pool, key: torch.Tensor, acts: torch.Tensor, tok_pad: torch.Tensor, act_pad: torch.Tensor,
           row0: int, cfg: StatsConfig) -> _Pool:
    """Merge one batch into the pool. key/acts: [tokens, F] for the batch's flattened [b*pos] tokens."""
    n = pool.key.shape[1]
    n_tok, n_feat = key.shape
    k = min(n, n_tok)
    cand_key, cand_idx = key.topk(k, dim=0)  # [k, F]
    cand_key, cand_idx = cand_key.T, cand_idx.T  # [F, k]
    seq = tok_pad.shape[1] - cfg.ctx_left - cfg.ctx_right
    r, p = cand_idx // seq, cand_idx % seq
    offs = torch.arange(cfg.window)
    win_tok = tok_pad[r[..., None], p[..., None] + offs]  # [F, k, W]
    fidx = torch.arange(n_feat)[:, None, None].expand_as(win_tok)
    win_act = act_pad[r[..., None], p[..., None] + offs, fidx]
    value = acts.gather(0, cand_idx.T).T
    all_key = torch.cat([pool.key, cand_key], 1)
    top_key, order = all_key.topk(n, dim=1)

    def pick(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        both = torch.cat([old, new], 1)
        idx = order.reshape(*order.shape, *([1] * (both.ndim - 2))).expand(-1, -1, *both.shape[2:])
        return both.gather(1, idx)

    return _Pool(top_key, pick(pool.value, value), pick(pool.row, r + row0), pick(pool.pos, p),
                 pick(pool.tokens, win_tok), pick(pool.acts, win_act))


@dataclass
class FeatureStats:
    """Streaming statistics of some SAE features over token rows (see :func:`feature_stats`)."""

    features: Int[torch.Tensor, " f"]
    site: Site
    n_tokens: int
    """Tokens counted (BOS positions excluded)."""
    fire_count: Int[torch.Tensor, " f"]
    act_sum: Float[torch.Tensor, " f"]
    max_act: Float[torch.Tensor, " f"]
    hist_counts: Int[torch.Tensor, "f bins"]
    hist_edges: Float[torch.Tensor, " edges"]
    top: _Pool
    samples: _Pool
    ctx_left: int
    """Context tokens before the example's token in each window (its index in the window)."""
    tokenizer: object = None
    rows: torch.Tensor | None = None
    """The token rows, when given as one tensor (dashboards re-run the top example's full prefix)."""

    @property
    def density(self) -> Float[torch.Tensor, " f"]:
        """Firing frequency per feature."""
        return self.fire_count.double().div(max(1, self.n_tokens)).float()

    @property
    def mean_act(self) -> Float[torch.Tensor, " f"]:
        """Mean activation when firing."""
        return self.act_sum / self.fire_count.clamp_min(1)

    def index(self, feature: int) -> int:
        hits = (self.features == int(feature)).nonzero()
        if not len(hits):
            raise KeyError(f"feature {feature} was not tracked (tracked: {len(self.features)} features)")
        return int(hits[0, 0])

    def _examples(self, pool: _Pool, feature: int) -> list[Example]:
        j = self.index(feature)
        keep = (pool.key[j] > float("-inf")) & (pool.value[j] > 0)
        out = [
            Example(int(feature), float(pool.value[j, n]), int(pool.row[j, n]), int(pool.pos[j, n]),
                    pool.tokens[j, n].tolist(), pool.acts[j, n].tolist(), self.ctx_left)
            for n in keep.nonzero()[:, 0].tolist()
        ]
        return out

    def top_examples(self, feature: int, n: int | None = None) -> list[Example]:
        """The top-activating examples of ``feature``, largest first."""
        return self._examples(self.top, feature)[:n]

    def sample_examples(self, feature: int) -> list[Example]:
        """A uniform sample of the feature's firing examples, by decreasing activation."""
        return sorted(self._examples(self.samples, feature), key=lambda e: -e.activation)

    def quantile_examples(self, feature: int, n_bins: int = 4, per_bin: int = 3) -> list[tuple[str, list[Example]]]:
        """Examples at every activation level: the sample split into ``n_bins`` equal-count activation bins,
        ``per_bin`` examples from each, highest bin first; each with a label like ``"0.12 - 0.45"``."""
        ex = self.sample_examples(feature)
        if not ex:
            return []
        bins = []
        size = max(1, -(-len(ex) // n_bins))
        for start in range(0, len(ex), size):
            group = ex[start : start + size]
            label = f"{group[-1].activation:.3g} - {group[0].activation:.3g}"
            step = max(1, len(group) // per_bin)
            bins.append((label, group[::step][:per_bin]))
        return bins

    def histogram(self, feature: int) -> tuple[Float[torch.Tensor, " bins"], Int[torch.Tensor, " bins"]]:
        """``(bin_centres, counts)`` of the feature's non-zero activations (geometric bin centres)."""
        e = self.hist_edges
        return (e[:-1] * e[1:]).sqrt(), self.hist_counts[self.index(feature)]

    def describe(self, feature: int, n: int = 3) -> str:
        """A few words about a feature: its most frequent top-activating tokens."""
        ex = self.top_examples(feature)
        if not ex or self.tokenizer is None:
            return ""
        counts: dict[int, int] = {}
        for e in ex:
            tok = e.tokens[e.center]
            counts[tok] = counts.get(tok, 0) + 1
        best = sorted(counts, key=lambda t: -counts[t])[:n]
        return "top tokens " + ", ".join(repr(decode_token(self.tokenizer, t)) for t in best)


def format_example(tokenizer, ex: Example, mark: str = "[[{}]]") -> str:
    """The example's context as text, its own token wrapped by ``mark`` (newlines shown as a return sign)."""
    parts = []
    for i, t in enumerate(ex.tokens):
        if t < 0:
            continue
        piece = decode_token(tokenizer, t).replace("\n", "\u23ce")
        parts.append(mark.format(piece) if i == ex.center else piece)
    return "".join(parts)


def _row_batches(rows: torch.Tensor | Iterable[torch.Tensor], batch_rows: int) -> Iterable[torch.Tensor]:
    if isinstance(rows, torch.Tensor):
        yield from rows.split(batch_rows)
    else:
        yield from rows


@torch.no_grad()
def feature_stats(
    model,
    sae: SAE,
    rows: Int[torch.Tensor, "rows pos"] | Iterable[Int[torch.Tensor, "batch pos"]],
    features: FeatureIds = None,
    site: Site | None = None,
    cfg: StatsConfig | None = None,
    max_tokens: int | None = None,
) -> FeatureStats:
    """Stream token ``rows`` (a tensor, or an iterable of row batches) through the model and the SAE.

    Stops at the first batch boundary after ``max_tokens`` tokens (all rows when None). BOS positions are
    skipped, as in training.
    """
    cfg = cfg or StatsConfig()
    site = sae_site(sae, site)
    sae.check_site(site, model.cfg)
    ids = feature_ids(features, sae.cfg.d_sae)
    n_feat = len(ids)
    gen = torch.Generator().manual_seed(cfg.seed)
    top = _empty_pool(n_feat, cfg.n_top, cfg.window)
    samples = _empty_pool(n_feat, cfg.n_samples, cfg.window)
    moments = _Moments(n_feat)
    policy = model_spec(model).tokens
    n_tokens, row0 = 0, 0
    for batch in _row_batches(rows, cfg.batch_rows):
        if max_tokens is not None and n_tokens >= max_tokens:
            break
        batch = batch.long().cpu()
        acts, text = _batch_acts(model, sae, site, ids, policy, batch)
        b, seq, _ = acts.shape
        n_tokens += int(text.sum())
        flat = acts.reshape(b * seq, n_feat)
        firing = flat > 0
        moments.add(flat, firing)
        top, samples = _merge_examples(top, samples, batch, acts, firing, row0, cfg, gen)
        row0 += b
    if n_tokens == 0:
        raise InputError("feature_stats saw no (non-BOS) tokens")
    stats = FeatureStats(
        ids, site, n_tokens, moments.fire, moments.act_sum.float(), moments.max_act,
        moments.hist.reshape(n_feat, moments.n_bins), HIST_EDGES.clone(), top, samples, cfg.ctx_left,
        model.tokenizer, rows if isinstance(rows, torch.Tensor) else None,
    )
    return stats


def _batch_acts(model, sae: SAE, site: Site, ids: torch.Tensor, policy, batch: torch.Tensor):
    """The tracked features' activations on ``batch`` ([b, pos, F], zero on structural tokens) and the mask
    of text tokens."""
    h = harvest(model, batch, [site], drop_bos=False)
    x = h.acts[site].to(sae.W_enc.device, sae.W_enc.dtype)
    acts = sae.encode(x)[..., ids.to(x.device)].float().cpu()  # [b, pos, F]
    text = policy.keep(batch)
    return acts.masked_fill(~text[..., None], 0.0), text


class _Moments:
    """Per feature: tokens it fires on, the sum and maximum of its activation, and their histogram."""

    def __init__(self, n_feat: int):
        self.n_bins = len(HIST_EDGES) - 1
        self.fire = torch.zeros(n_feat, dtype=torch.long)
        self.act_sum = torch.zeros(n_feat, dtype=torch.float64)
        self.max_act = torch.zeros(n_feat)
        self.hist = torch.zeros(n_feat * self.n_bins, dtype=torch.long)

    def add(self, flat: torch.Tensor, firing: torch.Tensor) -> None:
        self.fire += firing.sum(0)
        self.act_sum += flat.double().sum(0)
        self.max_act = torch.maximum(self.max_act, flat.max(0).values)
        tok_idx, f_idx = firing.nonzero(as_tuple=True)
        bins = (torch.bucketize(flat[tok_idx, f_idx], HIST_EDGES) - 1).clamp(0, self.n_bins - 1)
        self.hist.index_add_(0, f_idx * self.n_bins + bins, torch.ones_like(bins))


def _merge_examples(top, samples, batch: torch.Tensor, acts: torch.Tensor, firing: torch.Tensor, row0: int,
                    cfg: StatsConfig, gen: torch.Generator):
    """The pools after this batch: top examples by activation (separated within a row), and a uniform sample
    of the firing tokens (random keys)."""
    b, seq, n_feat = acts.shape
    flat = acts.reshape(b * seq, n_feat)
    tok_pad = torch.nn.functional.pad(batch, (cfg.ctx_left, cfg.ctx_right), value=-1)
    act_pad = torch.nn.functional.pad(acts, (0, 0, cfg.ctx_left, cfg.ctx_right))
    key_top = row_maxima(acts.masked_fill(acts <= 0, float("-inf")), cfg.separation).reshape(b * seq, n_feat)
    top = _merge(top, key_top, flat, tok_pad, act_pad, row0, cfg)
    key_rand = torch.rand(flat.shape, generator=gen).masked_fill(~firing, float("-inf"))
    samples = _merge(samples, key_rand, flat, tok_pad, act_pad, row0, cfg)
    return top, samples
