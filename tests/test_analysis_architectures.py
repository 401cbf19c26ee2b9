"""Induction-feature scores, DFA by head and by source, and a dashboard page on JumpReLU, standard (ReLU) and
gated SAEs, not only TopK: each checked against activations and pre-activations computed here from the SAE's
weights and the model's own hook_z (gated SAEs: DFA attributes the magnitude pre-activation)."""

from __future__ import annotations

import re

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig
from sae_lens_attn.analysis import dfa, dfa_by_source, feature_induction_scores
from sae_lens_attn.analysis.dashboard import feature_page
from sae_lens_attn.analysis.features import StatsConfig, feature_stats
from sae_lens_attn.analysis.induction import repeated_tokens

from .conftest import random_rows

ARCHS = ["jumprelu", "standard", "gated"]
D_SAE = 48
FEATS = [0, 7, 19, 33]


def _z(model, tokens: torch.Tensor) -> torch.Tensor:
    """Layer 1's hook_z as [batch, pos, n_heads*d_head], head-major, from the model's own cache."""
    _, cache = model.run_with_cache(tokens)
    z = cache["blocks.1.attn.hook_z"]
    return z.reshape(*z.shape[:2], -1)


def _by_hand(sae: SAE, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre, acts) from the weights: the magnitude pre-activation for gated SAEs."""
    p = {n: t.detach() for n, t in sae.named_parameters()}
    xc = z - p["b_dec"]
    if sae.architecture == "gated":
        pre = xc @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"]
        return pre, ((xc @ p["W_enc"] + p["b_gate"]) > 0).float() * pre.relu()
    pre = xc @ p["W_enc"] + p["b_enc"]
    if sae.architecture == "jumprelu":
        return pre, pre.relu() * (pre > p["threshold"]).float()
    return pre, pre.relu()


@pytest.fixture(scope="module")
def saes(tiny_neox):
    """One SAE per architecture on layer 1's hook_z, thresholds and gates set from real activations so that
    each feature fires on part of the tokens."""
    z = _z(tiny_neox, random_rows(tiny_neox, 4, 16, seed=9))[:, 1:].reshape(-1, 32)
    out = {}
    for i, arch in enumerate(ARCHS):
        sae = SAE(SAEConfig(d_in=32, d_sae=D_SAE, architecture=arch, reshape_activations="hook_z",
                            metadata={"hook_name": "blocks.1.attn.hook_z"}), init=False)
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(32, D_SAE, generator=g) / z.std(0).mean() / 32**0.5)
            sae.W_dec.copy_(torch.randn(D_SAE, 32, generator=g) * 0.2)
            sae.b_dec.copy_(z.mean(0) + torch.randn(32, generator=g) * 0.05)
            pre = (z - sae.b_dec) @ sae.W_enc
            if arch == "gated":
                sae.r_mag.copy_(torch.randn(D_SAE, generator=g) * 0.3)
                sae.b_mag.copy_(pre.std(0) * 0.5)
                sae.b_gate.copy_(-pre.quantile(0.6, dim=0))
            else:
                sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
            if arch == "jumprelu":
                sae.threshold.copy_((pre + sae.b_enc).quantile(0.6, dim=0).clamp_min(0.05))
        out[arch] = sae.requires_grad_(False)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_dfa_by_head_and_source_sum_to_the_pre_activation(tiny_neox, saes, arch):
    sae = saes[arch]
    toks = random_rows(tiny_neox, 2, 12, seed=3)
    pre, acts = _by_hand(sae, _z(tiny_neox, toks))
    res = dfa(tiny_neox, sae, toks, FEATS)
    torch.testing.assert_close(res.pre, pre[..., FEATS], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.by_head.sum(2) + res.bias, pre[..., FEATS], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.acts, acts[..., FEATS], atol=1e-5, rtol=1e-5)
    assert (acts[..., FEATS] > 0).any() and (acts[..., FEATS] == 0).any()
    src = dfa_by_source(tiny_neox, sae, toks, FEATS[:2])
    torch.testing.assert_close(src.by_source.sum(3), src.by_head, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(src.by_head.sum(2) + src.bias, pre[..., FEATS[:2]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_induction_feature_scores(tiny_neox, saes, arch):
    sae = saes[arch]
    toks = repeated_tokens(tiny_neox, n_seq=4, length=10)
    scores = feature_induction_scores(tiny_neox, sae, tokens=toks)
    _, acts = _by_hand(sae, _z(tiny_neox, toks))
    first, second = acts[:, 1:11], acts[:, 11:21]
    m1, m2 = first.sum((0, 1)), second.sum((0, 1))
    fired = (m1 + m2) > 0
    assert fired.sum() >= 10
    torch.testing.assert_close(scores.mass_second[fired], (m2 / (m1 + m2))[fired], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.mean_first, first.mean((0, 1)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores.fire_second, (second > 0).float().mean((0, 1)))


@pytest.mark.parametrize("arch", ARCHS)
def test_dashboard_page(tiny_neox, saes, arch):
    sae = saes[arch]
    rows = random_rows(tiny_neox, 4, 16, seed=5)
    stats = feature_stats(tiny_neox, sae, rows, FEATS, cfg=StatsConfig(n_top=3, n_samples=6, ctx_left=4, ctx_right=2))
    f = next(f for f in FEATS if stats.fire_count[stats.index(f)] > 0)
    page = feature_page(tiny_neox, sae, stats, f, cfg=None)
    pre, acts = _by_hand(sae, _z(tiny_neox, rows))
    acts[:, 0] = 0  # BOS is skipped, as in training
    assert f"<h1>Feature {f} &middot; L1.z</h1>" in page
    assert f"max activation {float(acts[..., f].max()):.4g}" in page
    top = stats.top_examples(f, 1)[0]
    shown = float(re.search(r"pre-activation (\S+);", page).group(1))
    assert shown == pytest.approx(float(pre[top.row, top.pos, f]), rel=1e-3)
