"""Hooked SAEs (attach_saes) and steering, against hand-written splices."""

from __future__ import annotations

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.activations import harvest, splice
from sae_lens_attn.hooked import attach_saes
from sae_lens_attn.spec import attn_weights
from sae_lens_attn.steering import steer

from .conftest import random_rows


def _sae(d_in: int, site: Site, seed: int) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=64, k=6, metadata={"hook_name": site.hook_name}))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


@pytest.fixture(scope="module")
def setup(tiny_neox):
    toks = random_rows(tiny_neox, 3, 12, seed=4)
    saes = {Site(0): _sae(32, Site(0), 0), Site(1): _sae(32, Site(1), 1), Site(1, "attn_out"): _sae(32, Site(1, "attn_out"), 2)}
    return tiny_neox, toks, saes


def _close(a, b, tol=1e-5):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def test_error_term_keeps_the_output_and_features_come_from_one_pass(setup):
    model, toks, saes = setup
    clean = model(toks)
    two = [saes[Site(0)], saes[Site(1)]]
    with attach_saes(model, two, use_error_term=True) as hooked:
        assert _close(model(toks), clean)
        feats = hooked.features(toks)
        names = hooked.acts_names
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
    assert names == ["blocks.0.attn.hook_z.hook_sae_acts_post", "blocks.1.attn.hook_z.hook_sae_acts_post"]
    h = harvest(model, toks, [Site(0), Site(1)], drop_bos=False)
    for site in (Site(0), Site(1)):
        want = saes[site].encode(h.acts[site])
        assert _close(feats[site], want) and _close(cache[f"{site.hook_name}.hook_sae_acts_post"], want)
    assert not [n for n in model.hook_dict if "hook_sae" in n], "hook points removed on exit"
    assert _close(model(toks), clean)


def test_without_error_term_the_site_is_the_reconstruction(setup):
    model, toks, saes = setup
    sae = saes[Site(1, "attn_out")]
    keep = toks != model.tokenizer.bos_token_id
    with splice(model, Site(1, "attn_out"), lambda x: sae.decode(sae.encode(x)), keep):
        want = model(toks)
    with attach_saes(model, sae):
        got = model(toks)
    assert _close(got, want)


def test_editing_features_through_run_with_hooks(setup):
    model, toks, saes = setup
    site, sae = Site(1), saes[Site(1)]
    x = harvest(model, toks, [site], drop_bos=False).acts[site]
    acts = sae.encode(x)
    f = int(acts[:, 1:].gt(0).sum((0, 1)).argmax())  # a feature that fires
    keep = (toks != model.tokenizer.bos_token_id)[..., None]
    removed = acts[..., f : f + 1] * sae.W_dec.detach()[f]  # its contribution to the reconstruction
    with splice(model, site, lambda flat: torch.where(keep, flat - removed, flat)):
        want = model(toks)

    def zero_f(t, hook):
        t[..., f] = 0
        return t

    with attach_saes(model, sae, use_error_term=True) as hooked:
        got = model.run_with_hooks(toks, fwd_hooks=[(hooked[site].name("hook_sae_acts_post"), zero_f)])
        assert _close(model(toks), model(toks))
    assert _close(got, want)


def test_hooks_are_removed_when_the_block_raises(setup):
    model, toks, saes = setup
    clean = model(toks)
    with pytest.raises(RuntimeError, match="boom"), attach_saes(model, saes[Site(0)]):
        raise RuntimeError("boom")
    assert not [n for n in model.hook_dict if "hook_sae" in n]
    assert _close(model(toks), clean)
    with pytest.raises(ValueError, match="two SAEs for one site"):
        with attach_saes(model, [saes[Site(0)], saes[Site(0)]]):
            pass


def test_steering_adds_the_decoder_row_through_W_O(setup):
    model, toks, saes = setup
    sae = saes[Site(1)]
    feats, coefs = [3, 7], [4.0, -2.0]
    W_O = attn_weights(model, 1).W_O  # [head, d_head, d_model]
    dec = (torch.tensor(coefs)[:, None] * sae.W_dec.detach()[feats]).sum(0).reshape(4, 8)
    delta = torch.einsum("hd,hdm->m", dec, W_O)  # what the attention output gains
    keep = (toks != model.tokenizer.bos_token_id)[..., None]
    with splice(model, Site(1, "attn_out"), lambda o: torch.where(keep, o + delta, o)):
        want = model(toks)
    with steer(model, sae, feats, coefs) as vec:
        got = model(toks)
    assert _close(vec, dec.reshape(-1)) and _close(got, want, 1e-4)
    only = torch.zeros_like(toks, dtype=torch.bool)
    only[:, 5] = True
    with splice(model, Site(1, "attn_out"), lambda o: torch.where(only[..., None], o + delta, o)):
        want5 = model(toks)
    with steer(model, sae, feats, coefs, positions=[5]):
        assert _close(model(toks), want5, 1e-4)


def test_steering_and_hooked_saes_in_generate(default_model):
    model = default_model
    site = Site(1)
    sae = _sae(256, site, 3)
    prompt = torch.tensor([[0, *model.tokenizer(" My lord,", add_special_tokens=False)["input_ids"]]])
    greedy = dict(max_new_tokens=6, do_sample=False, verbose=False)
    clean = model.generate(prompt, **greedy)
    with attach_saes(model, sae, use_error_term=True):
        assert torch.equal(model.generate(prompt, **greedy), clean)
    with steer(model, sae, 5, 200.0):
        steered = model.generate(prompt, **greedy)
    assert not torch.equal(steered, clean) and torch.equal(steered[:, : prompt.shape[1]], prompt)
    with pytest.raises(ValueError, match="positions=None"), steer(model, sae, 5, 1.0, positions=[2]):
        model.generate(prompt, **greedy)
