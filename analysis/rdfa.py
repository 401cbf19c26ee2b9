"""Recursive direct feature attribution (RDFA; Kissane et al. 2024, section 3.3 and their Circuit Explorer).

Freeze the attention patterns and the LayerNorm scales of one prompt. Then everything between the residual
stream and the feature is linear, and a feature's DFA through head h from source position s,

    DFA_{i,h,s}[t] = A_h[t, s] (v_h[s] . e_{h,i}),     e_{h,i} = W_enc[h-block, i],
    v_h[s] = ln1(resid[s]) W_V[h] + b_V[h],      ln1(r) = centre(r) / scale[s] * w + b,

splits exactly over any decomposition of ``resid[s]`` (embeddings, each upstream head, each upstream MLP,
the attention output biases): component r_c contributes ``A_h[t, s] (r_c[s] . u_{h,s})`` with the read-out
direction ``u_{h,s} = centre(w * (W_V[h] e_{h,i})) / scale[s]``, and the LayerNorm bias and b_V add a
constant ``A_h[t, s] ((b W_V[h] + b_V[h]) . e_{h,i})``.

One step further back, an upstream head's output at s is again a mix over its own source positions,
``z_{l,g}[s] W_O[l,g] = sum_{s'} A_{l,g}[s, s'] v_{l,g}[s'] W_O[l,g]``, and an upstream SAE splits an
attention layer's output into features plus its error term: both split the first step's terms exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import einops
import torch
from jaxtyping import Float, Int

from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site

from ._common import (
    as_tokens,
    centre,
    feature_ids,
    head_encoder,
    ln_bias,
    ln_weight,
    normalization_kind,
    residual_directions,
    run_cache,
    sae_site,
)


class ResidualComponents(NamedTuple):
    """The residual stream before block ``layer`` split into the parts that wrote it."""

    names: list[str]
    """``embed``, ``pos_embed`` (learned positions only), ``L{l}H{h}`` per upstream head, ``L{l}.b_O``,
    ``L{l}.mlp``."""
    vectors: Float[torch.Tensor, "component batch pos d_model"]
    """Each component's vector; they sum to ``blocks.{layer}.hook_resid_pre``."""


class RDFAStep(NamedTuple):
    """A feature's DFA at one query position, split by head, source position and upstream component."""

    feature: int
    query_pos: int
    names: list[str]
    """Component names, as in :class:`ResidualComponents`."""
    contributions: Float[torch.Tensor, "component n_heads k"]
    """Component c's share of ``DFA_{i,h,s}[t]`` through head h from source position s (= k)."""
    value_bias: Float[torch.Tensor, "n_heads k"]
    """The part from the LayerNorm bias and b_V."""
    total: Float[torch.Tensor, "n_heads k"]
    """``DFA_{i,h,s}[t]`` computed directly from hook_v and the pattern: equals
    ``contributions.sum(0) + value_bias``."""

    def component(self, name: str) -> Float[torch.Tensor, "n_heads k"]:
        return self.contributions[self.names.index(name)]


class UpstreamHeadStep(NamedTuple):
    """Second step: each upstream head's term of :class:`RDFAStep`, split by that head's own sources."""

    feature: int
    query_pos: int
    head: int
    """The feature's head h (at the SAE's layer) whose path is followed."""
    by_source: Float[torch.Tensor, "layer n_heads k k2"]
    """``[l, g, s, s']``: upstream head (l, g), read by head h at source s, from its own source s'.
    Summed over s' it equals ``RDFAStep.component(f"L{l}H{g}")[h, s]``."""


