"""Circuits: IOI prompts from the model's tokenizer, logit difference, the SAE spliced in with its error term,
zero/mean ablation, noising from a corrupted prompt, and attribution patching."""

from functools import partial

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.activations import splice
from sae_lens_attn.analysis.circuits import (
    ablate_features,
    attribute_features,
    feature_means,
    patch_features,
    position_mask,
    run_spliced,
    sae_spliced,
    top_features,
)
from sae_lens_attn.analysis.ioi import corrupt_ioi, logit_diff, make_ioi, single_token_names

from .conftest import random_rows

ARCHS = ["tiny_neox", "tiny_gpt2", "default_model"]


def _sae(site: Site, cfg, d_sae=64, k=8, seed=0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=site.d_in(cfg), d_sae=d_sae, k=k, metadata={"hook_name": site.hook_name}), init=False)
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(sae.cfg.d_in, generator=g) * 0.1)
    return sae.requires_grad_(False)


_tokens = partial(random_rows, rows=2, n=10)


@pytest.fixture(scope="module")
def ioi(default_model):
    data = make_ioi(default_model, n=12, seed=0)
    return data, corrupt_ioi(default_model, data, seed=1)


def test_names_are_filtered_to_single_tokens(default_model, tiny_neox):
    names = single_token_names(default_model.tokenizer)
    assert len(names) >= 10 and "Romeo" in names and len(set(names)) == len(names)
    for n in names:
        assert len(default_model.tokenizer(" " + n, add_special_tokens=False)["input_ids"]) == 1
    assert "Sarah" not in names  # two tokens for the Shakespeare tokenizer
    with pytest.raises(ValueError, match="single tokens for this tokenizer"):
        make_ioi(tiny_neox, 4)


def test_ioi_prompts_positions_and_patterns(default_model, ioi):
    data, _ = ioi
    tok = default_model.tokenizer
    assert len(data) == 12 and data.patterns[:4] == ["ABBA", "BABA", "ABBA", "BABA"]
    rows = torch.arange(12)
    assert torch.equal(data.tokens[rows, data.positions["IO"]], data.io_tokens)
    assert torch.equal(data.tokens[rows, data.positions["S1"]], data.s_tokens)
    assert torch.equal(data.tokens[rows, data.positions["S2"]], data.s_tokens)
    for i in range(12):
        end = int(data.positions["end"][i])
        assert tok.decode(data.tokens[i, 1 : end + 1].tolist()) == data.prompts[i]
        assert (data.tokens[i, end + 1 :] == tok.bos_token_id).all()
        assert data.prompts[i].endswith(" to")
        io_first = data.positions["IO"][i] < data.positions["S1"][i]
        assert bool(io_first) == (data.patterns[i] == "ABBA")
        assert data.positions["S2"][i] > max(data.positions["IO"][i], data.positions["S1"][i])
    assert data.mask("S2").sum() == 12 and data.mask("S2")[rows, data.positions["S2"]].all()


def test_abc_corruption_keeps_positions_and_changes_every_name(ioi):
    data, corr = ioi
    assert corr.tokens.shape == data.tokens.shape and corr.positions is data.positions
    rows = torch.arange(len(data))
    names = torch.stack([corr.tokens[rows, data.positions[k]] for k in ("IO", "S1", "S2")], 1)
    for i in range(len(data)):
        assert len(set(names[i].tolist())) == 3  # A, B, C: nothing repeats
        assert not {int(data.io_tokens[i]), int(data.s_tokens[i])} & set(names[i].tolist())
    same = corr.tokens == data.tokens
    name_pos = data.mask("IO") | data.mask("S1") | data.mask("S2")
    assert same[~name_pos].all() and not same[name_pos].any()


