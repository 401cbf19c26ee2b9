"""Streamed feature statistics against a brute-force pass over all tokens, and logit effects against a hand
computation."""

from functools import partial

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.activations import harvest
from sae_lens_attn.analysis.features import (
    HIST_EDGES,
    StatsConfig,
    feature_stats,
    logit_effects,
    logit_weights,
    row_maxima,
)

from .conftest import random_rows


def _sae(site: Site, cfg, d_sae=24, k=4, seed=0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=site.d_in(cfg), d_sae=d_sae, k=k,
                        metadata={"hook_name": site.hook_name, "hook_head_index": site.head}), init=False)
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
    return sae.requires_grad_(False)


_rows = partial(random_rows, rows=10, n=16)


@pytest.fixture(scope="module")
def setup(tiny_neox):
    model = tiny_neox
    sae = _sae(Site(1), model.cfg)
    rows = _rows(model)
    x = harvest(model, rows, [Site(1)], drop_bos=False).acts[Site(1)]
    acts = sae.encode(x)  # [rows, pos, d_sae]
    acts[:, 0] = 0  # BOS positions are not counted
    cfg = StatsConfig(n_top=5, n_samples=6, ctx_left=3, ctx_right=2, batch_rows=3)
    stats = feature_stats(model, sae, rows, cfg=cfg)
    return model, sae, rows, acts, stats


def test_counts_density_and_max_match_brute_force(setup):
    model, sae, rows, acts, stats = setup
    assert stats.n_tokens == rows.numel() - rows.shape[0]
    fire = (acts > 0).sum((0, 1))
    assert torch.equal(stats.fire_count, fire)
    torch.testing.assert_close(stats.density, fire.float() / stats.n_tokens)
    torch.testing.assert_close(stats.max_act, acts.amax((0, 1)))
    torch.testing.assert_close(stats.act_sum, acts.sum((0, 1)), atol=1e-4, rtol=1e-5)
    assert 0 < int(fire.sum()) <= stats.n_tokens * sae.cfg.k  # TopK: at most k per token
    assert torch.equal(stats.hist_counts.sum(1), stats.fire_count)


def test_histogram_bins_match_brute_force(setup):
    _, _, _, acts, stats = setup
    f = int(stats.fire_count.argmax())
    vals = acts[..., f][acts[..., f] > 0]
    expected = torch.zeros(len(HIST_EDGES) - 1, dtype=torch.long)
    for v in vals.tolist():
        i = int((HIST_EDGES <= v).sum()) - 1
        expected[min(max(i, 0), len(expected) - 1)] += 1
    centres, counts = stats.histogram(f)
    assert torch.equal(counts, expected) and len(centres) == len(counts)


def _separated_top(acts_f: torch.Tensor, n: int, sep: int) -> list[tuple[int, int, float]]:
    """Brute force: (row, pos, act) of the top ``n`` firing tokens that are the first maximum of their row
    within ``sep - 1`` positions either side."""
    cands = []
    for r in range(acts_f.shape[0]):
        for p in range(acts_f.shape[1]):
            v = float(acts_f[r, p])
            if v <= 0:
                continue
            before = acts_f[r, max(0, p - sep + 1) : p]
            after = acts_f[r, p + 1 : p + sep]
            if (before >= v).any() or (after > v).any():
                continue
            cands.append((r, p, v))
    return sorted(cands, key=lambda c: -c[2])[:n]


def test_top_examples_are_the_true_top_with_their_context(setup):
    model, _, rows, acts, stats = setup
    sep = StatsConfig(ctx_left=3, ctx_right=2).separation
    assert sep == 3  # half the 6-token window, rounded up
    for f in range(acts.shape[-1]):
        want = _separated_top(acts[..., f], 5, sep)
        ex = stats.top_examples(f)
        torch.testing.assert_close(torch.tensor([e.activation for e in ex]), torch.tensor([w[2] for w in want]))
        for a in ex:  # overlapping windows of one row never make two examples
            assert all(abs(a.pos - b.pos) >= sep for b in ex if b is not a and b.row == a.row)
        for e in ex:
            assert acts[e.row, e.pos, f] == pytest.approx(e.activation)
            assert e.tokens[e.center] == rows[e.row, e.pos]
            for j, tok in enumerate(e.tokens):  # window j <-> position pos - ctx_left + j
                p = e.pos - 3 + j
                assert tok == (int(rows[e.row, p]) if 0 <= p < rows.shape[1] else -1)
                if tok >= 0:
                    assert e.acts[j] == pytest.approx(float(acts[e.row, p, f]))


