"""Recursive direct feature attribution (RDFA; Kissane et al. 2024, section 3.3 and their Circuit Explorer).

Freeze the attention patterns and the norm scales of one prompt. Then everything between the residual
stream and the feature is linear, and a feature's DFA through head h from source position s,

    DFA_{i,h,s}[t] = A_h[t, s] (v_h[s] . e_{h,i}),     e_{h,i} = W_enc[h-block, i],
    v_h[s] = ln1(resid[s]) W_V[h] + b_V[h],      ln1(r) = centre(r) / scale[s] * w + b,

splits exactly over any decomposition of ``resid[s]`` (:func:`~.residual.residual_components`: embeddings,
each upstream head, each upstream MLP, the attention output biases, and on post-norm models the norms'
biases): component r_c contributes ``A_h[t, s] (r_c[s] . u_{h,s})`` with the read-out direction
``u_{h,s} = centre(w * (W_V[h] e_{h,i})) / scale[s]``, and the norm bias and b_V add a constant
``A_h[t, s] ((b W_V[h] + b_V[h]) . e_{h,i})``. RMSNorm does not centre; on post-norm models (BERT) attention
reads the residual stream itself (no ln1: ``u = W_V[h] e``, the constant is b_V's). With grouped-query
attention W_V and b_V are the key/value head's that query head h reads; missing biases are zeros.

One step further back, an upstream head's output at s is again a mix over its own source positions,
``z_{l,g}[s] W_O[l,g] = sum_{s'} A_{l,g}[s, s'] v_{l,g}[s'] W_O[l,g]``, carried to layer L's input through
the frozen norms in between (:class:`~.residual.WriteMaps`); an upstream SAE splits an attention layer's
output into features plus its error term: both split the first step's terms exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import einops
import torch
from jaxtyping import Float, Int

from sae_lens_attn.errors import InputError
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site, split_heads
from sae_lens_attn.spec import attn_weights, model_spec, norm_affine

from ._common import as_tokens, feature_ids, head_encoder, output_directions, run_cache, sae_site
from .residual import ResidualComponents, WriteMaps, residual_components

__all__ = ["RDFAStep", "ResidualComponents", "UpstreamFeatureStep", "UpstreamHeadStep", "rdfa",
           "rdfa_upstream_features", "rdfa_upstream_heads", "residual_components", "top_terms"]


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


def _readout(model, sae: SAE, site: Site, feature: int, tokens: torch.Tensor):
    """Per-head value read-out of one feature at the SAE's layer: (u [head, k, d_model], bias [head])."""
    L = site.layer
    spec = model_spec(model)
    e = head_encoder(model, sae, site, [feature]).W[..., 0]  # [head, d_head]
    aw = attn_weights(model, L, e.device)
    a = einops.einsum(aw.W_V, e, "head d_model d_head, head d_head -> head d_model")
    n_pos = tokens.shape[1]
    if spec.attn_norm is None:  # post-norm blocks: attention reads the residual stream itself
        return a[:, None, :].expand(-1, n_pos, -1), (aw.b_V * e).sum(-1)
    w, b = norm_affine(model, model.blocks[L].ln1, e.device)
    a = a * w
    if spec.attn_norm == "LN":
        a = a - a.mean(-1, keepdim=True)
    cache = run_cache(model, tokens, [f"blocks.{L}.ln1.hook_scale"], stop_at_layer=L + 1)
    scale = cache[f"blocks.{L}.ln1.hook_scale"][0, :, 0].to(e.device)  # [k]
    u = a[:, None, :] / scale[None, :, None]  # [head, k, d_model]
    vbias = einops.einsum(b, aw.W_V, "d_model, head d_model d_head -> head d_head") + aw.b_V
    return u, (vbias * e).sum(-1)