class UpstreamFeatureStep(NamedTuple):
    """Second step through an upstream attention SAE: an attention layer's term split into its features."""

    feature: int
    query_pos: int
    head: int
    upstream_site: Site
    contributions: Float[torch.Tensor, "d_sae_up k"]
    """Upstream feature j's share of the layer's term at source s (its activation times its read-out)."""
    error: Float[torch.Tensor, " k"]
    """The upstream SAE's error term (x - x_hat)."""
    bias: Float[torch.Tensor, " k"]
    """b_dec (through W_O for hook_z) plus, for hook_z SAEs, the layer's b_O."""
    total: Float[torch.Tensor, " k"]
    """The upstream attention layer's term from :class:`RDFAStep` (its heads plus its b_O)."""


def residual_components(model, tokens: Int[torch.Tensor, "batch pos"], layer: int) -> ResidualComponents:
    """Split ``blocks.{layer}.hook_resid_pre`` into embeddings, upstream heads, attention biases and MLPs.

    Raises when the parts do not add up to the residual stream (a model whose blocks write something else).
    """
    tokens = as_tokens(model, tokens)
    names = ["hook_embed", f"blocks.{layer}.hook_resid_pre"]
    has_pos = "hook_pos_embed" in model.hook_dict and getattr(model.cfg, "positional_embedding_type", "") == "standard"
    if has_pos:
        names.append("hook_pos_embed")
    for up_l in range(layer):
        names += [f"blocks.{up_l}.attn.hook_z", f"blocks.{up_l}.hook_mlp_out"]
    cache = run_cache(model, tokens, names, stop_at_layer=layer + 1 if layer < model.cfg.n_layers else None)
    parts: list[torch.Tensor] = [cache["hook_embed"]]
    labels = ["embed"]
    if has_pos:
        parts.append(cache["hook_pos_embed"].expand_as(cache["hook_embed"]))
        labels.append("pos_embed")
    for up_l in range(layer):
        z = cache[f"blocks.{up_l}.attn.hook_z"]
        W_O = model.W_O[up_l].detach().float().to(z.device)
        heads = einops.einsum(z, W_O, "b pos head d_head, head d_head d_model -> head b pos d_model")
        parts += list(heads)
        labels += [f"L{up_l}H{h}" for h in range(heads.shape[0])]
        parts.append(model.b_O[up_l].detach().float().to(z.device).expand_as(parts[0]))
        labels.append(f"L{up_l}.b_O")
        parts.append(cache[f"blocks.{up_l}.hook_mlp_out"])
        labels.append(f"L{up_l}.mlp")
    vectors = torch.stack(parts)
    resid = cache[f"blocks.{layer}.hook_resid_pre"]
    err = float((vectors.sum(0) - resid).abs().max())
    tol = 1e-4 * max(1.0, float(resid.abs().max()))
    if err > tol:
        raise ValueError(
            f"the residual stream before block {layer} is not the sum of embeddings, heads, b_O and MLPs "
            f"(max error {err:.2e}); this architecture writes something else into it, so RDFA cannot split it"
        )
    return ResidualComponents(labels, vectors)


def _readout(model, sae: SAE, site: Site, feature: int, tokens: torch.Tensor):
    """Per-head value read-out of one feature at the SAE's layer: (u [head, k, d_model], bias [head])."""
    L = site.layer
    enc = head_encoder(model, sae, site, [feature])
    e = enc.W[..., 0]  # [head, d_head]
    W_V = model.W_V[L].detach().float().to(e.device)  # [head, d_model, d_head]
    b_V = model.b_V[L].detach().float().to(e.device)  # [head, d_head]
    ln = model.blocks[L].ln1
    d_model = int(model.cfg.d_model)
    w, b = ln_weight(ln, d_model, e.device), ln_bias(ln, d_model, e.device)
    a = einops.einsum(W_V, e, "head d_model d_head, head d_head -> head d_model") * w
    a = centre(a, normalization_kind(model))
    cache = run_cache(model, tokens, [f"blocks.{L}.ln1.hook_scale"], stop_at_layer=L + 1)
    scale = cache[f"blocks.{L}.ln1.hook_scale"][0, :, 0].to(e.device)  # [k]
    u = a[:, None, :] / scale[None, :, None]  # [head, k, d_model]
    vbias = einops.einsum(b, W_V, "d_model, head d_model d_head -> head d_head") + b_V
    return u, (vbias * e).sum(-1)


