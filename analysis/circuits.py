"""Circuits through an attention SAE: the SAE spliced in with its error term, feature ablations, noising and
attribution patching (Kissane et al. 2024, section 5; Marks et al. 2024 for the error term and attribution
patching; Syed et al. 2023). The tasks live beside it: :mod:`.copying` (name copying, a circuit the embedded
model has) and :mod:`.ioi` (indirect object identification, for models that do IOI, e.g. GPT-2 small).

With the SAE spliced in as ``x = x_hat(f) + err`` (err = x - x_hat computed on the same forward pass), the
model's output is unchanged until features are edited; an edit ``f -> f'`` then changes the site's activation
by exactly ``x_hat(f') - x_hat(f)``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int

from sae_lens_attn.activations import splice
from sae_lens_attn.errors import InputError
from sae_lens_attn.models import model_device
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site

from ._common import FeatureIds, feature_ids, sae_site

# --- the SAE spliced in ------------------------------------------------------------------------------------

Positions = Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, " batch"] | None


def position_mask(positions: Positions, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, pos] bool: a mask as is, one index per row, or None for every position."""
    if positions is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    positions = torch.as_tensor(positions)
    if positions.dtype == torch.bool:
        if positions.shape != tokens.shape:
            raise InputError(f"a position mask must have the tokens' shape {tuple(tokens.shape)}, got {tuple(positions.shape)}")
        return positions.to(tokens.device)
    if positions.shape != (tokens.shape[0],):
        raise InputError(f"positions must be one index per row ({tokens.shape[0]},), got {tuple(positions.shape)}")
    m = torch.zeros_like(tokens, dtype=torch.bool)
    m[torch.arange(tokens.shape[0]), positions.to(tokens.device)] = True
    return m


FeatureEdit = Callable[[Float[torch.Tensor, "batch pos d_sae"]], Float[torch.Tensor, "batch pos d_sae"]]


class SplicedOutput(NamedTuple):
    logits: Float[torch.Tensor, "batch pos vocab"]
    features: Float[torch.Tensor, "batch pos d_sae"]
    """The SAE's features on this run, before the edit."""
    error: Float[torch.Tensor, "batch pos d_in"]
    """The error term ``x - x_hat``."""


@contextmanager
def sae_spliced(model, sae: SAE, site: Site | None = None, edit: FeatureEdit | None = None, record: dict | None = None):
    """Inside the block, ``site``'s activation is ``x_hat(edit(f)) + (x - x_hat(f))``.

    Without ``edit`` the output is the clean model's (up to float rounding). ``record``, if given, receives
    ``features`` (before the edit) and ``error``. Hooks are removed on exit, also on error.
    """
    site = sae_site(sae, site)
    sae.check_site(site, model.cfg)

    def fn(flat: torch.Tensor) -> torch.Tensor:
        x = flat.to(sae.W_enc.device, sae.W_enc.dtype)
        feats = sae.encode(x)
        err = x - sae.decode(feats)
        if record is not None:
            record["features"] = feats.detach()
            record["error"] = err.detach()
        new = feats if edit is None else edit(feats)
        return (sae.decode(new) + err).to(flat.device)

    with splice(model, site, fn):
        yield model


@torch.no_grad()
def run_spliced(model, sae: SAE, tokens: torch.Tensor, site: Site | None = None, edit: FeatureEdit | None = None) -> SplicedOutput:
    """One forward pass with the SAE spliced in (and ``edit`` applied to its features)."""
    rec: dict = {}
    tokens = tokens.to(model_device(model))
    with sae_spliced(model, sae, site, edit, rec):
        logits = model(tokens, return_type="logits")
    return SplicedOutput(logits, rec["features"], rec["error"])


def _set_features(features: FeatureIds, d_sae: int, mask: torch.Tensor, values: Callable[[torch.Tensor], torch.Tensor]) -> FeatureEdit:
    ids = feature_ids(features, d_sae)

    def edit(f: torch.Tensor) -> torch.Tensor:
        out = f.clone()
        m = mask.to(f.device)
        sel = out[..., ids.to(f.device)]
        out[..., ids.to(f.device)] = torch.where(m[..., None], values(sel), sel)
        return out

    return edit


def edit_rows(features: Int[torch.Tensor, "batch m"], positions: Positions, tokens: torch.Tensor,
              values: Float[torch.Tensor, "batch pos d_sae"] | None = None) -> FeatureEdit:
    """An edit that sets each row's own ``features[row]`` at ``positions`` to ``values`` (e.g. the corrupted
    run's features: resample ablation / noising), or to 0 without ``values``."""
    mask = position_mask(positions, tokens)
    feats = torch.as_tensor(features, dtype=torch.long)

    def edit(f: torch.Tensor) -> torch.Tensor:
        out = f.clone()
        rows = torch.arange(f.shape[0], device=f.device)[:, None]
        ids = feats.to(f.device)
        for p in range(f.shape[1]):
            at = mask[:, p].to(f.device)
            if not at.any():
                continue
            new = values[:, p].to(f.device)[rows, ids] if values is not None else torch.zeros_like(out[rows, p, ids])
            out[rows, p, ids] = torch.where(at[:, None], new, out[rows, p, ids])
        return out

    return edit