def test_logit_diff_by_hand():
    from sae_lens_attn.analysis.ioi import IOIDataset

    logits = torch.randn(3, 5, 11)
    data = IOIDataset(["a", "b", "c"], torch.zeros(3, 5, dtype=torch.long), torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]),
                      {"end": torch.tensor([4, 2, 3])}, ["ABBA"] * 3, [{}] * 3)
    manual = torch.stack([logits[0, 4, 1] - logits[0, 4, 4], logits[1, 2, 2] - logits[1, 2, 5], logits[2, 3, 3] - logits[2, 3, 6]])
    torch.testing.assert_close(logit_diff(logits, data, per_prompt=True), manual)
    torch.testing.assert_close(logit_diff(logits, data), manual.mean())


@pytest.mark.parametrize("fixture", ARCHS)
def test_spliced_sae_with_error_term_leaves_the_output_unchanged(fixture, request):
    model = request.getfixturevalue(fixture)
    sae = _sae(Site(1), model.cfg)
    toks = _tokens(model)
    clean = model(toks)
    out = run_spliced(model, sae, toks, edit=lambda f: f.clone())
    torch.testing.assert_close(out.logits, clean, atol=1e-5, rtol=1e-5)
    # and the error term is real: the reconstruction alone changes the output
    assert out.error.abs().max() > 1e-3
    with splice(model, Site(1), lambda flat: sae(flat)):
        assert (model(toks) - clean).abs().max() > 1e-4


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_zero_ablating_every_feature_leaves_b_dec_plus_error(fixture, request):
    model = request.getfixturevalue(fixture)
    sae = _sae(Site(1), model.cfg)
    toks = _tokens(model)
    got = ablate_features(model, sae, toks, list(range(64)))
    with splice(model, Site(1), lambda x: x - sae.decode(sae.encode(x)) + sae.b_dec):
        want = model(toks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    unchanged = ablate_features(model, sae, toks, [])
    torch.testing.assert_close(unchanged, model(toks), atol=1e-5, rtol=1e-5)


def test_ablation_at_one_position_is_causal(tiny_gpt2):
    sae = _sae(Site(1), tiny_gpt2.cfg)
    toks = _tokens(tiny_gpt2)
    feats = run_spliced(tiny_gpt2, sae, toks).features
    active = feats[:, 5].sum(0).nonzero()[:, 0].tolist()
    clean = tiny_gpt2(toks)
    got = ablate_features(tiny_gpt2, sae, toks, active, positions=torch.tensor([5, 5]))
    torch.testing.assert_close(got[:, :5], clean[:, :5], atol=1e-5, rtol=1e-5)
    assert (got[:, 5] - clean[:, 5]).abs().max() > 1e-3


def test_mean_ablation(tiny_neox):
    sae = _sae(Site(1), tiny_neox.cfg)
    toks = _tokens(tiny_neox, rows=1)
    clean = tiny_neox(toks)
    # the mean over one position of one prompt is its own value: nothing changes
    same = ablate_features(tiny_neox, sae, toks, list(range(64)), positions=torch.tensor([4]), mode="mean")
    torch.testing.assert_close(same, clean, atol=1e-5, rtol=1e-5)
    two = _tokens(tiny_neox, rows=2, seed=5)
    mask = position_mask(torch.tensor([4, 4]), two)
    means = feature_means(tiny_neox, sae, two, mask)
    feats = run_spliced(tiny_neox, sae, two).features
    torch.testing.assert_close(means, feats[:, 4].mean(0))
    got = ablate_features(tiny_neox, sae, two, list(range(64)), positions=mask, mode="mean", means=means)
    want_x = []

    def fn(x):
        f = sae.encode(x)
        err = x - sae.decode(f)
        f2 = f.clone()
        f2[:, 4] = means
        want_x.append(True)
        return sae.decode(f2) + err

    with splice(tiny_neox, Site(1), fn):
        want = tiny_neox(two)
    assert want_x
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mode must be"):
        ablate_features(tiny_neox, sae, toks, [1], mode="resample")


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_noising_from_a_corrupted_prompt(fixture, request):
    model = request.getfixturevalue(fixture)
    sae = _sae(Site(1), model.cfg)
    clean, corr = _tokens(model, seed=0), _tokens(model, seed=1)
    corr[:, :3] = clean[:, :3]
    torch.testing.assert_close(patch_features(model, sae, clean, clean, list(range(64))), model(clean), atol=1e-5, rtol=1e-5)
    got = patch_features(model, sae, clean, corr, list(range(64)), positions=torch.tensor([7, 7]))
    f_corr = run_spliced(model, sae, corr).features

    def fn(x):
        f = sae.encode(x)
        err = x - sae.decode(f)
        f2 = f.clone()
        f2[:, 7] = f_corr[:, 7]
        return sae.decode(f2) + err

    with splice(model, Site(1), fn):
        want = model(clean)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - model(clean)).abs().max() > 1e-5  # float noise is ~1e-7
    with pytest.raises(ValueError, match="one shape"):
        patch_features(model, sae, clean, corr[:, :5], [1])