def _one_row(model, tokens) -> torch.Tensor:
    tokens = as_tokens(model, tokens)
    if tokens.shape[0] != 1:
        raise ValueError(f"RDFA follows one prompt: pass one row of tokens, got {tokens.shape[0]}")
    return tokens


@torch.no_grad()
def rdfa(
    model,
    sae: SAE,
    tokens: Int[torch.Tensor, "1 pos"] | str,
    feature: int,
    query_pos: int,
    site: Site | None = None,
) -> RDFAStep:
    """First RDFA step: the feature's DFA at ``query_pos`` split by head, source and upstream component."""
    site = sae_site(sae, site)
    feature = int(feature_ids(feature, sae.cfg.d_sae)[0])
    tokens = _one_row(model, tokens)
    L = site.layer
    if not 0 <= query_pos < tokens.shape[1]:
        raise ValueError(f"query_pos {query_pos} is outside the prompt (length {tokens.shape[1]})")
    comps = residual_components(model, tokens, L)
    u, vbias = _readout(model, sae, site, feature, tokens)
    cache = run_cache(model, tokens, [f"blocks.{L}.attn.hook_pattern", f"blocks.{L}.attn.hook_v"], stop_at_layer=L + 1)
    A = cache[f"blocks.{L}.attn.hook_pattern"][0, :, query_pos].to(u.device)  # [head, k]
    vecs = comps.vectors[:, 0].to(u.device)  # [component, k, d_model]
    read = einops.einsum(vecs, u, "c k d_model, head k d_model -> c head k")
    contributions = read * A[None]
    value_bias = vbias[:, None] * A
    e = head_encoder(model, sae, site, [feature]).W[..., 0]
    v = cache[f"blocks.{L}.attn.hook_v"][0].to(u.device)  # [k, head, d_head]
    total = einops.einsum(v, e, "k head d_head, head d_head -> head k") * A
    return RDFAStep(feature, query_pos, comps.names, contributions, value_bias, total)


@torch.no_grad()
def rdfa_upstream_heads(
    model,
    sae: SAE,
    tokens: Int[torch.Tensor, "1 pos"] | str,
    feature: int,
    query_pos: int,
    head: int,
    site: Site | None = None,
) -> UpstreamHeadStep:
    """Second RDFA step along ``head``: every upstream head's term split by its own source positions."""
    site = sae_site(sae, site)
    feature = int(feature_ids(feature, sae.cfg.d_sae)[0])
    tokens = _one_row(model, tokens)
    L = site.layer
    if L == 0:
        raise ValueError("the SAE is at layer 0: there are no upstream heads")
    u, _ = _readout(model, sae, site, feature, tokens)
    u = u[head]  # [k, d_model]
    names = [f"blocks.{L}.attn.hook_pattern"]
    for up_l in range(L):
        names += [f"blocks.{up_l}.attn.hook_pattern", f"blocks.{up_l}.attn.hook_v"]
    cache = run_cache(model, tokens, names, stop_at_layer=L + 1)
    A = cache[f"blocks.{L}.attn.hook_pattern"][0, head, query_pos].to(u.device)  # [k]
    out = []
    for up_l in range(L):
        v = cache[f"blocks.{up_l}.attn.hook_v"][0].to(u.device)  # [k2, g, d_head]
        W_O = model.W_O[up_l].detach().float().to(u.device)
        vO = einops.einsum(v, W_O, "k2 g d_head, g d_head d_model -> g k2 d_model")
        proj = einops.einsum(vO, u, "g k2 d_model, k d_model -> g k k2")
        A_up = cache[f"blocks.{up_l}.attn.hook_pattern"][0].to(u.device)  # [g, k, k2]
        out.append(proj * A_up * A[None, :, None])
    return UpstreamHeadStep(feature, query_pos, head, torch.stack(out))