def test_min_separation_one_keeps_every_position(tiny_neox, setup):
    model, sae, rows, acts, _ = setup
    stats = feature_stats(model, sae, rows, cfg=StatsConfig(n_top=5, n_samples=6, ctx_left=3, ctx_right=2,
                                                            min_separation=1))
    for f in range(acts.shape[-1]):
        flat = acts[..., f].flatten()
        n_fire = int((flat > 0).sum())
        want = flat.topk(min(5, n_fire)).values if n_fire else torch.empty(0)
        torch.testing.assert_close(torch.tensor([e.activation for e in stats.top_examples(f)]), want)
    with pytest.raises(ValueError, match="min_separation must be >= 1"):
        StatsConfig(min_separation=0)


def test_row_maxima_suppresses_neighbours_and_keeps_one_of_a_tie():
    inf = float("-inf")
    key = torch.tensor([[5.0, 4.0, inf, 1.0, 3.0, 3.0, inf, inf, 2.0]])[..., None]  # [1 row, 9 pos, 1 feature]
    got = row_maxima(key, 3)[0, :, 0].tolist()
    # 5 suppresses 4 (distance 1); 1 is within 2 of the 3s; of the tied 3s the first survives; 2 is alone
    assert got == [5.0, inf, inf, inf, 3.0, inf, inf, inf, 2.0]
    assert torch.equal(row_maxima(key, 1), key)
    two_rows = torch.stack([key[0], key[0].flip(0)])  # rows are independent
    assert row_maxima(two_rows, 3)[1, :, 0].tolist() == [2.0, inf, inf, 3.0, inf, inf, inf, inf, 5.0]


def test_samples_are_firing_examples_and_quantiles_are_ordered(setup):
    _, _, _, acts, stats = setup
    f = int(stats.fire_count.argmax())
    samples = stats.sample_examples(f)
    assert len(samples) == min(6, int(stats.fire_count[f]))
    assert len({(e.row, e.pos) for e in samples}) == len(samples)
    for e in samples:
        assert e.activation > 0 and acts[e.row, e.pos, f] == pytest.approx(e.activation)
    bins = stats.quantile_examples(f, n_bins=3, per_bin=1)
    levels = [g[0].activation for _, g in bins]
    assert levels == sorted(levels, reverse=True) and len(bins) == 3


def test_result_does_not_depend_on_batching_and_budget_stops_early(tiny_neox, setup):
    model, sae, rows, _, stats = setup
    other = feature_stats(model, sae, iter(rows.split(4)), cfg=StatsConfig(n_top=5, n_samples=6, ctx_left=3, ctx_right=2))
    assert torch.equal(other.fire_count, stats.fire_count)
    torch.testing.assert_close(other.top.value, stats.top.value)
    assert other.rows is None and stats.rows is rows
    part = feature_stats(model, sae, rows, cfg=StatsConfig(batch_rows=2), max_tokens=40)
    assert part.n_tokens == 60  # stops at the first batch boundary at or past 40 tokens: 2 batches of 2 x 15
    with pytest.raises(KeyError, match="not tracked"):
        feature_stats(model, sae, rows[:2], features=[1, 2]).top_examples(3)


def test_tracks_only_chosen_features(setup):
    model, sae, rows, acts, stats = setup
    few = feature_stats(model, sae, rows, features=[4, 9], cfg=StatsConfig(n_top=5, ctx_left=3, ctx_right=2))
    assert few.features.tolist() == [4, 9]
    assert torch.equal(few.fire_count, stats.fire_count[[4, 9]])
    assert [e.activation for e in few.top_examples(9)] == [e.activation for e in stats.top_examples(9)]


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_logit_effects_by_hand(fixture, request):
    model = request.getfixturevalue(fixture)
    site = Site(1)
    sae = _sae(site, model.cfg)
    d_head = model.cfg.d_head
    i = 7
    direction = sum(sae.W_dec[i, h * d_head : (h + 1) * d_head] @ model.W_O[1, h] for h in range(model.cfg.n_heads))
    direction = direction - direction.mean()  # LayerNorm centres
    manual = (direction * model.ln_final.weight) @ model.W_U
    torch.testing.assert_close(logit_weights(model, sae, [i])[0], manual, atol=1e-5, rtol=1e-5)
    eff = logit_effects(model, sae, [i, 3], k=4)
    assert eff.top_tokens[0].tolist() == manual.topk(4).indices.tolist()
    assert eff.bottom_tokens[0].tolist() == (-manual).topk(4).indices.tolist()
    assert (eff.top_values[:, :-1] >= eff.top_values[:, 1:]).all()
    # hook_attn_out SAEs: the decoder row is already in the residual stream
    out = _sae(Site(1, "attn_out"), model.cfg)
    d = out.W_dec[2] - out.W_dec[2].mean()
    torch.testing.assert_close(logit_weights(model, out, [2])[0], (d * model.ln_final.weight) @ model.W_U, atol=1e-5, rtol=1e-5)