def _one_row(model, tokens, sae: SAE | None = None) -> torch.Tensor:
    tokens = as_tokens(model, tokens, sae)
    if tokens.shape[0] != 1:
        raise InputError(f"RDFA follows one prompt: pass one row of tokens, got {tokens.shape[0]}")
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
    tokens = _one_row(model, tokens, sae)
    L = site.layer
    if not 0 <= query_pos < tokens.shape[1]:
        raise InputError(f"query_pos {query_pos} is outside the prompt (length {tokens.shape[1]})")
    comps = residual_components(model, tokens, L)
    u, vbias = _readout(model, sae, site, feature, tokens)
    cache = run_cache(model, tokens, [f"blocks.{L}.attn.hook_pattern", f"blocks.{L}.attn.hook_v"], stop_at_layer=L + 1)
    A = cache[f"blocks.{L}.attn.hook_pattern"][0, :, query_pos].to(u.device)  # [head, k]
    vecs = comps.vectors[:, 0].to(u.device)  # [component, k, d_model]
    read = einops.einsum(vecs, u, "c k d_model, head k d_model -> c head k")
    contributions = read * A[None]
    value_bias = vbias[:, None] * A
    e = head_encoder(model, sae, site, [feature]).W[..., 0]
    v = model_spec(model).per_query_head(cache[f"blocks.{L}.attn.hook_v"][0].to(u.device), 1)  # [k, head, d_head]
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
    tokens = _one_row(model, tokens, sae)
    L = site.layer
    if L == 0:
        raise InputError("the SAE is at layer 0: there are no upstream heads")
    spec = model_spec(model)
    maps = WriteMaps(model, tokens, L)
    u, _ = _readout(model, sae, site, feature, tokens)
    u = u[head]  # [k, d_model]
    names = [f"blocks.{L}.attn.hook_pattern"]
    for up_l in range(L):
        names += [f"blocks.{up_l}.attn.hook_pattern", f"blocks.{up_l}.attn.hook_v"]
    cache = run_cache(model, tokens, names, stop_at_layer=L + 1)
    A = cache[f"blocks.{L}.attn.hook_pattern"][0, head, query_pos].to(u.device)  # [k]
    out = []
    for up_l in range(L):
        v = spec.per_query_head(cache[f"blocks.{up_l}.attn.hook_v"][0].to(u.device), 1)  # [k2, g, d_head]
        W_O = attn_weights(model, up_l, u.device).W_O
        vO = einops.einsum(v, W_O, "k2 g d_head, g d_head d_model -> g k2 d_model")
        u_up = maps.attn_pullback(up_l, u)  # the read-out as seen at layer up_l's attention output
        proj = einops.einsum(vO, u_up, "g k2 d_model, k d_model -> g k k2")
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
        raise InputError(f"upstream SAE is at layer {up.layer}; it must be below the feature's layer {site.layer}")
    if up.kind == "z" and up.head is not None:
        raise InputError("the upstream SAE must read the whole layer (hook_z of all heads, or hook_attn_out)")
    feature = int(feature_ids(feature, sae.cfg.d_sae)[0])
    tokens = _one_row(model, tokens, sae)
    u, _ = _readout(model, sae, site, feature, tokens)
    L = site.layer
    u = WriteMaps(model, tokens, L).attn_pullback(up.layer, u[head])  # [k, d_model], at the upstream output
    hook = model_spec(model).capture_hook(up)
    cache = run_cache(model, tokens, [f"blocks.{L}.attn.hook_pattern", hook], stop_at_layer=L + 1)
    A = cache[f"blocks.{L}.attn.hook_pattern"][0, head, query_pos].to(u.device)  # [k]
    x = up.flatten(cache[hook])[0].to(upstream.W_enc.device, upstream.W_enc.dtype)  # [k, d_in]
    acts = upstream.encode(x).float()  # [k, d_sae_up]
    err = (x - upstream.decode(acts)).float()
    dirs = output_directions(model, upstream, up).to(u.device)  # [d_sae_up, d_model]
    read = einops.einsum(dirs, u, "j d_model, k d_model -> j k")
    contributions = acts.T.to(u.device) * read * A[None]
    b_dec = upstream.b_dec.detach().float()
    if up.kind == "z":
        aw = attn_weights(model, up.layer, u.device)

        def to_out(vec: torch.Tensor) -> torch.Tensor:
            heads = split_heads(vec.to(u.device), aw.W_O.shape[0])
            return einops.einsum(heads, aw.W_O, "... head d_head, head d_head d_model -> ... d_model")

        err_r, bias_r = to_out(err), to_out(b_dec) + aw.b_O
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
