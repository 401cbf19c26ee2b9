"""Which features get a dashboard page by default: a spread over density, plus the most induction-like.

The densest features (what a "top by firing count" choice gives) fire on 10-30% of tokens and are the
least interpretable; rare ones are the most specific. :func:`default_features` takes features at evenly
spaced density quantiles of the features that fired (2 per decile for 20), and adds the features with the
largest share of their activation on the second copy of repeated random tokens (induction scores of
Kissane et al. 2024, section 4.2), among those that fire on enough of those tokens to matter.
"""

from __future__ import annotations

from sae_lens_attn.errors import InputError
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import UnsupportedModelError

from .features import FeatureStats
from .induction import FeatureInductionScores, feature_induction_scores, max_repeat_length


def density_spread(stats: FeatureStats, n: int) -> list[int]:
    """``n`` features at evenly spaced density quantiles (the (i + 1/2)/n quantiles) of the tracked features
    that fired, rarest first; all of them when fewer fired."""
    if n < 0:
        raise InputError(f"the number of features must be >= 0, got {n}")
    alive = (stats.fire_count > 0).nonzero()[:, 0]
    order = alive[stats.density[alive].argsort(stable=True)].tolist()
    if len(order) <= n:
        return [int(stats.features[i]) for i in order]
    picks = [order[int((i + 0.5) * len(order) / n)] for i in range(n)]
    return [int(stats.features[i]) for i in picks]


def most_induction_like(scores: FeatureInductionScores, n: int, min_fire: float = 0.1,
                        exclude: set[int] = frozenset()) -> list[int]:
    """The ``n`` features with the largest second-copy mass (ties: larger mean second-copy activation) among
    those firing on at least ``min_fire`` of second-copy tokens."""
    ok = (scores.fire_second >= min_fire) & (scores.mass_second > 0)
    idx = ok.nonzero()[:, 0].tolist()
    idx.sort(key=lambda i: (-float(scores.mass_second[i]), -float(scores.mean_second[i])))
    out = [int(scores.features[i]) for i in idx if int(scores.features[i]) not in exclude]
    return out[:n]


def default_features(stats: FeatureStats, n_spread: int = 20, induction: FeatureInductionScores | None = None,
                     n_induction: int = 5, min_fire: float = 0.1) -> list[int]:
    """:func:`density_spread` of ``n_spread`` features, then up to ``n_induction`` more from
    :func:`most_induction_like` (when ``induction`` scores are given) that fired in ``stats``."""
    spread = density_spread(stats, n_spread)
    if induction is None or n_induction <= 0:
        return spread
    tracked = {int(f) for f, c in zip(stats.features.tolist(), stats.fire_count.tolist()) if c > 0}
    ind = [f for f in most_induction_like(induction, len(induction.features), min_fire, set(spread)) if f in tracked]
    return spread + ind[:n_induction]


def induction_scores_or_none(model, sae: SAE, site: Site, stats: FeatureStats, seed: int = 0) -> FeatureInductionScores | None:
    """Induction scores of the tracked features on repeated random tokens (the longest repeat that fits,
    up to 32), or None where the model refuses them (no start token to frame the repeats)."""
    try:
        return feature_induction_scores(model, sae, seed=seed, features=stats.features, site=site,
                                        length=max_repeat_length(model))
    except UnsupportedModelError:
        return None
