"""The known circuit of the embedded model: a layer-0 previous-token head and a layer-1 induction head.

An SAE trained on layer-1 hook_z must have induction features (activation mass on the second copy of
``[BOS, r, r]``), and at least one of them must get >= 70% of its DFA from an induction head, with most of that
head's DFA coming from the token after the earlier occurrence (Kissane et al. 2024, section 4.2). Slow: it
trains an SAE. It needs the final embedded model (the provisional one is untrained and has no induction head).
"""

import pytest

from sae_lens_attn import Site
from sae_lens_attn.analysis.induction import InductionFeature, head_induction_scores, induction_feature_report
from sae_lens_attn.models import SAMPLE_TEXT

pytestmark = pytest.mark.slow

#: Thresholds of the check (the issue's numbers: DFA share >= 70% on the induction head).
MIN_HEAD_FRACTION = 0.7
MIN_SOURCE_FRACTION = 0.5
INDUCTION_HEAD_SCORE = 0.4


def induction_heads(model, layer: int, length: int = 30) -> dict[int, float]:
    """Heads of ``layer`` whose induction score on [BOS, r, r] is at least INDUCTION_HEAD_SCORE."""
    scores = head_induction_scores(model, n_seq=16, length=length, seed=7).induction[layer]
    return {h: float(s) for h, s in enumerate(scores.tolist()) if s >= INDUCTION_HEAD_SCORE}


def circuit_features(model, sae, site: Site, heads: dict[int, float]) -> tuple[list[InductionFeature], list[InductionFeature]]:
    """(induction features, those whose DFA comes from an induction head via the token after the earlier
    occurrence)."""
    found = induction_feature_report(model, sae, n_seq=16, length=30, seed=1, site=site, top=20, min_mass=0.8, min_fire=0.02)
    good = [f for f in found if f.head in heads and f.head_fraction >= MIN_HEAD_FRACTION
            and f.source_fraction >= MIN_SOURCE_FRACTION]
    return found, good


def test_layer1_sae_has_an_induction_feature_computed_by_the_induction_head(default_model, tmp_path):
    from sae_lens_attn.training import TrainConfig, train

    heads = induction_heads(default_model, layer=1)
    assert heads, "the embedded model has no layer-1 induction head (is it still the provisional, untrained model?)"
    text = tmp_path / "train.txt"
    text.write_text(SAMPLE_TEXT.read_text(encoding="utf-8")[:400_000], encoding="utf-8")
    result = train(TrainConfig(
        dataset=str(text), layers="1", k=16, expansion_factor=4, tokens=600_000, batch_size=2048, lr=2e-3,
        context_size=256, eval_rows=8, device="cpu", out_dir=str(tmp_path / "run"), progress=False,
        checkpoint_every=0,
    ), log=lambda *a: None)
    site = Site(1)
    sae = result.saes[site]
    found, good = circuit_features(default_model, sae, site, heads)
    summary = [(f.feature, round(f.mass_second, 2), f.head, round(f.head_fraction, 2), round(f.source_fraction, 2))
               for f in found]
    assert found, "no SAE feature puts >= 80% of its activation mass on the second copy of [BOS, r, r]"
    assert good, (
        f"induction heads {heads}; no induction feature gets >= {MIN_HEAD_FRACTION:.0%} of its DFA from one of them "
        f"with >= {MIN_SOURCE_FRACTION:.0%} from the token after the earlier occurrence. "
        f"(feature, mass, head, head share, source share): {summary}"
    )
