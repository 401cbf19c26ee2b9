"""The residual stream in front of a layer as an exact sum of the parts that wrote it, norms frozen.

RDFA (:mod:`.rdfa`) needs, for one prompt, every upstream part's vector *as it arrives* at layer L's
attention input. How a part arrives depends on the block layout (:class:`~sae_lens_attn.spec.ModelSpec`):

* ``pre_norm`` (GPT-2, Llama, ...): parts are added to the residual as they are.
* ``sandwich`` (Gemma-2): an attention output goes through the post-attention RMSNorm before it is added:
  with its scale frozen at this prompt's value, ``v -> v * w_post / scale_post[pos]`` (``hook_mlp_out`` is
  already after the post-MLP norm).
* ``post_norm`` (BERT): every sublayer is followed by ``LN(resid + out)``, which re-centres and rescales the
  whole stream. Frozen, each LN is affine, ``LN(sum c) = sum centre(c) / scale[pos] * w + b``, so every part
  passes through the linear parts of all the norms after it, and each norm's bias is a part of its own.

With the scales frozen these maps are linear and exact, so the parts sum to ``blocks.L.hook_resid_pre`` to
float rounding; :func:`residual_components` checks that and refuses (naming the family) otherwise.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import einops
import torch
from jaxtyping import Float, Int

from sae_lens_attn.errors import InputError
from sae_lens_attn.spec import UnsupportedModelError, attn_weights, model_spec, norm_affine

from ._common import as_tokens, run_cache


class ResidualComponents(NamedTuple):
    """The residual stream before block ``layer`` split into the parts that wrote it."""

    names: list[str]
    """``embed``, ``pos_embed`` / ``token_type`` where the model adds them, ``L{l}H{h}`` per upstream head,
    ``L{l}.b_O``, ``L{l}.mlp``, and for post-norm models the norm biases (``embed_ln.b``, ``L{l}.ln1.b``, ...)."""
    vectors: Float[torch.Tensor, "component batch pos d_model"]
    """Each part as it arrives at the layer's input; they sum to ``blocks.{layer}.hook_resid_pre``."""


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


