"""Weight-based head attribution and the head-by-head feature survey (Kissane et al. 2024, sections 3.1, 4.1).

A hook_z SAE's decoder row for feature i is the concatenation of one block per head. The share of head k is
``h_{i,k} = ||W_dec[i, block k]|| / sum_j ||W_dec[i, block j]||``: a feature written mostly by one head has
nearly all its decoder norm in that head's block. Listing each head's top features by this share, with a few
words about each (its top-activating tokens, its top logits), is the paper's survey of head polysemanticity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float

from sae_lens_attn.errors import InputError
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site

from ._common import decoder_head_blocks, sae_site


def head_shares(sae: SAE, n_heads: int, site: Site | None = None) -> Float[torch.Tensor, "d_sae n_heads"]:
    """``h_{i,k}``: each feature's decoder-norm share per head; rows sum to 1 (0 rows for all-zero decoders).

    ``n_heads`` is ``model.cfg.n_heads``. A one-head hook_z SAE puts all its share on its head.
    """
    site = sae_site(sae, site)
    norms = decoder_head_blocks(sae, site, n_heads).norm(dim=-1)  # [d_sae, n_heads]
    total = norms.sum(-1, keepdim=True)
    return torch.where(total > 0, norms / total.clamp_min(1e-30), torch.zeros_like(norms))


@dataclass
class HeadFeature:
    """One feature in a head's list."""

    feature: int
    share: float
    """Decoder-norm share of this head, h_{i,k}."""
    density: float = math.nan
    """Firing frequency over the statistics' tokens (nan when not measured)."""
    description: str = ""
    """A few words: top-activating tokens and top logits, when feature statistics were given."""


@dataclass
class HeadReport:
    """The survey entry for one head: its top features by weight-based attribution."""

    layer: int
    head: int
    features: list[HeadFeature] = field(default_factory=list)
    """Top features by share of this head, largest first."""
    n_dominant: int = 0
    """Features that belong to this head: alive (when density is known), with their largest share on this head,
    and that share at least ``dominant`` (0.5: more than all other heads together; the survey's criterion,
    :mod:`~.survey`)."""
    mean_share: float = 0.0
    """Mean share of this head over all (alive) features; 1/n_heads if heads were used evenly."""


def head_report(
    sae: SAE,
    n_heads: int,
    site: Site | None = None,
    top: int = 10,
    density: Float[torch.Tensor, " d_sae"] | None = None,
    describe: Callable[[int], str] | None = None,
    dominant: float = 0.5,
    min_density: float = 0.0,
) -> list[HeadReport]:
    """One :class:`HeadReport` per head: the head-by-head survey of Kissane et al. (2024), section 4.1.

    ``density`` (firing frequency per feature, e.g. from :func:`~sae_lens_attn.analysis.features.feature_stats`)
    drops features at or below ``min_density`` (dead ones, with the default 0) and is shown per feature;
    ``describe(i)`` labels a feature (e.g. :meth:`FeatureStats.describe`).
    """
    site = sae_site(sae, site)
    shares = head_shares(sae, n_heads, site).cpu()
    alive = torch.ones(shares.shape[0], dtype=torch.bool)
    if density is not None:
        density = density.detach().float().cpu()
        if density.shape != (shares.shape[0],):
            raise InputError(f"density must have shape ({shares.shape[0]},), got {tuple(density.shape)}")
        alive = density > min_density
    best = shares.argmax(-1)
    reports = []
    for h in range(n_heads):
        col = torch.where(alive, shares[:, h], torch.full_like(shares[:, h], -1.0))
        order = col.argsort(descending=True)[: min(top, int(alive.sum()))]
        feats = [
            HeadFeature(
                feature=int(i),
                share=float(shares[i, h]),
                density=float(density[i]) if density is not None else math.nan,
                description=describe(int(i)) if describe is not None else "",
            )
            for i in order
        ]
        n_dom = int(((best == h) & (shares[:, h] >= dominant) & alive).sum())
        mean = float(shares[alive, h].mean()) if alive.any() else 0.0
        reports.append(HeadReport(site.layer, h, feats, n_dom, mean))
    return reports


def format_head_report(reports: Sequence[HeadReport], per_head: int = 5) -> str:
    """Plain text: one block per head with its top features, share and description."""
    lines = []
    for r in reports:
        lines.append(f"L{r.layer}H{r.head}: {r.n_dominant} features belong to it (the largest decoder-norm share, and "
                     f">= 0.5), mean share {r.mean_share:.3f}")
        for f in r.features[:per_head]:
            dens = "" if math.isnan(f.density) else f"  density {f.density:.2e}"
            desc = f"  {f.description}" if f.description else ""
            lines.append(f"    #{f.feature:<6d} share {f.share:.2f}{dens}{desc}")
    return "\n".join(lines)
