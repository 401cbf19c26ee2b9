"""Each feature's direct effect on the logits (the paper's dashboards): the decoder row followed into the
residual stream (through W_O for hook_z SAEs) and on through the final norm's weight (centred for LayerNorm,
scale frozen) and W_U.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int

from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import UnsupportedModelError, model_spec, norm_affine

from ._common import FeatureIds, centre, feature_ids, normalization_kind, residual_directions, sae_site


class LogitEffects(NamedTuple):
    """Each feature's direct effect on the logits: top and bottom tokens."""

    features: Int[torch.Tensor, " f"]
    top_tokens: Int[torch.Tensor, "f k"]
    top_values: Float[torch.Tensor, "f k"]
    bottom_tokens: Int[torch.Tensor, "f k"]
    bottom_values: Float[torch.Tensor, "f k"]


@torch.no_grad()
def logit_weights(model, sae: SAE, features: FeatureIds = None, site: Site | None = None) -> Float[torch.Tensor, "f d_vocab"]:
    """``centre(d_i) * w_ln_final @ W_U`` with ``d_i`` the feature's residual direction
    (:func:`~._common.residual_directions`: W_dec[i] through W_O for hook_z, times the post-attention norm's
    weight on Gemma-2): the direction read by the unembedding with the final norm's scale frozen (centring
    for LayerNorm, none for RMSNorm; Gemma's ``1 + w`` weights included). Soft-capped logits (Gemma-2) are
    read before the cap. Refused for encoders, whose masked-LM head applies dense + GELU before its norm."""
    site = sae_site(sae, site)
    spec = model_spec(model)
    if spec.kind == "encoder":
        raise UnsupportedModelError(
            f"{spec.family} is an encoder: its masked-LM head applies a dense layer and GELU before the "
            "unembedding, so a feature has no direct (linear) logit effect"
        )
    dirs = residual_directions(model, sae, site, features)
    if hasattr(model, "ln_final"):
        w, _ = norm_affine(model, model.ln_final, dirs.device)
    else:
        w = torch.ones(dirs.shape[-1], device=dirs.device)
    kind = normalization_kind(model)
    W_U = model.W_U.detach().float().to(dirs.device)
    return centre(dirs, kind) * w @ W_U


def logit_effects(model, sae: SAE, features: FeatureIds = None, site: Site | None = None, k: int = 10) -> LogitEffects:
    """Top and bottom ``k`` tokens of :func:`logit_weights` per feature."""
    ids = feature_ids(features, sae.cfg.d_sae)
    weights = logit_weights(model, sae, ids, site)
    top = weights.topk(k, dim=-1)
    bottom = weights.topk(k, dim=-1, largest=False)
    return LogitEffects(ids, top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(), bottom.values.cpu())