class WriteMaps:
    """For one prompt, the frozen-norm maps from where a part is written to layer ``layer``'s input."""

    def __init__(self, model, tokens: torch.Tensor, layer: int):
        self.model, self.layer = model, layer
        self.spec = model_spec(model)
        self.layout = self.spec.require_layout("RDFA")
        names = []
        if self.layout == "sandwich":
            names = [f"blocks.{lay}.ln1_post.hook_scale" for lay in range(layer)]
        elif self.layout == "post_norm":
            names = [f"blocks.{lay}.ln{i}.hook_scale" for lay in range(layer) for i in (1, 2)]
            if "embed_ln.hook_scale" in model.hook_dict:
                names.append("embed_ln.hook_scale")
        self.scales = run_cache(model, tokens, names, stop_at_layer=layer + 1) if names else {}

    def at(self, positions: list[int]) -> WriteMaps:
        """These maps restricted to ``positions``: vectors then carry a ``pos`` axis of ``len(positions)``
        (QK attribution maps a few positions' feature vectors, not the whole prompt's)."""
        sub = copy.copy(self)
        sub.scales = {k: v[:, positions] for k, v in self.scales.items()}
        return sub

    def _frozen(self, name: str, module, vec: torch.Tensor, centre: bool) -> torch.Tensor:
        w, _ = norm_affine(self.model, module, vec.device)
        scale = self.scales[f"{name}.hook_scale"][0, :, 0].to(vec.device)  # [pos]
        v = _centre(vec) if centre else vec
        return v / scale[:, None] * w

    def _post_chain(self, vec: torch.Tensor, stages: list[tuple[int, int]]) -> torch.Tensor:
        """Apply the frozen LNs ``blocks.l.ln{i}`` of ``stages`` in order (post-norm models centre)."""
        for lay, i in stages:
            mod = getattr(self.model.blocks[lay], f"ln{i}")
            vec = self._frozen(f"blocks.{lay}.ln{i}", mod, vec, centre=True)
        return vec

    def _stages_after(self, lay: int, i: int) -> list[tuple[int, int]]:
        """Post-norm stages from ``blocks.lay.ln{i}`` (inclusive) to the last one before ``layer``."""
        out = [(lay, i)] + ([(lay, 2)] if i == 1 else [])
        return out + [(m, j) for m in range(lay + 1, self.layer) for j in (1, 2)]

    def attn(self, lay: int, vec: Float[torch.Tensor, "... pos d_model"]) -> torch.Tensor:
        """Layer ``lay``'s attention output (``...`` any leading axes, ``pos`` the write position) as it
        arrives at layer ``self.layer``'s input."""
        if self.layout == "pre_norm":
            return vec
        if self.layout == "sandwich":
            return self._frozen(f"blocks.{lay}.ln1_post", self.model.blocks[lay].ln1_post, vec, centre=False)
        return self._post_chain(vec, self._stages_after(lay, 1))

    def mlp(self, lay: int, vec: torch.Tensor) -> torch.Tensor:
        """Layer ``lay``'s ``hook_mlp_out`` as it arrives (post-norm: through ln2 and every later norm)."""
        if self.layout != "post_norm":
            return vec
        return self._post_chain(vec, self._stages_after(lay, 2))

    def embed(self, vec: torch.Tensor) -> torch.Tensor:
        """An embedding part (post-norm: through the embedding LayerNorm, then every block norm)."""
        if self.layout != "post_norm":
            return vec
        if "embed_ln.hook_scale" in self.scales:
            vec = self._frozen("embed_ln", self.model.embed_ln, vec, centre=True)
        return self._post_chain(vec, [(m, j) for m in range(self.layer) for j in (1, 2)])

    # --- pullbacks: <map(v)[pos], u[pos]> == <v[pos], pullback(u)[pos]> for every v ----------------------
    def _scale_factor(self, name: str, module, like: torch.Tensor) -> torch.Tensor:
        w, _ = norm_affine(self.model, module, like.device)
        scale = self.scales[f"{name}.hook_scale"][0, :, 0].to(like.device)
        return w[None, :] / scale[:, None]  # [pos, d_model]

    def _pull_chain(self, u: torch.Tensor, stages: list[tuple[int, int]]) -> torch.Tensor:
        # forward is v -> D_n C ... D_1 C v (C centres, D_j scales); its adjoint is C D_1 ... C D_n
        for lay, i in reversed(stages):
            u = _centre(u * self._scale_factor(f"blocks.{lay}.ln{i}", getattr(self.model.blocks[lay], f"ln{i}"), u))
        return u

    def attn_pullback(self, lay: int, u: Float[torch.Tensor, "pos d_model"]) -> torch.Tensor:
        """The read-out ``u`` (at layer ``self.layer``'s input) pulled back to layer ``lay``'s attention output."""
        if self.layout == "pre_norm":
            return u
        if self.layout == "sandwich":
            return u * self._scale_factor(f"blocks.{lay}.ln1_post", self.model.blocks[lay].ln1_post, u)
        return self._pull_chain(u, self._stages_after(lay, 1))

    def norm_biases(self) -> list[tuple[str, torch.Tensor]]:
        """Post-norm models: each norm's bias as a part of its own (``[d_model]`` at every position, mapped)."""
        if self.layout != "post_norm":
            return []
        d = self.spec.d_model
        n_pos = next(iter(self.scales.values())).shape[1] if self.scales else 1
        out = []
        if hasattr(self.model, "embed_ln") and "embed_ln.hook_scale" in self.scales:
            _, b = norm_affine(self.model, self.model.embed_ln)
            later = [(m, j) for m in range(self.layer) for j in (1, 2)]
            out.append(("embed_ln.b", self._post_chain(b.expand(n_pos, d).clone(), later)))
        for lay in range(self.layer):
            for i in (1, 2):
                _, b = norm_affine(self.model, getattr(self.model.blocks[lay], f"ln{i}"))
                later = self._stages_after(lay, i)[1:]
                out.append((f"L{lay}.ln{i}.b", self._post_chain(b.expand(n_pos, d).clone(), later)))
        return out


