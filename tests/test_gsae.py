"""g-SAE (Olmo et al. 2024): gradients at sites, the selection rule, and many sites from one pass."""

from functools import partial

import torch

from sae_lens_attn.activations import harvest
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.sites import Site
from sae_lens_attn.stream import activation_batches
from sae_lens_attn.training.trainer import OptimConfig, Trainer

from .conftest import random_rows

_tokens = partial(random_rows, rows=3, n=16)


def test_site_gradients_equal_autograd_of_separately_computed_loss(tiny_neox):
    model = tiny_neox
    toks = _tokens(model)
    sites = [Site(0), Site(1), Site(1, "attn_out"), Site(0, head=1)]
    h = harvest(model, toks, sites, with_grad=True, drop_bos=False)
    for site in sites:
        # the loss computed independently: make this one site's activation a leaf and differentiate
        leaf = {}

        def hook(t, hook, leaf=leaf):
            leaf["x"] = t.detach().requires_grad_(True)
            return leaf["x"]

        with model.hooks(fwd_hooks=[(site.hook_name, hook)]), torch.enable_grad():
            logits = model(toks)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1), reduction="sum"
            )
            (g,) = torch.autograd.grad(loss, leaf["x"])
        torch.testing.assert_close(h.grads[site], site.flatten(g), rtol=1e-4, atol=1e-6)
        assert not h.grads[site].requires_grad
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients stored


def _sae(selection, beta=1.0, seed=0):
    sae = SAE(SAEConfig(d_in=32, d_sae=128, k=8, selection=selection, gsae_beta=beta), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def test_beta_zero_is_exactly_topk():
    x = torch.randn(64, 32)
    g = torch.randn(64, 32) * 10
    a, b = _sae("topk"), _sae("gsae", beta=0.0)
    ca, cb = a.encode_sparse(x), b.encode_sparse(x, g)
    assert cb.selection == "gsae"
    assert torch.equal(ca.indices.sort(-1).values, cb.indices.sort(-1).values)
    assert torch.equal(a.decode_sparse(ca.values, ca.indices), b.decode_sparse(cb.values, cb.indices))


def test_gsae_selection_rule_and_fallback():
    sae = _sae("gsae", beta=5.0)
    x = torch.randn(16, 32)
    g = torch.randn(16, 32)
    code = sae.encode_sparse(x, g)
    pre = code.pre
    effect = (g @ sae.W_dec.T).abs()
    score = torch.where(pre > 0, pre * (1 + 5.0 * effect), pre)
    assert torch.equal(code.indices.sort(-1).values, score.topk(8, -1).indices.sort(-1).values)
    # kept values are the plain activations, not the scores
    assert torch.equal(code.values, pre.gather(-1, code.indices).relu())
    assert not torch.equal(code.indices.sort(-1).values, pre.topk(8, -1).indices.sort(-1).values)
    fallback = sae.encode_sparse(x)
    assert fallback.selection == "topk (gsae without gradient)"
    assert torch.equal(fallback.indices.sort(-1).values, pre.topk(8, -1).indices.sort(-1).values)


def test_beta_zero_training_matches_topk_training(tiny_neox):
    rows = _tokens(tiny_neox, rows=8, n=32, seed=3)
    cfg = OptimConfig(lr=1e-3, steps=6, warmup_steps=0)
    outs = []
    for selection in ("topk", "gsae"):
        sae = _sae(selection, beta=0.0)
        batches = activation_batches(tiny_neox, rows, [Site(1)], 32, with_grad=True, buffer_tokens=128, seed=1)
        Trainer({Site(1): sae}, cfg).fit(batches)
        outs.append(sae)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(outs[0], name), getattr(outs[1], name)), name


def test_many_sites_one_pass_equals_each_site_alone(tiny_neox):
    rows = _tokens(tiny_neox, rows=8, n=32, seed=4)
    sites = [Site(0), Site(1)]
    cfg = OptimConfig(lr=1e-3, steps=8, warmup_steps=2)

    def batches():
        return activation_batches(tiny_neox, rows, sites, 32, with_grad=True, buffer_tokens=128, seed=2)

    joint = {s: _sae("gsae", seed=i) for i, s in enumerate(sites)}
    Trainer(joint, cfg).fit(batches())
    for i, site in enumerate(sites):
        alone = _sae("gsae", seed=i)
        Trainer({site: alone}, cfg).fit({site: b[site]} for b in batches())
        assert torch.equal(alone.W_dec, joint[site].W_dec) and torch.equal(alone.b_enc, joint[site].b_enc)


def test_gsae_rule_at_width_with_reused_buffers():
    """The in-place score (reused buffers, two-level top-k) picks what the written-out rule picks."""
    sae = SAE(SAEConfig(d_in=32, d_sae=2048, k=8, selection="gsae", gsae_beta=2.0), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(1))
    sae.reuse_pre_buffer = True
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):  # the second call overwrites the first call's buffers
        x, g = torch.randn(300, 32, generator=gen), torch.randn(300, 32, generator=gen)
        code = sae.encode_sparse(x, g)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        score = torch.where(pre > 0, pre * (1 + 2.0 * (g @ sae.W_dec.T).abs()), pre)
        assert torch.equal(code.indices.sort(-1).values, score.topk(8, -1).indices.sort(-1).values)
