"""Weight-based head attribution: decoder-norm shares per head, and the head-by-head survey."""

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.analysis.heads import format_head_report, head_report, head_shares


def _sae(site: Site, cfg, d_sae=48, seed=0) -> SAE:
    sae = SAE(SAEConfig(d_in=site.d_in(cfg), d_sae=d_sae, k=4,
                        metadata={"hook_name": site.hook_name, "hook_head_index": site.head}), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


@pytest.mark.parametrize("fixture", ["tiny_neox", "default_model"])
def test_shares_match_the_formula_with_explicit_column_blocks(fixture, request):
    model = request.getfixturevalue(fixture)
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    sae = _sae(Site(1), model.cfg)
    with torch.no_grad():  # uneven head blocks, so the shares are far from uniform
        sae.W_dec.mul_(torch.rand(sae.cfg.d_sae, sae.cfg.d_in, generator=torch.Generator().manual_seed(1)) ** 3)
    shares = head_shares(sae, n_heads)
    manual = torch.zeros(sae.cfg.d_sae, n_heads)
    for i in range(sae.cfg.d_sae):
        norms = [float(sae.W_dec.detach()[i, k * d_head : (k + 1) * d_head].norm()) for k in range(n_heads)]
        manual[i] = torch.tensor(norms) / sum(norms)
    torch.testing.assert_close(shares, manual, atol=1e-5, rtol=0)
    torch.testing.assert_close(shares.sum(-1), torch.ones(sae.cfg.d_sae), atol=1e-5, rtol=0)
    assert shares.max() > 2.0 / n_heads  # not uniform: the test would see a wrong block order


def test_feature_written_by_one_head_has_share_one_there_and_leads_its_report(tiny_neox):
    cfg = tiny_neox.cfg
    sae = _sae(Site(1), cfg, d_sae=16)
    d_head = cfg.d_head
    with torch.no_grad():
        sae.W_dec[5] = 0
        sae.W_dec[5, 2 * d_head : 3 * d_head] = 1.0  # head 2's block only
        sae.W_dec[9] = 0
        sae.W_dec[9, 2 * d_head : 3 * d_head] = 1.0
        sae.W_dec[9, 0:d_head] = 0.5  # mostly head 2, some head 0
    shares = head_shares(sae, cfg.n_heads)
    assert shares[5].tolist() == [0.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(shares[9], torch.tensor([1 / 3, 0, 2 / 3, 0]), atol=1e-6, rtol=0)
    reports = head_report(sae, cfg.n_heads, top=3)
    assert [r.head for r in reports] == [0, 1, 2, 3]
    assert [f.feature for f in reports[2].features[:2]] == [5, 9]
    assert reports[2].features[0].share == 1.0
    assert reports[2].n_dominant >= 2


def test_report_drops_dead_features_and_describes_alive_ones(tiny_neox):
    cfg = tiny_neox.cfg
    sae = _sae(Site(1), cfg, d_sae=16)
    with torch.no_grad():
        sae.W_dec[3] = 0
        sae.W_dec[3, : cfg.d_head] = 1.0  # all head 0, but dead
    density = torch.full((16,), 0.01)
    density[3] = 0.0
    reports = head_report(sae, cfg.n_heads, density=density, describe=lambda i: f"feature-{i}", top=16)
    assert all(f.feature != 3 for r in reports for f in r.features)
    assert len(reports[0].features) == 15
    assert reports[0].features[0].description == f"feature-{reports[0].features[0].feature}"
    text = format_head_report(reports, per_head=2)
    assert text.count("\n    #") == 2 * cfg.n_heads and "L1H0:" in text and "density 1.00e-02" in text
    with pytest.raises(ValueError, match="density must have shape"):
        head_report(sae, cfg.n_heads, density=torch.ones(3))


def test_one_head_sae_and_attn_out_sae(tiny_neox):
    cfg = tiny_neox.cfg
    one = _sae(Site(1, head=3), cfg)
    shares = head_shares(one, cfg.n_heads)
    assert torch.equal(shares, torch.zeros(one.cfg.d_sae, cfg.n_heads).index_fill_(1, torch.tensor([3]), 1.0))
    out = _sae(Site(1, "attn_out"), cfg)
    with pytest.raises(ValueError, match="needs a hook_z SAE"):
        head_shares(out, cfg.n_heads)
