"""Induction heads and induction features on repeated random tokens (Olsson et al. 2022; Kissane et al. 2024,
sections 4.2-4.3).

On ``[BOS, r, r]`` with r a random token sequence, a token in the second copy can be predicted by looking at
the token after its earlier occurrence. Per head, the induction score is the attention from each second-copy
token at t to position ``t - len + 1``; the previous-token score is the attention from t to t - 1. Per SAE
feature, the induction score is the share of its activation mass on second-copy tokens.

The prefix-length study separates long-prefix from short-prefix induction heads (Kissane et al. 2024,
section 4.3): the current token A occurred before, followed by B, and only the ``p`` tokens ending at A match
the earlier occurrence (p = 1: only A itself; p = 0: A is new). A short-prefix head attends from A to B already
at p = 1; a long-prefix head needs a long matching prefix. Positions are the same for every p, so only the
length of the match changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float, Int

from sae_lens_attn.errors import InputError
from sae_lens_attn.models import model_device
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import UnsupportedModelError, model_spec

from ._common import FeatureIds, feature_ids, run_cache, sae_site
from .dfa import dfa_by_source, head_fractions


def _special_ids(model) -> set[int]:
    tok = model.tokenizer
    ids = {getattr(tok, f"{n}_token_id", None) for n in ("bos", "eos", "pad", "unk")}
    ids |= set(getattr(tok, "all_special_ids", []) or [])
    return {int(i) for i in ids if i is not None}


def random_tokens(model, n_seq: int, length: int, seed: int = 0) -> Int[torch.Tensor, "n_seq length"]:
    """``n_seq`` rows of ``length`` distinct random non-special tokens."""
    vocab = int(model.cfg.d_vocab)
    allowed = torch.tensor(sorted(set(range(min(vocab, len(model.tokenizer)))) - _special_ids(model)))
    if length > len(allowed):
        raise InputError(f"length {length} exceeds the {len(allowed)} usable tokens of the vocabulary")
    g = torch.Generator().manual_seed(seed)
    return torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:length]] for _ in range(n_seq)])


def _start_token(model) -> int:
    policy = model_spec(model).tokens
    if policy.start is None:
        raise UnsupportedModelError(
            "induction scores index positions from a start token, and this model's tokenizer has neither a BOS, "
            "an EOS nor a CLS token"
        )
    return policy.start


def _frame(model, body: torch.Tensor) -> torch.Tensor:
    """``[start] body [end]`` per row, by the model's tokenization policy."""
    policy = model_spec(model).tokens
    start = torch.full((body.shape[0], 1), _start_token(model), dtype=torch.long)
    parts = [start, body] + ([torch.full_like(start, policy.end)] if policy.end is not None else [])
    return torch.cat(parts, dim=1)


def repeated_tokens(model, n_seq: int = 16, length: int = 32, seed: int = 0) -> Int[torch.Tensor, "n_seq seq"]:
    """``[BOS, r, r]`` rows (``[CLS, r, r, SEP]`` for encoders; seq = 1 + 2 * length (+ 1)), r without
    repeated tokens."""
    n_ctx = int(model.cfg.n_ctx)
    room = (n_ctx - model_spec(model).tokens.n_structural) // 2
    if length > room:
        raise InputError(f"a sequence of {length} tokens repeated twice does not fit the model's context of {n_ctx} "
                         f"tokens; use a length <= {room}")
    r = random_tokens(model, n_seq, length, seed)
    return _frame(model, torch.cat([r, r], dim=1))