@torch.no_grad()
def rdfa_upstream_features(
    model,
    sae: SAE,
    upstream: SAE,
    tokens: Int[torch.Tensor, "1 pos"] | str,
    feature: int,
    query_pos: int,
    head: int,
    site: Site | None = None,
    upstream_site: Site | None = None,
) -> UpstreamFeatureStep:
    """Second RDFA step through an upstream attention-output SAE (hook_z or hook_attn_out of a layer < L).

    The upstream layer's output at every source s is ``x_hat[s] + err[s]`` (+ b_O for hook_z), and x_hat is
    its features times their decoder rows plus b_dec, so the layer's term splits into features exactly.
    """
    site = sae_site(sae, site)
    up = sae_site(upstream, upstream_site)
    if up.layer >= site.layer:
        raise ValueError(f"upstream SAE is at layer {up.layer}; it must be below the feature's layer {site.layer}")
    if up.kind == "z" and up.head is not None:
        raise ValueError("the upstream SAE must read the whole layer (hook_z of all heads, or hook_attn_out)")
    feature = int(feature_ids(feature, sae.cfg.d_sae)[0])
    tokens = _one_row(model, tokens)
    u, _ = _readout(model, sae, site, feature, tokens)
    u = u[head]  # [k, d_model]
    L = site.layer
    cache = run_cache(model, tokens, [f"blocks.{L}.attn.hook_pattern", up.hook_name], stop_at_layer=L + 1)
    A = cache[f"blocks.{L}.attn.hook_pattern"][0, head, query_pos].to(u.device)  # [k]
    x = up.flatten(cache[up.hook_name])[0].to(upstream.W_enc.device, upstream.W_enc.dtype)  # [k, d_in]
    acts = upstream.encode(x).float()  # [k, d_sae_up]
    err = (x - upstream.decode(acts)).float()
    dirs = residual_directions(model, upstream, up).to(u.device)  # [d_sae_up, d_model]
    read = einops.einsum(dirs, u, "j d_model, k d_model -> j k")
    contributions = acts.T.to(u.device) * read * A[None]
    b_dec = upstream.b_dec.detach().float()
    if up.kind == "z":
        W_O = model.W_O[up.layer].detach().float().to(u.device)
        to_resid = lambda vec: einops.einsum(  # noqa: E731
            einops.rearrange(vec.to(u.device), "... (head d_head) -> ... head d_head", head=W_O.shape[0]),
            W_O, "... head d_head, head d_head d_model -> ... d_model",
        )
        err_r, bias_r = to_resid(err), to_resid(b_dec) + model.b_O[up.layer].detach().float().to(u.device)
    else:
        err_r, bias_r = err.to(u.device), b_dec.to(u.device)
    error = (err_r * u).sum(-1) * A
    bias = (u @ bias_r) * A
    step1 = rdfa(model, sae, tokens, feature, query_pos, site)
    layer_terms = [i for i, n in enumerate(step1.names) if n.startswith(f"L{up.layer}H") or n == f"L{up.layer}.b_O"]
    total = step1.contributions[layer_terms, head].sum(0)
    return UpstreamFeatureStep(feature, query_pos, head, up, contributions, error, bias, total)


def top_terms(step: RDFAStep, n: int = 10) -> list[tuple[str, int, int, float]]:
    """The ``n`` largest |terms| of a first step as ``(component, head, source_pos, value)``."""
    flat = step.contributions.flatten()
    order = flat.abs().argsort(descending=True)[:n]
    n_heads, n_k = step.contributions.shape[1:]
    out = []
    for idx in order.tolist():
        c, rest = divmod(idx, n_heads * n_k)
        h, s = divmod(rest, n_k)
        out.append((step.names[c], h, s, float(flat[idx])))
    return out