def residual_components(model, tokens: Int[torch.Tensor, "batch pos"], layer: int) -> ResidualComponents:
    """Split ``blocks.{layer}.hook_resid_pre`` into embeddings, upstream heads, attention biases, MLPs (and,
    for post-norm models, norm biases), each as it arrives at the layer (see the module docstring).

    Raises :class:`~sae_lens_attn.spec.UnsupportedModelError` when the parts do not add up.
    """
    tokens = as_tokens(model, tokens)
    if tokens.shape[0] != 1:
        raise InputError(f"residual components follow one prompt (norm scales are per prompt): got {tokens.shape[0]} rows")
    spec = model_spec(model)
    maps = WriteMaps(model, tokens, layer)
    # the embedding modules' own outputs: ``hook_embed`` is an alias of the embedding norm's output where a
    # model has one (BERT), not of the word embedding
    embed_parts = [("embed", "embed.hook_out" if "embed.hook_out" in model.hook_dict else "hook_embed")]
    if "hook_pos_embed" in model.hook_dict and getattr(model.cfg, "positional_embedding_type", "") == "standard":
        embed_parts.append(("pos_embed", "pos_embed.hook_out" if "pos_embed.hook_out" in model.hook_dict else "hook_pos_embed"))
    if spec.layout == "post_norm" and "token_type_embed.hook_out" in model.hook_dict:
        embed_parts.append(("token_type", "token_type_embed.hook_out"))
    names = [h for _, h in embed_parts] + [f"blocks.{layer}.hook_resid_pre"]
    for up in range(layer):
        names += [f"blocks.{up}.attn.hook_z", f"blocks.{up}.hook_mlp_out"]
    cache = run_cache(model, tokens, names, stop_at_layer=layer + 1 if layer < model.cfg.n_layers else None)
    shape = cache[embed_parts[0][1]].shape
    labels: list[str] = []
    parts: list[torch.Tensor] = []
    for label, hook in embed_parts:
        parts.append(maps.embed(cache[hook].expand(shape)[0])[None])
        labels.append(label)
    for up in range(layer):
        z = cache[f"blocks.{up}.attn.hook_z"]
        aw = attn_weights(model, up, z.device)
        heads = einops.einsum(z, aw.W_O, "b pos head d_head, head d_head d_model -> head b pos d_model")
        parts += [maps.attn(up, heads[h, 0])[None] for h in range(heads.shape[0])]
        labels += [f"L{up}H{h}" for h in range(heads.shape[0])]
        if spec.has_b_O:
            parts.append(maps.attn(up, aw.b_O.expand(shape[1:]).clone())[None])
            labels.append(f"L{up}.b_O")
        parts.append(maps.mlp(up, cache[f"blocks.{up}.hook_mlp_out"][0])[None])
        labels.append(f"L{up}.mlp")
    for label, vec in maps.norm_biases():
        parts.append(vec[None])
        labels.append(label)
    vectors = torch.stack(parts)
    resid = cache[f"blocks.{layer}.hook_resid_pre"]
    err = float((vectors.sum(0) - resid).abs().max())
    tol = 1e-4 * max(1.0, float(resid.abs().max()))
    if err > tol:
        raise UnsupportedModelError(
            f"the residual stream before block {layer} of this {spec.family} model is not the sum of its parts "
            f"({spec.layout} layout, max error {err:.2e}); this architecture writes something else into it, so "
            "RDFA cannot split it"
        )
    return ResidualComponents(labels, vectors)
