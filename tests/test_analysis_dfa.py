"""Direct feature attribution: by head it sums exactly to the pre-activation minus the bias term, and by source
position it sums exactly to the head's term, on GPT-NeoX and GPT-2 bridges (nonzero biases) and the embedded
model."""

from functools import partial

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.activations import harvest
from sae_lens_attn.analysis.dfa import dfa, dfa_by_source, head_fractions

from .conftest import random_rows

SITES = [Site(1), Site(1, head=2), Site(1, "attn_out"), Site(0)]


def _sae(site: Site, cfg, d_sae=64, seed=0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=site.d_in(cfg), d_sae=d_sae, k=8,
                        metadata={"hook_name": site.hook_name, "hook_head_index": site.head}), init=False)
    sae.reset_parameters(g)
    with torch.no_grad():  # an encoder that is not the decoder's transpose, and nonzero biases
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g) * 3)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(torch.randn(sae.cfg.d_in, generator=g))
    return sae.requires_grad_(False)


_tokens = partial(random_rows, rows=2, n=12)


def _close(a, b, scale):
    err = float((a - b).abs().max())
    assert err <= 1e-5 * max(1.0, scale), (err, scale)


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_hook_v_already_holds_the_value_bias(fixture, request):
    # The fact DFA by source position relies on: z_h[t] = sum_s A[t,s] v_h[s] with v from hook_v, no b_V to add.
    model = request.getfixturevalue(fixture)
    toks = _tokens(model)
    _, cache = model.run_with_cache(toks)
    x = cache["blocks.1.ln1.hook_out"]
    v = cache["blocks.1.attn.hook_v"]
    b_V = model.b_V[1]
    assert b_V.abs().max() > 0.05  # the fixture's biases are nonzero, so the check means something
    torch.testing.assert_close(v - torch.einsum("bpm,hmd->bphd", x, model.W_V[1]), b_V.expand_as(v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", SITES, ids=str)
@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_dfa_by_head_sums_to_pre_minus_bias(fixture, site, request):
    model = request.getfixturevalue(fixture)
    sae = _sae(site, model.cfg)
    toks = _tokens(model)
    res = dfa(model, sae, toks)
    assert res.by_head.shape == (2, 12, model.cfg.n_heads, 64)
    # the pre-activation from an independent path: harvest the site and encode
    x = harvest(model, toks, [site], drop_bos=False).acts[site]
    pre = sae.encode_pre(x)
    scale = float(pre.abs().max())
    assert scale > 1.0
    _close(res.pre, pre, scale)
    _close(res.by_head.sum(2) + res.bias, pre, scale)
    torch.testing.assert_close(res.acts, sae.encode(x))
    if site.head is not None:  # a one-head SAE reads nothing from the other heads
        others = [h for h in range(model.cfg.n_heads) if h != site.head]
        assert res.by_head[:, :, others].abs().max() == 0


@pytest.mark.parametrize("site", SITES, ids=str)
@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_dfa_by_source_sums_over_sources_to_dfa_by_head(fixture, site, request):
    model = request.getfixturevalue(fixture)
    sae = _sae(site, model.cfg, seed=1)
    toks = _tokens(model, seed=1)
    feats = [0, 7, 33]
    res = dfa_by_source(model, sae, toks, feats)
    assert res.by_source.shape == (2, 12, model.cfg.n_heads, 12, 3)
    scale = float(res.by_head.abs().max())
    assert scale > 0.1
    _close(res.by_source.sum(3), res.by_head, scale)
    _close(res.by_head.sum(2) + res.bias, res.pre, float(res.pre.abs().max()))
    full = dfa(model, sae, toks, feats)
    _close(full.by_head, res.by_head, scale)
    # causal: nothing comes from later source positions
    later = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)
    assert res.by_source.permute(0, 1, 3, 2, 4)[:, later].abs().max() == 0


def test_dfa_matches_a_hand_computation_for_one_head(tiny_gpt2):
    model = tiny_gpt2
    site = Site(1)
    sae = _sae(site, model.cfg, seed=2)
    toks = _tokens(model, rows=1, seed=2)
    res = dfa_by_source(model, sae, toks, [5])
    _, cache = model.run_with_cache(toks)
    h, d_head, t = 3, model.cfg.d_head, 9
    w = sae.W_enc[h * d_head : (h + 1) * d_head, 5]
    A = cache["blocks.1.attn.hook_pattern"][0, h, t]
    x = cache["blocks.1.ln1.hook_out"][0]
    v = x @ model.W_V[1, h] + model.b_V[1, h]
    manual = torch.stack([A[s] * (v[s] @ w) for s in range(12)])
    torch.testing.assert_close(res.by_source[0, t, h, :, 0], manual, atol=1e-5, rtol=1e-5)
    bias = sae.b_enc[5] - sae.b_dec @ sae.W_enc[:, 5]
    torch.testing.assert_close(res.bias[0], bias, atol=1e-5, rtol=1e-5)


def test_exact_on_the_embedded_model(default_model):
    site = Site(1)
    sae = _sae(site, default_model.cfg, d_sae=32, seed=3)
    toks = _tokens(default_model, rows=1, n=40, seed=3)
    res = dfa_by_source(default_model, sae, toks, [1, 2, 3, 4])
    _close(res.by_source.sum(3), res.by_head, float(res.by_head.abs().max()))
    _close(res.by_head.sum(2) + res.bias, res.pre, float(res.pre.abs().max()))


def test_text_input_and_argument_errors(tiny_neox):
    sae = _sae(Site(1), tiny_neox.cfg)
    res = dfa(tiny_neox, sae, "to be or not to be", [3])
    assert res.pre.shape[0] == 1 and res.pre.shape[-1] == 1
    with pytest.raises(ValueError, match="needs explicit features"):
        dfa_by_source(tiny_neox, sae, "to be", None)
    with pytest.raises(ValueError, match=r"feature ids must be in \[0, 64\)"):
        dfa(tiny_neox, sae, "to be", [64])
    no_meta = SAE(SAEConfig(d_in=32, d_sae=8, k=2))
    with pytest.raises(ValueError, match="no hook_name"):
        dfa(tiny_neox, no_meta, "to be")
    wrong = _sae(Site(1, "attn_out"), tiny_neox.cfg)
    with pytest.raises(ValueError, match="d_in mismatch"):
        dfa(tiny_neox, wrong, "to be", site=Site(1, head=1))


def test_head_fractions():
    by_head = torch.tensor([[2.0, -1.0, 2.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    frac = head_fractions(by_head)
    assert frac[0].tolist() == [0.5, 0.0, 0.5, 0.0]
    assert frac[1].tolist() == [0.0] * 4
