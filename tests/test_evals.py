import torch

from sae_lens_attn.evals import evaluate_sae, fvu
from sae_lens_attn.sae import SAE, SAEConfig, TopKSAE
from sae_lens_attn.sites import Site


class Identity(TopKSAE):
    """Reconstructs perfectly when spliced in (``sae(x)``): an upper bound every metric must recognise."""

    def forward(self, x):
        return x


def test_fvu():
    x = torch.randn(100, 8)
    assert fvu(x, x) == 0.0
    assert abs(fvu(x, x.mean(0).expand_as(x)) - 1.0) < 1e-9


def test_perfect_reconstruction_recovers_all_loss(tiny_neox):
    torch.manual_seed(0)
    rows = torch.randint(1, tiny_neox.cfg.d_vocab, (4, 16))
    rows[:, 0] = 0
    sae = Identity(SAEConfig(d_in=32, d_sae=64, k=64))
    m, density = evaluate_sae(tiny_neox, sae, Site(1), rows)
    assert abs(m.ce_spliced - m.ce_clean) < 1e-9 and m.kl_spliced < 1e-9
    assert abs(m.ce_recovered_zero - 1.0) < 1e-6 and abs(m.ce_recovered_mean - 1.0) < 1e-6
    assert m.ce_zero_ablated != m.ce_clean
    assert density.shape == (64,)


def test_bad_sae_recovers_less(tiny_neox):
    torch.manual_seed(0)
    rows = torch.randint(1, tiny_neox.cfg.d_vocab, (4, 16))
    rows[:, 0] = 0
    sae = SAE(SAEConfig(d_in=32, d_sae=64, k=1))
    m, _ = evaluate_sae(tiny_neox, sae, Site(1), rows)
    assert m.l0 <= 1.0 and m.fvu > 0.1 and m.ce_recovered_zero < 0.99
