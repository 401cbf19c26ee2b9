"""The linear maps from one attention layer's input to one head's rotated queries and keys, norms frozen.

With every norm scale frozen at its value on the prompt, a head's query at position p is affine in the
attention input ``x[p]``:

    q[p] = R_p( n_p * (x[p] W_Q[h] + b_Q[h]) ),      k[p] = R_p( m_p * (x[p] W_K[g] + b_K[g]) )

where g is the key/value head that query head h reads (grouped- and multi-query attention, Hugging Face's
``repeat_kv``), ``n_p``/``m_p`` are the frozen scales of a query/key norm (Qwen3 and Gemma 3 normalise each
head, OLMo 2 the whole projection; 1 where there is none) and ``R_p`` the rotary rotation at position p on the
first ``rotary_dim`` dimensions (the rest pass through: partial rotary of GPT-NeoX, Phi, GPT-J). The score is
``scale * <q[t], k[s]>`` (``scale``: the module's own, e.g. Gemma-2's ``query_pre_attn_scalar ** -0.5``),
then a logit softcap where the model has one (Gemma 2: ``cap * tanh(score / cap)``).

Rotary conventions: rotate-half (Llama, GPT-NeoX, ...) with the cos/sin the bridge hands the attention
(``hook_cos``/``hook_sin``, so any RoPE scaling is the model's own) and GPT-J's rotate-every-two with the
model's sinusoid table. Position schemes that are not a rotation of q and k (ALiBi, T5's relative bias, ...)
and settings that make q or k non-linear in the input are refused by name (:func:`refusal`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float

from sae_lens_attn.spec import UnsupportedModelError, model_spec, norm_affine

F64 = torch.float64


class Rotary(NamedTuple):
    """Rotation angles per position, expanded to the rotated width (r <= d_head)."""

    cos: Float[torch.Tensor, "pos r"]
    sin: Float[torch.Tensor, "pos r"]
    interleaved: bool
    """GPT-J pairs dimensions (2i, 2i+1); everyone else pairs (i, i + r/2)."""

    def apply(self, x: Float[torch.Tensor, "... n d_head"], pos: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (axis -2 indexed by ``pos``, one position per row) by each row's position."""
        cos, sin = self.cos[pos], self.sin[pos]
        r = cos.shape[-1]
        xr, rest = x[..., :r], x[..., r:]
        if self.interleaved:
            turned = torch.stack((-xr[..., 1::2], xr[..., ::2]), dim=-1).flatten(-2)
        else:
            turned = torch.cat((-xr[..., r // 2:], xr[..., : r // 2]), dim=-1)
        return torch.cat((xr * cos + turned * sin, rest), dim=-1)


class Side(NamedTuple):
    """One side (query or key) of one head: projection, frozen norm, rotation."""

    W: Float[torch.Tensor, "d_model d_head"]
    b: Float[torch.Tensor, " d_head"]
    norm: Float[torch.Tensor, "pos d_head"] | None
    """Frozen query/key-norm multiplier per position (weight / rms), None without such a norm."""
    rotary: Rotary | None

    def linear(self, x: Float[torch.Tensor, "n d_model"], pos: torch.Tensor) -> Float[torch.Tensor, "n d_head"]:
        """The linear part at positions ``pos`` (one per row of x)."""
        return self._finish(x @ self.W, pos)

    def bias(self, x_bias: Float[torch.Tensor, "n d_model"], pos: torch.Tensor) -> Float[torch.Tensor, "n d_head"]:
        """The constant part: the input norm's bias through W, plus the projection's own bias."""
        return self._finish(x_bias @ self.W + self.b, pos)

    def full(self, x: Float[torch.Tensor, "n d_model"], pos: torch.Tensor) -> Float[torch.Tensor, "n d_head"]:
        """q (or k) of whole attention inputs ``x``, one position per row."""
        return self._finish(x @ self.W + self.b, pos)

    def _finish(self, y: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            y = y * self.norm[pos]
        return self.rotary.apply(y, pos) if self.rotary is not None else y


class HeadMaps(NamedTuple):
    """Everything between layer ``layer``'s attention input and head ``head``'s score, for one prompt (float64
    on the CPU: a few [d_model, d_head] maps, wherever the model runs)."""

    query: Side
    key: Side
    kv_head: int
    scale: float
    softcap: float | None
    notes: tuple[str, ...]


def refusal(model, layer: int) -> str | None:
    """Why this model's scores are not a bilinear form of rotated projections, or None."""
    cfg, family = model.cfg, model_spec(model).family
    pos_type = str(getattr(cfg, "positional_embedding_type", "standard") or "standard")
    hf = model.blocks[layer].attn.original_component
    hf_cfg = getattr(hf, "config", None)
    named = {
        "alibi": "ALiBi adds a distance-dependent bias that is not a product of query and key",
        "relative_positional_bias": "a learned relative-position bias is added to the scores",
        "shortformer": "Shortformer adds position embeddings to the query and key inputs only",
    }
    if pos_type in named:
        return f"QK attribution is not supported for {family}: {named[pos_type]}"
    checks = [
        (getattr(cfg, "rotary_adjacent_pairs", False) or getattr(cfg, "rotary_interleaved_cos_sin", False),
         "adjacent-pair rotary (GLM, Cohere) is not implemented"),
        (getattr(cfg, "qk_norm_after_rope", False), "its query/key norm comes after the rotation"),
        (getattr(cfg, "gated_q_proj", False), "its query projection is gated"),
        (getattr(hf, "key_multiplier", None) is not None, "its keys are scaled by a learned multiplier"),
        (getattr(hf_cfg, "clip_qkv", None) is not None, "clip_qkv clamps q and k (not linear)"),
        (isinstance(getattr(hf_cfg, "rope_parameters", None), dict)
         and hf_cfg.rope_parameters.get("llama_4_scaling_beta") is not None, "Llama-4 query scaling by position"),
    ]
    for bad, why in checks:
        if bad:
            return f"QK attribution is not supported for {family}: {why}"
    return None


def _scale(model, layer: int) -> float:
    """The module's own score scale (Hugging Face passes ``module.scaling`` to its attention function;
    OPT folds it into q, i.e. the same product); 1/sqrt(d_head) where the module keeps none."""
    hf = model.blocks[layer].attn.original_component
    for mod in (hf, getattr(hf, "self", None)):  # BERT: BertAttention.self holds the scores
        if mod is not None and getattr(mod, "scaling", None) is not None:
            scale = float(mod.scaling)
            if getattr(mod, "scale_attn_by_inverse_layer_idx", False):  # GPT-2's option
                scale /= float(layer + 1)
            return scale
    return float(model.cfg.d_head) ** -0.5


def softcap(model, layer: int) -> float | None:
    hf = model.blocks[layer].attn.original_component
    cap = getattr(hf, "attn_logit_softcapping", None)
    if cap is None:
        cap = float(getattr(model.cfg, "attn_scores_soft_cap", -1.0) or -1.0)
    return float(cap) if cap and cap > 0 else None


def _rotary(model, layer: int, cache: dict, n_pos: int) -> Rotary | None:
    cos_hook, sin_hook = f"blocks.{layer}.attn.hook_cos", f"blocks.{layer}.attn.hook_sin"
    if cos_hook in cache:
        return Rotary(cache[cos_hook][0].to("cpu", F64), cache[sin_hook][0].to("cpu", F64), False)
    if str(getattr(model.cfg, "positional_embedding_type", "")) != "rotary":
        return None
    family = model_spec(model).family
    if family == "gptj":  # rotate_every_two with the model's sinusoid table (transformers' modeling_gptj)
        table = next((m.embed_positions for m in model.original_model.modules()
                      if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "embed_positions")), None)
        if table is not None:
            sin, cos = table[:n_pos].to("cpu", F64).chunk(2, dim=-1)
            return Rotary(cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1), True)
    raise UnsupportedModelError(
        f"QK attribution is not supported for {family}: it uses rotary embeddings, but its attention exposes "
        "no cos/sin (hook_cos / hook_sin) and its convention is not one this analysis knows"
    )


def _qk_norm(model, layer: int, which: str, raw: torch.Tensor, n_heads: int) -> torch.Tensor | None:
    """Frozen multiplier [pos, n_heads, d_head] of the attention's ``q_norm``/``k_norm`` (RMSNorm) from the
    projection's own output ``raw`` [pos, n_heads * d_head]; None where there is no such norm."""
    attn = model.blocks[layer].attn
    mod = getattr(attn, f"{which}_norm", None)
    if mod is None or getattr(mod, "original_component", mod) is None:
        return None
    hf = getattr(mod, "original_component", mod)
    eps = float(getattr(hf, "variance_epsilon", getattr(hf, "eps", 1e-6)))
    w, _ = norm_affine(model, hf, "cpu")
    d_head = raw.shape[-1] // n_heads
    x = raw.to("cpu", F64)
    if w.numel() == raw.shape[-1]:  # OLMo 2: one RMSNorm over all heads' dims
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps).expand_as(x)
        return (inv * w.to(F64)).reshape(-1, n_heads, d_head)
    heads = x.reshape(-1, n_heads, d_head)  # Qwen3, Gemma 3: per head over d_head
    inv = torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + eps)
    return inv * w.to(F64).reshape(-1, d_head)  # one weight [d_head] for all heads, or one per head