def test_attribution_is_feature_change_times_gradient(tiny_gpt2):
    model = tiny_gpt2
    sae = _sae(Site(1), model.cfg)
    clean, corr = _tokens(model, seed=0), _tokens(model, seed=2)

    def metric(logits):
        return logits[:, -1, 3].sum() - logits[:, -1, 7].sum()

    att = attribute_features(model, sae, clean, corr, metric)
    assert att.clean_metric == pytest.approx(float(metric(model(clean))), abs=1e-4)
    f_clean = run_spliced(model, sae, clean).features
    f_corr = run_spliced(model, sae, corr).features
    diff = f_corr - f_clean
    idx = (diff.abs() * (torch.arange(10) >= 5)[None, :, None]).flatten().argmax()
    b, p, i = [int(v) for v in torch.unravel_index(idx, diff.shape)]
    eps = 1e-2

    def bump(f):
        f = f.clone()
        f[b, p, i] += eps
        return f

    fd = (float(metric(run_spliced(model, sae, clean, edit=bump).logits)) - att.clean_metric) / eps
    assert float(att.attribution[b, p, i]) == pytest.approx(fd * float(diff[b, p, i]), rel=0.05, abs=1e-5)
    top = top_features(att.attribution, n=3)
    assert len(top) == 3 and abs(top[0][1]) >= abs(top[2][1])


def test_ioi_machinery_on_the_embedded_model(default_model, ioi):
    data, corr = ioi
    sae = _sae(Site(1), default_model.cfg, d_sae=128, k=16)
    clean_ld = logit_diff(default_model(data.tokens), data)
    spliced = run_spliced(default_model, sae, data.tokens)
    assert float(logit_diff(spliced.logits, data)) == pytest.approx(float(clean_ld), abs=1e-4)
    att = attribute_features(default_model, sae, data.tokens, corr.tokens, lambda lg: logit_diff(lg, data))
    ranked = top_features(att.attribution, data.mask("end"), n=5)
    feats = [f for f, _ in ranked]
    ablated = logit_diff(ablate_features(default_model, sae, data.tokens, feats, data.positions["end"]), data)
    patched = logit_diff(patch_features(default_model, sae, data.tokens, corr.tokens, feats, data.positions["end"]), data)
    assert float(ablated) != pytest.approx(float(clean_ld), abs=1e-6)
    assert float(patched) != pytest.approx(float(clean_ld), abs=1e-6)


def test_hooks_are_removed_when_an_edit_fails(tiny_neox):
    sae = _sae(Site(1), tiny_neox.cfg)
    before = sum(len(hp._forward_hooks) for hp in tiny_neox.hook_dict.values())

    def boom(f):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with sae_spliced(tiny_neox, sae, edit=boom):
            tiny_neox(_tokens(tiny_neox))
    assert sum(len(hp._forward_hooks) for hp in tiny_neox.hook_dict.values()) == before
