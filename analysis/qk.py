"""Exact QK attribution: why a head attends from a query position to a key position.

The attention score of head h at layer L, query position t and key position s is the scaled dot product
before the softmax and before any mask, ``score = scale * <q[t], k[s]>`` (before Gemma-2's logit softcap,
which the model applies after it). Freeze the prompt's norm scales, as RDFA does (:mod:`.residual`): the
residual stream before layer L is then a sum of upstream parts ``r_c`` (embeddings, each upstream head, each
MLP, the attention biases, and on post-norm models each norm's bias), the attention input is

    x[p] = sum_c a_c[p] + b,        a_c[p] = centre(r_c[p]) / sigma[p] * w

(RMSNorm does not centre; post-norm blocks (BERT) read the residual itself: ``a_c = r_c``, b = 0), and q and k
are linear in each part once the projection bias and the norm's bias are set apart (:mod:`.qk_maps`: per-head
query/key norms frozen, each part rotated by its own position under rotary embeddings, partial rotary
included; with grouped-query attention the key is key/value head ``h // (n_heads / n_kv_heads)``'s):

    q_c = R_t(n_t * (a_c[t] W_Q[h])),   q_bias = R_t(n_t * (b W_Q[h] + b_Q[h])),   likewise k_c, k_bias at s

so ``score(t, s) = sum_{c, c'} scale * <q_c, k_c'>`` over query terms c and key terms c' (parts and the
bias), exactly. The query-side total of part c is ``scale * <q_c, k[s]>``, the key-side total of c' is
``scale * <q[t], k_c'>``. An upstream SAE splits its layer's heads into features plus its error term
(:mod:`.qk_features`), on both sides. The softmax sees only differences, so the **contrast** splits
``score(t, s) - score(t, s')`` the same way with key terms ``k_c'[s] - k_c'[s']`` (by default s' is the
other source the head attends to most).

Every call checks itself: the score rebuilt from the model's own attention input (the sum of the parts)
must equal the model's own scores where the bridge exposes them (``hook_attn_scores``, after the softcap)
and, always, give its attention pattern after the softmax (1e-4); otherwise the family is refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from jaxtyping import Float, Int

from sae_lens_attn.errors import InputError
from sae_lens_attn.sae import SAE
from sae_lens_attn.spec import UnsupportedModelError, model_spec, norm_affine

from ._common import as_tokens, run_cache
from .qk_features import SAETerms, UpstreamSAE, sae_terms, upstream_saes
from .qk_maps import F64, HeadMaps, cache_names, head_maps, refusal
from .residual import WriteMaps, residual_components

__all__ = ["QKAttribution", "qk_attribution"]

TOL = 1e-4


@dataclass(frozen=True)
class QKAttribution:
    """One attention score (or a difference of two) of one head, split into query term x key term pairs."""

    layer: int
    head: int
    kv_head: int
    query_pos: int
    key_pos: int
    contrast_pos: int | None
    """None: the score at (query_pos, key_pos); else the key terms are ``k[key_pos] - k[contrast_pos]``."""
    query_names: list[str]
    key_names: list[str]
    """Upstream parts (``embed``, ``L0H2``, ``L0.mlp``, ...), SAE terms (``L0.z:123``, ``L0.z:error``,
    ``L0.z:b_dec``) and ``bias`` (the input norm's bias and the projection's bias)."""
    pairs: Float[torch.Tensor, "nq nk"]
    """``scale * <q_c, k_c'>``; sums to :attr:`score`."""
    query_vectors: Float[torch.Tensor, "nq d_head"]
    """Each query term's part of q[t] (after norm and rotation; the rows sum to q[t])."""
    key_vectors: Float[torch.Tensor, "nk d_head"]
    query_inputs: Float[torch.Tensor, "nq d_model"]
    """Each query term's part of the attention input at query_pos (rows sum to it)."""
    key_inputs: Float[torch.Tensor, "nk d_model"] | None
    """Likewise at key_pos (None for a contrast)."""
    scale: float
    score: float
    """The sum of the parts: the score before any softcap (a contrast: the difference of two)."""
    model_score: float | None
    """The model's own score (after its softcap; a contrast: the difference), where its attention module
    exposes scores (None where Hugging Face computes them internally: then the check is on the pattern)."""
    softcap: float | None
    pattern: tuple[float, ...]
    """The model's attention probability at key_pos (and at contrast_pos)."""
    sum_error: float
    """|parts - model| (through the softcap), or against the rebuilt score where the model exposes none."""
    check: str
    """What the parts were checked against, and the largest error."""
    saes: tuple[str, ...] = ()
    """Labels of the SAEs whose features are terms here."""
    notes: tuple[str, ...] = ()
    contrast: QKAttribution | None = None
    features: tuple[QKAttribution, ...] = field(default=())
    """One attribution per SAE view (upstream layers split into that SAE's features)."""

    @property
    def query_totals(self) -> Float[torch.Tensor, " nq"]:
        """Each query term against the whole key."""
        return self.pairs.sum(1)

    @property
    def key_totals(self) -> Float[torch.Tensor, " nk"]:
        """Each key term against the whole query."""
        return self.pairs.sum(0)

    def query_total(self, name: str) -> float:
        return float(self.query_totals[self.query_names.index(name)]) if name in self.query_names else 0.0

    def key_total(self, name: str) -> float:
        return float(self.key_totals[self.key_names.index(name)]) if name in self.key_names else 0.0

    @property
    def bias_terms(self) -> dict[str, float]:
        """The pairs that involve a bias: query bias x key parts, query parts x key bias, bias x bias."""
        qi, ki = self.query_names.index("bias"), self.key_names.index("bias")
        bb = float(self.pairs[qi, ki])
        return {"query bias x key": float(self.pairs[qi].sum()) - bb, "query x key bias":
                float(self.pairs[:, ki].sum()) - bb, "bias x bias": bb}

    def top_pairs(self, n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` largest |pairs| as ``(query term, key term, value)``."""
        flat = self.pairs.flatten()
        order = flat.abs().argsort(descending=True)[:n].tolist()
        nk = self.pairs.shape[1]
        return [(self.query_names[i // nk], self.key_names[i % nk], float(flat[i])) for i in order]

    def top(self, side: Literal["query", "key"], n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` largest |totals| of one side as ``(term, value)``."""
        totals, names = (self.query_totals, self.query_names) if side == "query" else (self.key_totals, self.key_names)
        return [(names[i], float(totals[i])) for i in totals.abs().argsort(descending=True)[:n].tolist()]

    def shares(self, side: Literal["query", "key"]) -> dict[str, float]:
        """Each term's total over the score (they sum to 1)."""
        totals, names = (self.query_totals, self.query_names) if side == "query" else (self.key_totals, self.key_names)
        return {n: float(v) / self.score for n, v in zip(names, totals.tolist())} if self.score else {}


class _Terms:
    """One side's terms at one position: names, attention-input parts, q- or k-space vectors."""

    def __init__(self, names: list[str], inputs: torch.Tensor | None, vectors: torch.Tensor):
        self.names, self.inputs, self.vectors = names, inputs, vectors

    def minus(self, other: _Terms) -> _Terms:
        """Term-wise difference (a name missing on one side counts as zero there)."""
        names = self.names + [n for n in other.names if n not in self.names]
        vec = torch.zeros(len(names), self.vectors.shape[1], dtype=F64)
        vec[: len(self.names)] = self.vectors
        index = {n: i for i, n in enumerate(names)}
        vec[[index[n] for n in other.names]] -= other.vectors
        return _Terms(names, None, vec)


@dataclass
class _Context:
    """What one prompt gives for layer ``layer``: parts, maps, the layer's hooks, the head's maps."""

    model: object
    tokens: torch.Tensor
    layer: int
    head: int
    names: list[str]
    parts: torch.Tensor  # [C, pos, d_model]
    cache: dict
    hm: HeadMaps
    ln: tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None  # (w, b, scale[pos], centre) of ln1
    maps: WriteMaps | None = None  # made on first use: only SAE terms need it (one more pass on Gemma-2, BERT)

    def write_maps(self) -> WriteMaps:
        if self.maps is None:
            self.maps = WriteMaps(self.model, self.tokens, self.layer)
        return self.maps

    def to_input(self, vecs: Float[torch.Tensor, "n d_model"], p: int) -> torch.Tensor:
        """The frozen input norm's linear part at position p (post-norm blocks: the identity)."""
        if self.ln is None:
            return vecs
        w, _, scale, centre = self.ln
        v = vecs - vecs.mean(-1, keepdim=True) if centre else vecs
        return v / scale[p] * w

    @property
    def input_bias(self) -> torch.Tensor:
        return self.ln[1] if self.ln is not None else torch.zeros(self.parts.shape[-1], dtype=F64)


def _context(model, tokens: torch.Tensor, layer: int, head: int, ups: list[UpstreamSAE]) -> _Context:
    spec = model_spec(model)
    comps = residual_components(model, tokens, layer)  # refuses models whose residual is not the parts' sum
    names = cache_names(model, layer) + [spec.capture_hook(u.site) for u in ups]
    cache = run_cache(model, tokens, sorted(set(names)), stop_at_layer=layer + 1)
    n_pos = tokens.shape[1]
    hm = head_maps(model, layer, head, cache, n_pos)
    ln = None
    ln1 = getattr(model.blocks[layer], "ln1", None)  # OLMo 2 has none: its attention reads the residual
    if spec.attn_norm is not None and ln1 is not None:
        w, b = norm_affine(model, ln1)
        scale = cache[f"blocks.{layer}.ln1.hook_scale"][0, :, 0].to(F64)
        ln = (w.to(F64).cpu(), b.to(F64).cpu(), scale.cpu(), spec.attn_norm == "LN")
    parts = comps.vectors[:, 0].to("cpu", F64)
    return _Context(model, tokens, layer, head, comps.names, parts, cache, hm, ln)


def _side(ctx: _Context, which: Literal["query", "key"], p: int, saes: list[UpstreamSAE]) -> _Terms:
    """Query or key terms at position p: parts (SAE layers split into features), then the bias."""
    split = [sae_terms(ctx.model, u, _site_x(ctx, u, p)) for u in saes]
    replaced = set().union(*(t.replaced for t in split)) if split else set()
    keep = [i for i, n in enumerate(ctx.names) if n not in replaced]
    names = [ctx.names[i] for i in keep]
    resid = [ctx.parts[keep, p]]
    for t in split:
        names += t.names
        resid.append(_arrive(ctx, t, p))
    inputs = ctx.to_input(torch.cat(resid), p)
    side = ctx.hm.query if which == "query" else ctx.hm.key
    pos = torch.full((inputs.shape[0],), p)
    vectors = torch.cat([side.linear(inputs, pos), side.bias(ctx.input_bias[None], pos[:1])])
    return _Terms(names + ["bias"], torch.cat([inputs, ctx.input_bias[None]]), vectors)


def _site_x(ctx: _Context, up: UpstreamSAE, p: int) -> torch.Tensor:
    act = ctx.cache[model_spec(ctx.model).capture_hook(up.site)]
    return up.site.flatten(act)[0, p]


def _arrive(ctx: _Context, t: SAETerms, p: int) -> torch.Tensor:
    """SAE terms (layer t.layer's attention output at p) as they arrive at the attended layer's input."""
    return ctx.write_maps().at([p]).attn(t.layer, t.out.to(F64)[:, None, :])[:, 0].to("cpu", F64)


class _Row:
    """The query's scores against every key, rebuilt from the model's own attention input, and the check."""

    def __init__(self, ctx: _Context, t: int):
        c, hm, family = ctx.cache, ctx.hm, model_spec(ctx.model).family
        a = f"blocks.{ctx.layer}.attn."
        x = c[a + "hook_in"][0].to("cpu", F64)  # [pos, d_model]
        n = x.shape[0]
        pos = torch.arange(n)
        query = hm.query.full(x[t:t + 1], pos[t:t + 1])[0]
        self.raw = hm.scale * (hm.key.full(x, pos) @ query)  # [pos], before the softcap
        self.capped = self.cap(self.raw, hm.softcap)
        pattern = c[a + "hook_pattern"][0, ctx.head].to("cpu", F64)[t]
        scores = c[a + "hook_attn_scores"][0, ctx.head].to("cpu", F64)[t]
        # delegated attention modules (GPT-J, OPT, BERT here) hand the bridge post-softmax weights only
        self.exposed = not torch.equal(scores, pattern)
        causal = model_spec(ctx.model).kind == "causal"
        self.allowed = scores > torch.finfo(torch.float32).min / 2 if self.exposed else (pos <= t if causal else pos >= 0)
        self.causal, self.softcap = causal, hm.softcap
        self.pattern, self.scores = pattern, scores
        ok = self.allowed
        soft = torch.softmax(self.capped[ok], 0)
        self.pattern_error = float((soft - pattern[ok]).abs().max())
        big = max(1.0, float(self.capped[ok].abs().max()))
        self.score_error = float((self.capped[ok] - scores[ok]).abs().max()) / big if self.exposed else 0.0
        if self.pattern_error > TOL or self.score_error > TOL:
            raise UnsupportedModelError(
                f"QK attribution is not exact on this {family} model: the scores rebuilt from its attention input "
                f"(norms frozen, scale {hm.scale:.4g}) differ from its own (pattern error {self.pattern_error:.1e}, "
                f"score error {self.score_error:.1e}); its attention computes something this analysis does not model"
            )

    @staticmethod
    def cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
        return cap * torch.tanh(x / cap) if cap else x

    def require(self, t: int, s: int, what: str) -> None:
        if not bool(self.allowed[s]):
            why = "causal: a query attends only to itself and earlier positions" if self.causal and s > t else \
                "outside its attention window or mask"
            raise InputError(f"{what} {s} is masked for query position {t} ({why}): the model computes no score there")

    def describe(self) -> str:
        if self.exposed:
            return (f"parts sum to the model's own score (hook_attn_scores{', after the softcap' if self.softcap else ''});"
                    f" the rebuilt row matches its scores to {self.score_error:.1e} and its pattern to "
                    f"{self.pattern_error:.1e}")
        return ("the model's attention module computes its scores inside Hugging Face's code and exposes only the "
                f"pattern: the parts sum to the score rebuilt from its attention input, whose softmax matches its "
                f"pattern to {self.pattern_error:.1e}")


def _check_inputs(ctx: _Context, terms: _Terms, p: int) -> None:
    x = ctx.cache[f"blocks.{ctx.layer}.attn.hook_in"][0, p].to("cpu", F64)
    err = float((terms.inputs.sum(0) - x).abs().max())
    if err > TOL * max(1.0, float(x.abs().max())):
        family = model_spec(ctx.model).family
        raise UnsupportedModelError(
            f"QK attribution is not exact on this {family} model: layer {ctx.layer}'s attention input is not its "
            f"input norm (frozen) applied to the residual parts (max error {err:.1e}) at position {p}"
        )


def _attribution(ctx: _Context, row: _Row, q: _Terms, k: _Terms, t: int, s: int, s2: int | None,
                 saes: tuple[str, ...]) -> QKAttribution:
    hm = ctx.hm
    pairs = hm.scale * (q.vectors @ k.vectors.T)
    score = float(pairs.sum())
    if s2 is None:
        model_score = float(row.scores[s]) if row.exposed else None
        got = float(_Row.cap(torch.tensor(score, dtype=F64), hm.softcap))
        sum_error = abs(got - model_score) if model_score is not None else abs(score - float(row.raw[s]))
        pattern = (float(row.pattern[s]),)
    else:
        model_score = float(row.scores[s] - row.scores[s2]) if row.exposed else None
        # the model's own difference where it exposes scores without a softcap; else the rebuilt pre-softcap one
        own = row.exposed and not hm.softcap
        want = float(row.scores[s] - row.scores[s2]) if own else float(row.raw[s] - row.raw[s2])
        sum_error = abs(score - want)
        pattern = (float(row.pattern[s]), float(row.pattern[s2]))
    if sum_error > TOL * max(1.0, abs(score)):
        raise UnsupportedModelError(f"QK attribution parts do not add up on this {model_spec(ctx.model).family} "
                                    f"model (error {sum_error:.1e}); refusing rather than showing wrong terms")
    return QKAttribution(ctx.layer, ctx.head, hm.kv_head, t, s, s2, q.names, k.names, pairs, q.vectors, k.vectors,
                         q.inputs, k.inputs, hm.scale, score, model_score, hm.softcap, pattern, sum_error,
                         row.describe(), saes, hm.notes)


def _views(model, saes: Sequence[SAE | Sequence[SAE]], layer: int) -> list[list[UpstreamSAE]]:
    return [upstream_saes(model, [v] if isinstance(v, SAE) else list(v), layer) for v in saes]


def _check_positions(model, tokens: torch.Tensor, layer: int, head: int, positions: dict[str, int]) -> None:
    spec = model_spec(model)
    if not 0 <= layer < spec.n_layers:
        raise InputError(f"layer {layer} does not exist; the model has layers 0..{spec.n_layers - 1}")
    if not 0 <= head < spec.n_heads:
        raise InputError(f"head {head} does not exist; the model has heads 0..{spec.n_heads - 1}")
    n = tokens.shape[1]
    for what, p in positions.items():
        if not 0 <= p < n:
            raise InputError(f"{what} {p} is outside the prompt (positions 0..{n - 1})")


def _contrast_pos(row: _Row, t: int, s: int, contrast_pos: int | Literal["auto"] | None) -> int | None:
    if contrast_pos is None:
        return None
    if contrast_pos == "auto":
        others = row.allowed.clone()
        others[s] = False
        if not bool(others.any()):
            return None  # the query attends to no other position
        return int(torch.where(others, row.pattern, torch.full_like(row.pattern, -1.0)).argmax())
    if int(contrast_pos) == s:
        raise InputError(f"contrast position {s} is the key position itself")
    row.require(t, int(contrast_pos), "contrast position")
    return int(contrast_pos)


@torch.no_grad()
def qk_attribution(
    model,
    tokens: Int[torch.Tensor, "1 pos"] | str,
    layer: int,
    head: int,
    query_pos: int,
    key_pos: int,
    saes: Sequence[SAE | Sequence[SAE]] = (),
    contrast_pos: int | Literal["auto"] | None = "auto",
) -> QKAttribution:
    """Head ``head`` of ``layer``: its score from ``query_pos`` to ``key_pos`` split into (query term, key term)
    pairs over the upstream parts (see the module docstring), with the contrast against ``contrast_pos``
    (``"auto"``: the other position the head attends to most; None: no contrast) and, per item of ``saes``
    (an SAE, or several at distinct earlier layers), the same split with those layers' heads replaced by the
    SAEs' active features, error terms and decoder biases (``result.features``, in order)."""
    tokens = as_tokens(model, tokens)
    if tokens.shape[0] != 1:
        raise InputError(f"QK attribution follows one prompt (norm scales are per prompt): got {tokens.shape[0]} rows")
    t, s = int(query_pos), int(key_pos)
    _check_positions(model, tokens, layer, head, {"query position": t, "key position": s})
    why = refusal(model, layer)  # before anything else, so the message names the position scheme
    if why:
        raise UnsupportedModelError(why)
    views = _views(model, saes, layer)
    ctx = _context(model, tokens, layer, head, [u for v in views for u in v])
    row = _Row(ctx, t)
    row.require(t, s, "key position")
    s2 = _contrast_pos(row, t, s, contrast_pos)
    out = []
    for view in [[]] + views:
        q, k = _side(ctx, "query", t, view), _side(ctx, "key", s, view)
        for terms, p in ((q, t), (k, s)):
            _check_inputs(ctx, terms, p)
        labels = tuple(u.label for u in view)
        res = _attribution(ctx, row, q, k, t, s, None, labels)
        if s2 is not None:
            diff = _attribution(ctx, row, q, k.minus(_side(ctx, "key", s2, view)), t, s, s2, labels)
            res = replace(res, contrast=diff)
        out.append(res)
    return replace(out[0], features=tuple(out[1:]))
