"""Do an SAE's features carry a circuit's signal at one layer? Three causal checks on clean/corrupted prompts
(Kissane et al. 2024, section 5; Marks et al. 2024):

* **Layer share**: the share of the clean-corrupted gap removed by patching the whole site (every head's
  ``z``) from the corrupted run at ``positions``: what this layer carries at all, the ceiling for its features.
* **Top vs random features**: each prompt's ``n`` features with the most negative attribution
  (:func:`~.circuits.attribute_features`: gradient times the change under the corruption) patched to their
  corrupted values, the clean run's error term kept; against ``n`` features drawn at random, per prompt, from
  those active at the positions on either prompt. Shares are ``(m_clean - m_patched) / (m_clean - m_corr)``.
* **Attribution vs patching**: Spearman's rank correlation between each of the ``n_rank`` top features'
  summed attribution and the metric's actual change when that feature alone is patched in every prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from jaxtyping import Float, Int

from sae_lens_attn.activations import splice
from sae_lens_attn.errors import InputError
from sae_lens_attn.models import model_device
from sae_lens_attn.sae import SAE

from ._common import sae_site
from .circuits import attribute_features, edit_rows, patch_features, position_mask, run_spliced
from .copying import spearman

Metric = Callable[[Float[torch.Tensor, "batch pos vocab"]], Float[torch.Tensor, ""]]
"""Mean metric over prompts of the logits (e.g. ``lambda lg: logit_diff(lg, data)``)."""


class FeatureCircuitCheck(NamedTuple):
    layer_share: float
    top_share: float
    random_share: float
    spearman: float
    top: Int[torch.Tensor, "batch n"]
    """Each prompt's top features (most negative attribution at ``positions``)."""
    ranked: Int[torch.Tensor, " n_rank"]
    """The features with the most negative summed attribution."""
    predicted: Float[torch.Tensor, " n_rank"]
    actual: Float[torch.Tensor, " n_rank"]
    """The metric's change when each ranked feature alone is patched (every prompt, at ``positions``)."""
    clean_metric: float
    corrupted_metric: float


def _share(clean: float, corr: float, m: float) -> float:
    return (clean - m) / (clean - corr)


@torch.no_grad()
def _layer_patched(model, sae: SAE, clean: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor, metric: Metric) -> float:
    site = sae_site(sae)
    got = {}
    with splice(model, site, lambda x: got.setdefault("x", x)):
        model(corrupted, return_type="logits")
    corr_x = got["x"]
    with splice(model, site, lambda x: torch.where(mask[..., None], corr_x, x)):
        return float(metric(model(clean, return_type="logits")))


def _random_active(active: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for row in active:
        ids = row.nonzero()[:, 0]
        if len(ids) < n:
            raise InputError(f"a prompt has only {len(ids)} active features at the positions, fewer than n={n}; lower n")
        rows.append(ids[torch.randperm(len(ids), generator=g)[:n]])
    return torch.stack(rows)


def feature_circuit_check(
    model,
    sae: SAE,
    clean: Int[torch.Tensor, "batch pos"],
    corrupted: Int[torch.Tensor, "batch pos"],
    metric: Metric,
    positions: Int[torch.Tensor, " batch"],
    n: int = 10,
    n_rank: int = 20,
    seed: int = 0,
) -> FeatureCircuitCheck:
    """The three checks of the module docstring at one position per prompt (e.g. the last token)."""
    dev = model_device(model)
    clean, corrupted = clean.to(dev), corrupted.to(dev)
    mask = position_mask(positions, clean)
    pos = torch.as_tensor(positions).to(dev)
    rows = torch.arange(clean.shape[0], device=dev)
    att = attribute_features(model, sae, clean, corrupted, metric)
    c, x = att.clean_metric, att.corrupted_metric
    per_prompt = att.attribution[rows, pos]  # [batch, d_sae]
    top = per_prompt.argsort(dim=1)[:, :n]
    clean_f = run_spliced(model, sae, clean).features[rows, pos]
    corr_run = run_spliced(model, sae, corrupted).features
    rand = _random_active(((clean_f > 0) | (corr_run[rows, pos] > 0)).cpu(), n, seed)

    def patched(feats: torch.Tensor) -> float:
        return float(metric(run_spliced(model, sae, clean, edit=edit_rows(feats, mask, clean, corr_run)).logits))

    total = per_prompt.sum(0)
    ranked = total.argsort()[:n_rank]
    actual = torch.tensor([float(metric(patch_features(model, sae, clean, corrupted, [int(f)], mask))) - c for f in ranked])
    predicted = total[ranked].cpu()
    return FeatureCircuitCheck(
        _share(c, x, _layer_patched(model, sae, clean, corrupted, mask, metric)), _share(c, x, patched(top)),
        _share(c, x, patched(rand)), spearman(predicted, actual), top.cpu(), ranked.cpu(), predicted, actual, c, x,
    )
