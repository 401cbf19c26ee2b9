"""Steering with SAE features: add ``coefficient * W_dec[feature]`` at the SAE's site for a ``with`` block.

For a hook_z SAE the vector is added to ``hook_z`` (head blocks of the decoder row), so it reaches the
residual stream through W_O: the attention layer's output changes by ``coefficient * W_dec[f] W_O``, exactly
what the feature does when it fires with that activation. For an attn_out SAE it is added to the attention
output before any post-attention norm. Several features at once add their vectors. Works with
``model(...)``, ``run_with_hooks`` and ``generate`` (with its key/value cache: each new token's position is
steered too); structural tokens (BOS, CLS, SEP) are never steered.

``positions``: None steers every text position; a [batch, pos] bool mask or a [pos] index list steers those
positions of full-length forwards only (``generate`` with a cache runs one position at a time, so a mask
refuses to guess and raises).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .activations import check_sites
from .errors import InputError
from .hooked import site_of
from .sae import SAE
from .sites import Site
from .spec import model_spec


def steering_vector(sae: SAE, features: int | Sequence[int], coefficients: float | Sequence[float]) -> torch.Tensor:
    """``sum_i c_i W_dec[f_i]``: [d_in], in the SAE's input space."""
    feats = [int(features)] if isinstance(features, int) else [int(f) for f in features]
    coefs = [float(coefficients)] * len(feats) if isinstance(coefficients, int | float) else [float(c) for c in coefficients]
    if len(coefs) != len(feats):
        raise InputError(f"{len(feats)} features but {len(coefs)} coefficients; pass one coefficient or one per feature")
    bad = [f for f in feats if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise InputError(f"feature ids must be in [0, {sae.cfg.d_sae}), got {bad}")
    W = sae.W_dec.detach()
    return (torch.tensor(coefs, dtype=W.dtype, device=W.device)[:, None] * W[feats]).sum(0)


@contextmanager
def steer(
    model,
    sae: SAE,
    features: int | Sequence[int],
    coefficients: float | Sequence[float],
    positions: torch.Tensor | Sequence[int] | None = None,
    site: Site | None = None,
) -> Iterator[torch.Tensor]:
    """Inside the block the SAE's site carries ``x + sum_i c_i W_dec[f_i]`` at ``positions``; yields the
    steering vector. Hooks are removed on exit, also on error."""
    site = site or site_of(sae)
    check_sites(model, [site])
    sae.check_site(site, model.cfg)
    spec = model_spec(model)
    vec = steering_vector(sae, features, coefficients)
    mask = _position_mask(positions)
    current: dict[str, torch.Tensor] = {}

    def remember(t: torch.Tensor, hook) -> None:
        current["tokens"] = t

    def add(tensor: torch.Tensor, hook) -> torch.Tensor:
        flat = site.flatten(tensor)
        b, p = flat.shape[:2]
        where = torch.ones(b, p, dtype=torch.bool, device=flat.device)
        toks = current.get("tokens")
        if toks is not None and toks.shape == (b, p):
            where &= spec.tokens.keep(toks.to(flat.device))
        if mask is not None:
            m = _positions_at(mask, p).to(flat.device)
            m = m.expand(b, -1) if m.ndim == 1 else m
            if m.shape != (b, p):
                raise InputError(
                    f"steering positions are for {tuple(m.shape)} tokens but this forward pass has {(b, p)} "
                    "(generate with a key/value cache runs one position at a time): steer with positions=None"
                )
            where &= m
        new = flat + where[..., None].to(flat.dtype) * vec.to(flat.device, flat.dtype)
        return site.unflatten(new, tensor)

    fwd = [("embed.hook_in", remember)] if "embed.hook_in" in model.hook_dict else []
    fwd.append((spec.capture_hook(site), add))
    with model.hooks(fwd_hooks=fwd):
        yield vec


def _position_mask(positions) -> torch.Tensor | None:
    """A bool mask as given, or a 1-D long tensor of position indices (None: every position)."""
    if positions is None:
        return None
    t = torch.as_tensor(positions)
    return t if t.dtype == torch.bool else t.long().reshape(-1)


def _positions_at(mask: torch.Tensor, n_pos: int) -> torch.Tensor:
    """The bool mask of a forward pass over ``n_pos`` positions (indices must all fall inside it)."""
    if mask.dtype == torch.bool:
        return mask
    if mask.numel() and int(mask.max()) >= n_pos:
        return torch.zeros(0, dtype=torch.bool)  # the caller reports the shape mismatch
    m = torch.zeros(n_pos, dtype=torch.bool)
    m[mask] = True
    return m