@torch.no_grad()
def feature_means(model, sae: SAE, tokens: torch.Tensor, positions: Positions = None, site: Site | None = None) -> Float[torch.Tensor, " d_sae"]:
    """Mean of every feature over the chosen positions of ``tokens`` (mean-ablation values)."""
    out = run_spliced(model, sae, tokens, site)
    m = position_mask(positions, tokens.to(out.features.device))
    return out.features[m].mean(0)


@torch.no_grad()
def ablate_features(
    model,
    sae: SAE,
    tokens: torch.Tensor,
    features: FeatureIds,
    positions: Positions = None,
    mode: Literal["zero", "mean"] = "zero",
    means: Float[torch.Tensor, " d_sae"] | None = None,
    site: Site | None = None,
) -> Float[torch.Tensor, "batch pos vocab"]:
    """Logits with ``features`` zero- or mean-ablated at ``positions`` (error term kept).

    ``mode="mean"`` uses ``means`` (e.g. :func:`feature_means` over a reference distribution), else the
    features' means over ``positions`` of ``tokens`` themselves.
    """
    tokens = tokens.to(model_device(model))
    mask = position_mask(positions, tokens)
    ids = feature_ids(features, sae.cfg.d_sae)
    if mode == "zero":
        edit = _set_features(ids, sae.cfg.d_sae, mask, torch.zeros_like)
    elif mode == "mean":
        mu = means if means is not None else feature_means(model, sae, tokens, mask, site)
        sel = mu.to(sae.W_enc.device)[ids.to(sae.W_enc.device)]
        edit = _set_features(ids, sae.cfg.d_sae, mask, lambda cur: sel.to(cur.device).expand_as(cur))
    else:
        raise InputError(f"mode must be 'zero' or 'mean', got {mode!r}")
    return run_spliced(model, sae, tokens, site, edit).logits


@torch.no_grad()
def patch_features(
    model,
    sae: SAE,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    features: FeatureIds,
    positions: Positions = None,
    site: Site | None = None,
) -> Float[torch.Tensor, "batch pos vocab"]:
    """Noising: logits of the clean run with ``features`` at ``positions`` set to their values on the
    corrupted prompt (same shape; the clean run's error term kept)."""
    if clean.shape != corrupted.shape:
        raise InputError(f"clean and corrupted tokens must have one shape, got {tuple(clean.shape)} and {tuple(corrupted.shape)}")
    corr = run_spliced(model, sae, corrupted, site).features
    clean = clean.to(model_device(model))
    mask = position_mask(positions, clean)
    ids = feature_ids(features, sae.cfg.d_sae).to(corr.device)
    corr_sel = corr[..., ids]

    def edit(f: torch.Tensor) -> torch.Tensor:
        out = f.clone()
        sel = out[..., ids]
        out[..., ids] = torch.where(mask.to(f.device)[..., None], corr_sel.to(f.device), sel)
        return out

    return run_spliced(model, sae, clean, site, edit).logits


class FeatureAttribution(NamedTuple):
    """First-order estimate of patching each feature from the corrupted run (attribution patching)."""

    attribution: Float[torch.Tensor, "batch pos d_sae"]
    """``(f_corrupted - f_clean) * d metric / d f`` at the clean run."""
    clean_metric: float
    corrupted_metric: float


def attribute_features(
    model,
    sae: SAE,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: Callable[[torch.Tensor], torch.Tensor],
    site: Site | None = None,
) -> FeatureAttribution:
    """Which features matter for ``metric`` (e.g. ``lambda logits: logit_diff(logits, data)``): the gradient of
    the metric with respect to the spliced-in features, times their change under the corruption (Syed et al.
    2023; Marks et al. 2024). Rank with ``attribution.sum(0)`` and check the top ones with
    :func:`patch_features` / :func:`ablate_features`."""
    site = sae_site(sae, site)
    corr = run_spliced(model, sae, corrupted, site)
    leaf: dict = {}

    def edit(f: torch.Tensor) -> torch.Tensor:
        f = f.detach().requires_grad_(True)
        leaf["f"] = f
        return f

    clean = clean.to(model_device(model))
    with torch.enable_grad(), sae_spliced(model, sae, site, edit):
        logits = model(clean, return_type="logits")
        value = metric(logits)
        (grad,) = torch.autograd.grad(value, leaf["f"])
    with torch.no_grad():
        clean_f = leaf["f"].detach()
        attribution = (corr.features.to(clean_f.device) - clean_f) * grad
    return FeatureAttribution(attribution, float(value.detach()), float(metric(corr.logits)))


def top_features(attribution: Float[torch.Tensor, "batch pos d_sae"], mask: torch.Tensor | None = None, n: int = 10,
                 ) -> list[tuple[int, float]]:
    """Features with the largest total |attribution| over the batch at ``mask`` (all positions when None),
    as ``(feature, summed attribution)``."""
    a = attribution if mask is None else attribution * mask.to(attribution.device)[..., None]
    total = a.sum((0, 1))
    order = total.abs().argsort(descending=True)[:n]
    return [(int(i), float(total[i])) for i in order]