def cache_names(model, layer: int) -> list[str]:
    """The hooks :func:`head_maps` reads (those the model has)."""
    a = f"blocks.{layer}.attn."
    names = [a + "hook_in", a + "hook_attn_scores", a + "hook_pattern", a + "q.hook_out", a + "k.hook_out",
             f"blocks.{layer}.ln1.hook_scale", a + "hook_cos", a + "hook_sin"]
    return [n for n in names if n in model.hook_dict]


def head_maps(model, layer: int, head: int, cache: dict, n_pos: int) -> HeadMaps:
    """:class:`HeadMaps` of ``head`` at ``layer`` from one forward pass's ``cache`` (:func:`cache_names`)."""
    why = refusal(model, layer)
    if why:
        raise UnsupportedModelError(why)
    spec = model_spec(model)
    attn = model.blocks[layer].attn
    g = head // spec.kv_group
    rot = _rotary(model, layer, cache, n_pos)
    sides = []
    for which, W, b, h, n in (("q", attn.W_Q, attn.b_Q, head, spec.n_heads), ("k", attn.W_K, attn.b_K, g, spec.n_kv_heads)):
        bias = b[h].detach().to("cpu", F64) if b is not None else torch.zeros(spec.d_head, dtype=F64)
        raw = cache.get(f"blocks.{layer}.attn.{which}.hook_out")
        norm = _qk_norm(model, layer, which, raw[0].reshape(n_pos, -1), n) if raw is not None else None
        sides.append(Side(W[h].detach().to("cpu", F64), bias, None if norm is None else norm[:, h], rot))
    notes = []
    if rot is not None:
        r = rot.cos.shape[-1]
        notes.append(f"rotary: each part is rotated by its own position ({'all' if r == spec.d_head else r} of "
                     f"{spec.d_head} dims{', GPT-J pairs' if rot.interleaved else ''})")
    if sides[0].norm is not None:
        notes.append("query/key norms frozen at this prompt's scales")
    cap = softcap(model, layer)
    if cap is not None:
        notes.append(f"the decomposed score is before the softcap; the model applies {cap:g} * tanh(score / {cap:g})")
    if spec.kv_group > 1:
        notes.append(f"key/value head {g} is shared by query heads {g * spec.kv_group}..{(g + 1) * spec.kv_group - 1}")
    return HeadMaps(sides[0], sides[1], g, _scale(model, layer), cap, tuple(notes))
