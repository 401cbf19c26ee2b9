"""Upstream SAE features as terms of a QK attribution: an attention layer's output split into features.

An SAE at an earlier attention layer l reads ``x`` (hook_z: the heads' outputs before W_O, all heads or one;
hook_attn_out: the block's own output) and ``x = sum_j f_j W_dec[j] + b_dec + err`` with ``err = x - x_hat``
(its error term), exactly. The layer's output at a position is linear in x (``z W_O``, per head, for hook_z;
the identity for hook_attn_out, which already holds b_O), so the components that x covers -- the heads
``L{l}H{g}`` (one head for a one-head SAE) and, for hook_attn_out, ``L{l}.b_O`` -- are replaced by one term
per active feature, the error term and the decoder bias, each in the layer's output space (d_model). From
there they travel to the attended layer exactly as the heads did (:class:`~.residual.WriteMaps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import einops
import torch
from jaxtyping import Float

from sae_lens_attn.errors import InputError
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site, split_heads
from sae_lens_attn.spec import attn_weights, model_spec

from ._common import sae_site


class SAETerms(NamedTuple):
    """One SAE's terms at one position, in its layer's attention-output space."""

    layer: int
    replaced: frozenset[str]
    """Component names (as in :class:`~.residual.ResidualComponents`) these terms stand in for."""
    names: list[str]
    """``{label}:{feature}`` per active feature, then ``{label}:error`` and ``{label}:b_dec``."""
    out: Float[torch.Tensor, "n d_model"]
    acts: Float[torch.Tensor, " n_active"]
    """The active features' activations (in ``names`` order)."""


class UpstreamSAE(NamedTuple):
    sae: SAE
    site: Site
    label: str


def upstream_saes(model, saes: Sequence[SAE], layer: int) -> list[UpstreamSAE]:
    """Check that ``saes`` read earlier attention layers and cover disjoint components; label them."""
    out: list[UpstreamSAE] = []
    covered: dict[str, str] = {}
    for sae in saes:
        site = sae_site(sae)
        sae.check_site(site, model.cfg)
        if site.layer >= layer:
            raise InputError(f"the SAE at {site.label} is not upstream of layer {layer}'s attention: only SAEs at "
                             f"layers < {layer} write into its input")
        label = site.label
        for name in replaced_components(model, site):
            if name in covered:
                raise InputError(f"SAEs {covered[name]} and {label} both split {name}: give them as separate views "
                                 "(saes=[a, b]), not in one (saes=[(a, b)])")
            covered[name] = label
        out.append(UpstreamSAE(sae, site, label))
    return out


def replaced_components(model, site: Site) -> list[str]:
    spec = model_spec(model)
    heads = [site.head] if site.head is not None else list(range(spec.n_heads))
    names = [f"L{site.layer}H{g}" for g in heads]
    if site.kind == "attn_out" and spec.has_b_O:
        names.append(f"L{site.layer}.b_O")
    return names


def to_output(model, site: Site, vec: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_model"]:
    """A vector of the SAE's input space as the layer's attention output (without b_O)."""
    if site.kind == "attn_out":
        return vec
    W_O = attn_weights(model, site.layer, vec.device).W_O.to(vec.dtype)  # [head, d_head, d_model]
    if site.head is not None:
        return vec @ W_O[site.head]
    return einops.einsum(split_heads(vec, W_O.shape[0]), W_O, "... head d_head, head d_head d_model -> ... d_model")


def sae_terms(model, up: UpstreamSAE, x: Float[torch.Tensor, " d_in"]) -> SAETerms:
    """``up``'s active features, error term and decoder bias at one position whose site activation is ``x``."""
    sae = up.sae
    acts = sae.encode(x.to(sae.W_enc.device, sae.W_enc.dtype)[None])[0]
    ids = acts.nonzero().flatten()
    a = acts[ids].double()
    dirs = sae.W_dec.detach()[ids].double() * a[:, None]
    b_dec = sae.b_dec.detach().double()
    # x_hat = f W_dec + b_dec in float64, so that features + error + b_dec == x to float64 rounding (a float32
    # decode leaves errors that a query/key norm's 1/rms can amplify past the 1e-4 check)
    err = x.to(dirs.device, torch.float64) - dirs.sum(0) - b_dec
    vecs = torch.cat([dirs, err[None], b_dec[None]])
    names = [f"{up.label}:{int(j)}" for j in ids.tolist()] + [f"{up.label}:error", f"{up.label}:b_dec"]
    return SAETerms(up.site.layer, frozenset(replaced_components(model, up.site)), names,
                    to_output(model, up.site, vecs.cpu()), a.cpu())
