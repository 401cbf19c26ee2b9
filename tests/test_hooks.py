"""Hook sites against a manual computation from W_V and the attention pattern, on two architectures."""

from functools import partial

import pytest
import torch

from sae_lens_attn.activations import harvest, splice
from sae_lens_attn.sites import Site

from .conftest import random_rows

_tokens = partial(random_rows, rows=2, n=12)


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_hook_z_matches_manual_head_computation(fixture, request):
    model = request.getfixturevalue(fixture)
    toks = _tokens(model)
    layer = 1
    _, cache = model.run_with_cache(toks)
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q, k]
    x = cache[f"blocks.{layer}.ln1.hook_out"]  # what W_V reads
    W_V = model.W_V[layer]  # [head, d_model, d_head]
    b_V = model.b_V[layer]  # [head, d_head]
    v = torch.einsum("bpm,hmd->bphd", x, W_V) + b_V
    z_manual = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    h = harvest(model, toks, [Site(layer), Site(layer, head=2)], drop_bos=False)
    flat = h.acts[Site(layer)]
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    assert flat.shape == (2, 12, n_heads * d_head)
    torch.testing.assert_close(flat, z_manual.reshape(2, 12, n_heads * d_head), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h.acts[Site(layer, head=2)], z_manual[:, :, 2], atol=1e-5, rtol=1e-4)


def test_attn_out_is_z_through_W_O(tiny_neox):
    model = tiny_neox
    toks = _tokens(model)
    h = harvest(model, toks, [Site(0), Site(0, "attn_out")], drop_bos=False)
    W_O = model.W_O[0]  # [head, d_head, d_model]
    z = h.acts[Site(0)].reshape(2, 12, model.cfg.n_heads, model.cfg.d_head)
    out = torch.einsum("bphd,hdm->bpm", z, W_O) + model.b_O[0]
    torch.testing.assert_close(h.acts[Site(0, "attn_out")], out, atol=1e-5, rtol=1e-4)


def test_many_layers_one_pass_equals_separate_passes(tiny_neox):
    toks = _tokens(tiny_neox, seed=1)
    both = harvest(tiny_neox, toks, [Site(0), Site(1)])
    for site in (Site(0), Site(1)):
        alone = harvest(tiny_neox, toks, [site])
        assert torch.equal(both.acts[site], alone.acts[site])


def test_bos_positions_are_dropped_by_default(tiny_neox):
    toks = _tokens(tiny_neox)
    toks[1, 5] = tiny_neox.tokenizer.bos_token_id
    h = harvest(tiny_neox, toks, [Site(0)])
    assert not h.mask[:, 0].any() and not h.mask[1, 5]
    assert int(h.mask.sum()) == toks.numel() - 3
    assert harvest(tiny_neox, toks, [Site(0)], drop_bos=False).mask.all()


@pytest.mark.parametrize("fixture", ["tiny_neox", "tiny_gpt2"])
def test_gradient_free_harvest_stops_after_the_last_requested_hook(fixture, request):
    """Nothing after the last site runs (that layer's MLP, the final norm, the unembedding), the values are
    those of a full pass, and the model is whole afterwards."""
    model = request.getfixturevalue(fixture)
    last = model.cfg.n_layers - 1
    toks = _tokens(model, seed=3)
    logits = model(toks)
    later = [f"blocks.{last}.mlp.hook_in", "ln_final.hook_in", "unembed.hook_in"]
    fired: dict[str, int] = dict.fromkeys(later, 0)
    handles = [model.hook_dict[n].register_forward_hook(lambda *a, n=n: fired.__setitem__(n, fired[n] + 1))
               for n in later]
    try:
        sites = [Site(0), Site(last, "attn_out"), Site(last)]
        h = harvest(model, toks, sites)
        assert fired == dict.fromkeys(later, 0)
        _, cache = model.run_with_cache(toks, names_filter=[s.hook_name for s in sites])
        assert all(fired[n] == 1 for n in later)  # the counters do see a full pass
        for s in sites:
            torch.testing.assert_close(h.acts[s], s.flatten(cache[s.hook_name]), rtol=0, atol=0)
        torch.testing.assert_close(model(toks), logits, rtol=0, atol=0)  # and the model is unchanged
    finally:
        for handle in handles:
            handle.remove()


def _n_hooks(model):
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in model.hook_dict.values())


def test_hooks_are_removed_also_on_error(tiny_neox):
    before = _n_hooks(tiny_neox)
    toks = _tokens(tiny_neox)

    def boom(flat):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with splice(tiny_neox, Site(1), boom):
            tiny_neox(toks)
    assert _n_hooks(tiny_neox) == before
    harvest(tiny_neox, toks, [Site(0), Site(1, "attn_out")], with_grad=True)
    assert _n_hooks(tiny_neox) == before


def test_unknown_layer_is_a_clear_error(tiny_neox):
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        harvest(tiny_neox, _tokens(tiny_neox), [Site(7)])


def test_splice_identity_leaves_logits_unchanged(tiny_gpt2):
    toks = _tokens(tiny_gpt2)
    clean = tiny_gpt2(toks)
    with splice(tiny_gpt2, Site(1), lambda flat: flat.clone()):
        same = tiny_gpt2(toks)
    torch.testing.assert_close(clean, same)
    with splice(tiny_gpt2, Site(1), torch.zeros_like):
        changed = tiny_gpt2(toks)
    assert not torch.allclose(clean, changed)
