"""Recursive DFA: with attention patterns and LayerNorm scales frozen, the value-side DFA splits exactly into
upstream components (embeddings, each upstream head, b_O, MLPs, LayerNorm bias and b_V), and one step further
into the upstream heads' own source positions or an upstream SAE's features plus its error term."""

from functools import partial

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.analysis.dfa import dfa_by_source
from sae_lens_attn.analysis.rdfa import (
    rdfa,
    rdfa_upstream_features,
    rdfa_upstream_heads,
    residual_components,
    top_terms,
)

from .conftest import random_rows


def _sae(site: Site, cfg, d_sae=32, seed=0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=site.d_in(cfg), d_sae=d_sae, k=4,
                        metadata={"hook_name": site.hook_name, "hook_head_index": site.head}), init=False)
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g) * 3)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(torch.randn(sae.cfg.d_in, generator=g))
    return sae.requires_grad_(False)


_tokens = partial(random_rows, rows=1, n=14)


def _close(a, b):
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= 1e-5 * scale, (err, scale)


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2", "default_model"])
def test_residual_components_sum_to_the_residual_stream(fixture, request):
    model = request.getfixturevalue(fixture)
    toks = _tokens(model)
    comps = residual_components(model, toks, 1)
    n_heads = model.cfg.n_heads
    expected = ["embed"] + (["pos_embed"] if fixture == "tiny_gpt2" else [])
    expected += [f"L0H{h}" for h in range(n_heads)] + ["L0.b_O", "L0.mlp"]
    assert comps.names == expected
    _, cache = model.run_with_cache(toks)
    _close(comps.vectors.sum(0), cache["blocks.1.hook_resid_pre"])
    # the heads' parts add up to the attention output
    _close(comps.vectors[[comps.names.index(f"L0H{h}") for h in range(n_heads)] + [comps.names.index("L0.b_O")]].sum(0),
           cache["blocks.0.hook_attn_out"])


@pytest.mark.parametrize("site", [Site(1), Site(1, "attn_out"), Site(1, head=1)], ids=str)
@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_first_step_is_an_exact_split_of_dfa_by_source(fixture, site, request):
    model = request.getfixturevalue(fixture)
    sae = _sae(site, model.cfg)
    toks = _tokens(model)
    t, feature = 11, 6
    step = rdfa(model, sae, toks, feature, t)
    n_heads = model.cfg.n_heads
    assert step.contributions.shape == (len(step.names), n_heads, 14)
    ref = dfa_by_source(model, sae, toks, [feature]).by_source[0, t, :, :, 0]
    assert ref.abs().max() > 1e-3
    _close(step.total, ref)
    _close(step.contributions.sum(0) + step.value_bias, step.total)
    # every component really contributes (not an all-in-one term that hides a wrong split)
    per_component = step.contributions.abs().sum((1, 2))
    assert (per_component > 0).sum() >= len(step.names) - 1
    assert step.contributions[:, :, t + 1 :].abs().max() == 0  # no future sources


def test_first_step_on_the_embedded_model(default_model):
    sae = _sae(Site(1), default_model.cfg, seed=4)
    toks = _tokens(default_model, n=30, seed=4)
    step = rdfa(default_model, sae, toks, 3, 25)
    _close(step.contributions.sum(0) + step.value_bias, step.total)
    ref = dfa_by_source(default_model, sae, toks, [3]).by_source[0, 25, :, :, 0]
    _close(step.total, ref)
    terms = top_terms(step, 5)
    assert len(terms) == 5 and abs(terms[0][3]) >= abs(terms[-1][3])
    name, h, s, value = terms[0]
    assert step.component(name)[h, s] == value


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_second_step_through_upstream_heads_sums_to_their_first_step_terms(fixture, request):
    model = request.getfixturevalue(fixture)
    sae = _sae(Site(1), model.cfg, seed=1)
    toks = _tokens(model, seed=1)
    step = rdfa(model, sae, toks, 2, 12)
    for head in (0, 3):
        up = rdfa_upstream_heads(model, sae, toks, 2, 12, head)
        assert up.by_source.shape == (1, model.cfg.n_heads, 14, 14)
        first = torch.stack([step.component(f"L0H{g}")[head] for g in range(model.cfg.n_heads)])
        assert first.abs().max() > 1e-4
        _close(up.by_source[0].sum(-1), first)


@pytest.mark.parametrize("up_site", [Site(0), Site(0, "attn_out")], ids=str)
@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_second_step_through_an_upstream_sae_is_exact(fixture, up_site, request):
    model = request.getfixturevalue(fixture)
    sae = _sae(Site(1), model.cfg, seed=2)
    upstream = _sae(up_site, model.cfg, d_sae=24, seed=3)
    toks = _tokens(model, seed=2)
    res = rdfa_upstream_features(model, sae, upstream, toks, 4, 10, head=1)
    assert res.contributions.shape == (24, 14)
    assert res.total.abs().max() > 1e-4
    assert (res.contributions != 0).any(dim=1).sum() >= 4  # several features carry part of it
    _close(res.contributions.sum(0) + res.error + res.bias, res.total)


def test_errors(tiny_neox):
    sae = _sae(Site(1), tiny_neox.cfg)
    two_rows = torch.cat([_tokens(tiny_neox), _tokens(tiny_neox, seed=1)])
    with pytest.raises(ValueError, match="one row"):
        rdfa(tiny_neox, sae, two_rows, 0, 3)
    with pytest.raises(ValueError, match="outside the prompt"):
        rdfa(tiny_neox, sae, _tokens(tiny_neox), 0, 14)
    with pytest.raises(ValueError, match="no upstream heads"):
        rdfa_upstream_heads(tiny_neox, _sae(Site(0), tiny_neox.cfg), _tokens(tiny_neox), 0, 3, 0)
    with pytest.raises(ValueError, match="must be below"):
        rdfa_upstream_features(tiny_neox, sae, _sae(Site(1), tiny_neox.cfg), _tokens(tiny_neox), 0, 3, 0)