def max_repeat_length(model, want: int = 32) -> int:
    """``want``, or less where the model's context cannot hold ``[start, r, r]`` of that length."""
    return max(1, min(want, (int(model.cfg.n_ctx) - model_spec(model).tokens.n_structural) // 2))


class HeadInductionScores(NamedTuple):
    """Per-head scores on repeated random tokens."""

    induction: Float[torch.Tensor, "n_layers n_heads"]
    """Mean attention from second-copy tokens at t to ``t - length + 1``."""
    previous_token: Float[torch.Tensor, "n_layers n_heads"]
    """Mean attention from t to t - 1 (all non-BOS positions)."""
    length: int


@torch.no_grad()
def head_induction_scores(model, n_seq: int = 16, length: int = 32, seed: int = 0,
                          tokens: Int[torch.Tensor, "n_seq seq"] | None = None) -> HeadInductionScores:
    """Induction and previous-token scores of every head (``tokens``: [BOS, r, r] rows, else made here)."""
    if tokens is None:
        tokens = repeated_tokens(model, n_seq, length, seed)
    length = (tokens.shape[1] - 1) // 2
    n_layers = int(model.cfg.n_layers)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    cache = run_cache(model, tokens.to(model_device(model)), names)
    second = torch.arange(length + 1, 2 * length + 1)
    q = torch.arange(1, tokens.shape[1])
    ind, prev = [], []
    for layer in range(n_layers):
        p = cache[names[layer]].cpu()
        ind.append(p[:, :, second, second - length + 1].mean((0, 2)))
        prev.append(p[:, :, q, q - 1].mean((0, 2)))
    return HeadInductionScores(torch.stack(ind), torch.stack(prev), length)


class FeatureInductionScores(NamedTuple):
    """Per-feature activation on the two copies of repeated random tokens."""

    features: Int[torch.Tensor, " f"]
    mass_second: Float[torch.Tensor, " f"]
    """Share of the feature's activation mass on second-copy tokens (0 where it never fired)."""
    mean_first: Float[torch.Tensor, " f"]
    """Mean activation over first-copy tokens."""
    mean_second: Float[torch.Tensor, " f"]
    """Mean activation over second-copy tokens."""
    fire_second: Float[torch.Tensor, " f"]
    """Fraction of second-copy tokens on which the feature fires."""
    length: int


@torch.no_grad()
def feature_induction_scores(
    model,
    sae: SAE,
    n_seq: int = 16,
    length: int = 32,
    seed: int = 0,
    features: FeatureIds = None,
    site: Site | None = None,
    tokens: Int[torch.Tensor, "n_seq seq"] | None = None,
) -> FeatureInductionScores:
    """Induction scores of SAE features on ``[BOS, r, r]`` (Kissane et al. 2024, section 4.2)."""
    site = sae_site(sae, site)
    sae.check_site(site, model.cfg)
    ids = feature_ids(features, sae.cfg.d_sae)
    if tokens is None:
        tokens = repeated_tokens(model, n_seq, length, seed)
    length = (tokens.shape[1] - 1) // 2
    hook = model_spec(model).capture_hook(site)
    cache = run_cache(model, tokens.to(model_device(model)), [hook], stop_at_layer=site.layer + 1)
    x = site.flatten(cache[hook]).to(sae.W_enc.device, sae.W_enc.dtype)
    acts = sae.encode(x)[..., ids.to(x.device)].float().cpu()  # [n, seq, f]
    first, second = acts[:, 1 : length + 1], acts[:, length + 1 : 2 * length + 1]
    m1, m2 = first.sum((0, 1)), second.sum((0, 1))
    total = m1 + m2
    mass = torch.where(total > 0, m2 / total.clamp_min(1e-30), torch.zeros_like(total))
    return FeatureInductionScores(
        ids, mass, first.mean((0, 1)), second.mean((0, 1)), (second > 0).float().mean((0, 1)), length
    )


def induction_features(scores: FeatureInductionScores, min_mass: float = 0.9, min_fire: float = 0.1) -> Int[torch.Tensor, " n"]:
    """Features with at least ``min_mass`` of their mass on the second copy that fire on at least ``min_fire``
    of second-copy tokens, by decreasing mean second-copy activation."""
    keep = (scores.mass_second >= min_mass) & (scores.fire_second >= min_fire)
    idx = keep.nonzero()[:, 0]
    idx = idx[scores.mean_second[idx].argsort(descending=True)]
    return scores.features[idx]


class InductionAttribution(NamedTuple):
    """Where an induction feature's DFA comes from, on second-copy tokens where it fires."""

    feature: int
    head_fraction: Float[torch.Tensor, " n_heads"]
    """Share of positive DFA per head (summed over the firing second-copy tokens)."""
    induction_source_fraction: Float[torch.Tensor, " n_heads"]
    """Per head: share of its positive DFA that comes from the source ``t - length + 1`` (the token after the
    earlier occurrence)."""
    n_tokens: int
    """Second-copy tokens on which the feature fired."""


@torch.no_grad()
def induction_attribution(model, sae: SAE, feature: int, tokens: Int[torch.Tensor, "n_seq seq"],
                          site: Site | None = None) -> InductionAttribution:
    """DFA of one feature over ``[BOS, r, r]`` rows, by head and by the induction source position."""
    site = sae_site(sae, site)
    length = (tokens.shape[1] - 1) // 2
    res = dfa_by_source(model, sae, tokens, [feature], site)
    second = torch.arange(length + 1, 2 * length + 1)
    fired = res.acts[:, second, 0].cpu() > 0  # [n, len]
    by_head = res.by_head[:, second, :, 0].cpu()  # [n, len, head]
    src = res.by_source[:, second, :, :, 0].cpu()  # [n, len, head, k]
    target = (second - length + 1)[None, :, None, None].expand(src.shape[0], -1, src.shape[2], 1)
    at_target = src.gather(-1, target)[..., 0].clamp_min(0)  # [n, len, head]
    pos_total = src.clamp_min(0).sum(-1)
    head_mass = (by_head.clamp_min(0) * fired[..., None]).sum((0, 1))
    frac = head_fractions(head_mass)
    tgt = (at_target * fired[..., None]).sum((0, 1))
    tot = (pos_total * fired[..., None]).sum((0, 1))
    src_frac = torch.where(tot > 0, tgt / tot.clamp_min(1e-30), torch.zeros_like(tot))
    return InductionAttribution(int(feature), frac, src_frac, int(fired.sum()))


class InductionFeature(NamedTuple):
    """An induction feature with the head its DFA comes from."""

    feature: int
    mass_second: float
    """Share of its activation mass on the second copy."""
    mean_second: float
    head: int
    """The head (of the SAE's layer) with the largest share of positive DFA."""
    head_fraction: float
    """That head's share of positive DFA on the firing second-copy tokens."""
    source_fraction: float
    """Share of that head's positive DFA from the token after the earlier occurrence."""


@torch.no_grad()
def induction_feature_report(
    model,
    sae: SAE,
    n_seq: int = 16,
    length: int = 32,
    seed: int = 0,
    site: Site | None = None,
    top: int = 10,
    min_mass: float = 0.9,
    min_fire: float = 0.1,
    tokens: Int[torch.Tensor, "n_seq seq"] | None = None,
) -> list[InductionFeature]:
    """The SAE's induction features (:func:`induction_features`), at most ``top``, each with the head and source
    token its DFA comes from (:func:`induction_attribution`): Kissane et al. (2024), section 4.2."""
    if tokens is None:
        tokens = repeated_tokens(model, n_seq, length, seed)
    scores = feature_induction_scores(model, sae, tokens=tokens, site=site)
    out = []
    for f in induction_features(scores, min_mass, min_fire)[:top].tolist():
        att = induction_attribution(model, sae, f, tokens, site)
        h = int(att.head_fraction.argmax())
        j = int((scores.features == f).nonzero()[0, 0])
        out.append(InductionFeature(f, float(scores.mass_second[j]), float(scores.mean_second[j]), h,
                                    float(att.head_fraction[h]), float(att.induction_source_fraction[h])))
    return out


class PrefixStudy(NamedTuple):
    """Attention to the token after the earlier occurrence, by length of the matching prefix."""

    prefix_lengths: list[int]
    head_scores: Float[torch.Tensor, "n_p n_layers n_heads"]
    """Mean attention from the repeated token A to B (the token after A's earlier occurrence)."""
    feature_acts: Float[torch.Tensor, "n_p f"] | None
    """Mean activation at A of the given SAE features (None without an SAE)."""
    features: Int[torch.Tensor, " f"] | None


def prefix_tokens(model, prefix_length: int, n_seq: int, max_prefix: int, gap: int = 16, seed: int = 0) -> tuple[torch.Tensor, int, int]:
    """Rows ``[BOS, filler, P, A, B, filler, P, A]`` with ``len(P) = prefix_length - 1`` (A new when 0).

    Returns (tokens, position of the first A, position of the last A). Positions depend only on
    ``max_prefix`` and ``gap``, never on ``prefix_length``; all other tokens are distinct, so the match is
    exactly ``prefix_length`` long.
    """
    if not 0 <= prefix_length <= max_prefix:
        raise InputError(f"prefix_length must be in [0, {max_prefix}], got {prefix_length}")
    n1 = max_prefix + 2
    n2 = max(gap, max_prefix + 1)
    seq = 1 + n1 + 2 + n2 + 1
    r = random_tokens(model, n_seq, seq, seed)
    r[:, 0] = _start_token(model)
    a1, a2 = 1 + n1, seq - 1
    if prefix_length >= 1:
        r[:, a2] = r[:, a1]
        for j in range(1, prefix_length):
            r[:, a2 - j] = r[:, a1 - j]
    end = model_spec(model).tokens.end
    if end is not None:  # encoders: [CLS] ... [SEP]; the positions above are unchanged
        r = torch.cat([r, torch.full((n_seq, 1), end, dtype=torch.long)], dim=1)
    return r, a1, a2


@torch.no_grad()
def prefix_length_study(
    model,
    prefix_lengths: Sequence[int] = (0, 1, 2, 4, 8),
    n_seq: int = 32,
    seed: int = 0,
    sae: SAE | None = None,
    features: FeatureIds = None,
    site: Site | None = None,
    gap: int = 16,
) -> PrefixStudy:
    """Long- vs short-prefix induction (Kissane et al. 2024, section 4.3), for every head and some features."""
    lengths = [int(p) for p in prefix_lengths]
    max_prefix = max(lengths)
    n_layers = int(model.cfg.n_layers)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    ids = None
    if sae is not None:
        site = sae_site(sae, site)
        ids = feature_ids(features, sae.cfg.d_sae)
        hook = model_spec(model).capture_hook(site)
        names.append(hook)
    head_scores, feat = [], []
    for p in lengths:
        toks, a1, a2 = prefix_tokens(model, p, n_seq, max_prefix, gap, seed)
        cache = run_cache(model, toks.to(model_device(model)), names)
        head_scores.append(torch.stack([cache[n][:, :, a2, a1 + 1].mean(0).cpu() for n in names[:n_layers]]))
        if sae is not None:
            x = site.flatten(cache[hook])[:, a2].to(sae.W_enc.device, sae.W_enc.dtype)
            feat.append(sae.encode(x)[:, ids.to(x.device)].float().mean(0).cpu())
    return PrefixStudy(lengths, torch.stack(head_scores), torch.stack(feat) if feat else None, ids)


class PrefixHeadKind(NamedTuple):
    layer: int
    head: int
    short: float
    """Score with a one-token match (p = 1)."""
    long: float
    """Score with the longest match."""
    kind: str
    """``short-prefix``, ``long-prefix`` or ``none``."""


def classify_prefix_heads(study: PrefixStudy, min_score: float = 0.3, short_ratio: float = 0.5) -> list[PrefixHeadKind]:
    """Induction heads (score >= ``min_score`` at the longest prefix) split into short-prefix (the one-token
    score is at least ``short_ratio`` of the long one) and long-prefix (it is not)."""
    if 1 not in study.prefix_lengths:
        raise InputError("the study needs prefix length 1 to tell short- from long-prefix heads")
    i1 = study.prefix_lengths.index(1)
    il = study.prefix_lengths.index(max(study.prefix_lengths))
    out = []
    n_layers, n_heads = study.head_scores.shape[1:]
    for layer in range(n_layers):
        for head in range(n_heads):
            s, lg = float(study.head_scores[i1, layer, head]), float(study.head_scores[il, layer, head])
            kind = "none" if lg < min_score else ("short-prefix" if s >= short_ratio * lg else "long-prefix")
            out.append(PrefixHeadKind(layer, head, s, lg, kind))
    return out
