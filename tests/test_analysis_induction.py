"""Induction scores of heads and features, and the prefix-length study, against hand computations."""

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.analysis.dfa import dfa_by_source
from sae_lens_attn.analysis.induction import (
    FeatureInductionScores,
    PrefixStudy,
    classify_prefix_heads,
    feature_induction_scores,
    head_induction_scores,
    induction_attribution,
    induction_feature_report,
    induction_features,
    prefix_length_study,
    prefix_tokens,
    repeated_tokens,
)


def _sae(site: Site, cfg, d_sae=32, seed=0) -> SAE:
    sae = SAE(SAEConfig(d_in=site.d_in(cfg), d_sae=d_sae, k=6, metadata={"hook_name": site.hook_name}), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae.requires_grad_(False)


def test_repeated_tokens_layout(tiny_neox):
    toks = repeated_tokens(tiny_neox, n_seq=5, length=20, seed=3)
    assert toks.shape == (5, 41)
    assert (toks[:, 0] == tiny_neox.tokenizer.bos_token_id).all()
    assert torch.equal(toks[:, 1:21], toks[:, 21:])
    for row in toks[:, 1:21]:
        assert len(set(row.tolist())) == 20  # no repeats inside r: only the second copy can be predicted
    assert not (toks[:, 1:] == tiny_neox.tokenizer.bos_token_id).any()
    assert not torch.equal(toks, repeated_tokens(tiny_neox, n_seq=5, length=20, seed=4))


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_head_scores_by_hand(fixture, request):
    model = request.getfixturevalue(fixture)
    toks = repeated_tokens(model, n_seq=3, length=8)
    scores = head_induction_scores(model, tokens=toks)
    _, cache = model.run_with_cache(toks)
    for layer in range(2):
        p = cache[f"blocks.{layer}.attn.hook_pattern"]
        for h in range(model.cfg.n_heads):
            ind = sum(float(p[b, h, t, t - 7]) for b in range(3) for t in range(9, 17)) / 24
            prev = sum(float(p[b, h, t, t - 1]) for b in range(3) for t in range(1, 17)) / 48
            assert scores.induction[layer, h] == pytest.approx(ind, abs=1e-6)
            assert scores.previous_token[layer, h] == pytest.approx(prev, abs=1e-6)


def test_feature_scores_by_hand(tiny_neox):
    site = Site(1)
    sae = _sae(site, tiny_neox.cfg)
    toks = repeated_tokens(tiny_neox, n_seq=4, length=10)
    scores = feature_induction_scores(tiny_neox, sae, tokens=toks)
    _, cache = tiny_neox.run_with_cache(toks)
    acts = sae.encode(site.flatten(cache[site.hook_name]))
    first, second = acts[:, 1:11], acts[:, 11:21]
    m1, m2 = first.sum((0, 1)), second.sum((0, 1))
    fired = (m1 + m2) > 0
    assert fired.sum() >= 5
    torch.testing.assert_close(scores.mass_second[fired], (m2 / (m1 + m2))[fired])
    assert (scores.mass_second[~fired] == 0).all()
    torch.testing.assert_close(scores.mean_second, second.mean((0, 1)))
    torch.testing.assert_close(scores.fire_second, (second > 0).float().mean((0, 1)))
    sub = feature_induction_scores(tiny_neox, sae, tokens=toks, features=[3, 1])
    torch.testing.assert_close(sub.mass_second, scores.mass_second[[3, 1]])


def test_induction_feature_selection():
    scores = FeatureInductionScores(
        features=torch.tensor([10, 11, 12, 13]),
        mass_second=torch.tensor([0.95, 0.99, 0.5, 0.97]),
        mean_first=torch.zeros(4),
        mean_second=torch.tensor([1.0, 3.0, 5.0, 2.0]),
        fire_second=torch.tensor([0.5, 0.05, 0.9, 0.3]),
        length=8,
    )
    assert induction_features(scores).tolist() == [13, 10]  # 11 fires too rarely, 12 fires on both copies
    assert induction_features(scores, min_fire=0.0).tolist() == [11, 13, 10]


def test_induction_attribution_by_hand(tiny_gpt2):
    site = Site(1)
    sae = _sae(site, tiny_gpt2.cfg, seed=1)
    toks = repeated_tokens(tiny_gpt2, n_seq=3, length=6)
    f = int(feature_induction_scores(tiny_gpt2, sae, tokens=toks).fire_second.argmax())
    att = induction_attribution(tiny_gpt2, sae, f, toks)
    res = dfa_by_source(tiny_gpt2, sae, toks, [f])
    head_mass = torch.zeros(tiny_gpt2.cfg.n_heads)
    tgt, tot = torch.zeros_like(head_mass), torch.zeros_like(head_mass)
    n = 0
    for b in range(3):
        for t in range(7, 13):
            if res.acts[b, t, 0] <= 0:
                continue
            n += 1
            head_mass += res.by_head[b, t, :, 0].clamp_min(0)
            tgt += res.by_source[b, t, :, t - 5, 0].clamp_min(0)
            tot += res.by_source[b, t, :, :, 0].clamp_min(0).sum(-1)
    assert att.n_tokens == n > 0
    torch.testing.assert_close(att.head_fraction, head_mass / head_mass.sum())
    torch.testing.assert_close(att.induction_source_fraction, torch.where(tot > 0, tgt / tot, torch.zeros_like(tot)))


def test_prefix_tokens_match_exactly_p_tokens_at_fixed_positions(tiny_neox):
    layouts = {}
    for p in (0, 1, 3, 6):
        toks, a1, a2 = prefix_tokens(tiny_neox, p, n_seq=4, max_prefix=6, gap=10, seed=2)
        layouts[p] = (toks.shape, a1, a2)
        assert a2 == toks.shape[1] - 1
        for row in toks:
            match = 0
            while match <= a1 and row[a2 - match] == row[a1 - match]:
                match += 1
            assert match == p
            assert len(set(row.tolist())) == row.numel() - p  # everything else is distinct
    assert len(set(layouts.values())) == 1  # positions never depend on p
    with pytest.raises(ValueError, match="prefix_length"):
        prefix_tokens(tiny_neox, 7, 2, max_prefix=6)


def test_prefix_study_reads_attention_from_A_to_B(tiny_neox):
    sae = _sae(Site(1), tiny_neox.cfg)
    study = prefix_length_study(tiny_neox, prefix_lengths=(0, 1, 4), n_seq=3, sae=sae, features=[0, 5], gap=8)
    assert study.head_scores.shape == (3, 2, tiny_neox.cfg.n_heads)
    assert study.feature_acts.shape == (3, 2)
    toks, a1, a2 = prefix_tokens(tiny_neox, 4, 3, max_prefix=4, gap=8, seed=0)
    _, cache = tiny_neox.run_with_cache(toks)
    torch.testing.assert_close(study.head_scores[2, 1], cache["blocks.1.attn.hook_pattern"][:, :, a2, a1 + 1].mean(0))
    acts = sae.encode(Site(1).flatten(cache["blocks.1.attn.hook_z"])[:, a2])
    torch.testing.assert_close(study.feature_acts[2], acts[:, [0, 5]].mean(0))


def test_classify_prefix_heads():
    scores = torch.zeros(3, 2, 3)
    scores[:, 1, 0] = torch.tensor([0.0, 0.6, 0.7])  # short-prefix: strong at p=1 already
    scores[:, 1, 1] = torch.tensor([0.0, 0.1, 0.8])  # long-prefix
    scores[:, 1, 2] = torch.tensor([0.0, 0.1, 0.2])  # not an induction head
    kinds = classify_prefix_heads(PrefixStudy([0, 1, 8], scores, None, None))
    got = {(k.layer, k.head): k.kind for k in kinds}
    assert got[(1, 0)] == "short-prefix" and got[(1, 1)] == "long-prefix" and got[(1, 2)] == "none"
    assert got[(0, 0)] == "none"
    with pytest.raises(ValueError, match="prefix length 1"):
        classify_prefix_heads(PrefixStudy([0, 8], scores[[0, 2]], None, None))


def test_induction_feature_report_combines_selection_and_attribution(tiny_gpt2):
    sae = _sae(Site(1), tiny_gpt2.cfg, seed=2)
    toks = repeated_tokens(tiny_gpt2, n_seq=4, length=8, seed=1)
    scores = feature_induction_scores(tiny_gpt2, sae, tokens=toks)
    chosen = induction_features(scores, min_mass=0.5, min_fire=0.0)[:3].tolist()
    assert chosen
    report = induction_feature_report(tiny_gpt2, sae, tokens=toks, top=3, min_mass=0.5, min_fire=0.0)
    assert [r.feature for r in report] == chosen
    for r in report:
        att = induction_attribution(tiny_gpt2, sae, r.feature, toks)
        assert r.head == int(att.head_fraction.argmax())
        assert r.head_fraction == pytest.approx(float(att.head_fraction.max()))
        assert r.source_fraction == pytest.approx(float(att.induction_source_fraction[r.head]))
        assert r.mass_second == pytest.approx(float(scores.mass_second[r.feature])) and r.mass_second >= 0.5
