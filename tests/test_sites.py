import pytest
import torch

from sae_lens_attn.sites import Site, parse_sites, split_heads


class Cfg:
    n_layers, n_heads, d_head, d_model = 2, 4, 8, 32


def test_hook_names_and_widths():
    assert Site(1).hook_name == "blocks.1.attn.hook_z"
    assert Site(0, "attn_out").hook_name == "blocks.0.hook_attn_out"
    assert Site(1).d_in(Cfg) == 32
    assert Site(1, head=2).d_in(Cfg) == 8
    assert Site(1, "attn_out").d_in(Cfg) == 32


@pytest.mark.parametrize(
    "spec,site",
    [
        ("blocks.1.attn.hook_z", Site(1)),
        ("blocks.0.hook_attn_out", Site(0, "attn_out")),
        ("L1.z.h3", Site(1, "z", 3)),
        ("L0.attn_out", Site(0, "attn_out")),
    ],
)
def test_parse(spec, site):
    assert Site.parse(spec) == site
    assert Site.parse(site.label) == site


def test_bad_sites_name_the_problem():
    with pytest.raises(ValueError, match="layer 5 does not exist; the model has layers 0..1"):
        Site(5).validate(Cfg)
    with pytest.raises(ValueError, match="head 9 does not exist"):
        Site(0, head=9).validate(Cfg)
    with pytest.raises(ValueError, match="unknown site"):
        Site.parse("blocks.1.hook_mlp_out")
    with pytest.raises(ValueError, match="kind must be one of"):
        Site(0, "mlp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no head axis"):
        Site(0, "attn_out", head=1)


def test_parse_sites_all_and_lists():
    assert parse_sites("all", n_layers=3) == [Site(0), Site(1), Site(2)]
    assert parse_sites("0,2", "attn_out") == [Site(0, "attn_out"), Site(2, "attn_out")]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_sites("one")


def test_flatten_is_head_major_and_invertible():
    z = torch.randn(2, 3, 4, 8)
    flat = Site(0).flatten(z)
    assert flat.shape == (2, 3, 32)
    # head h occupies columns h*d_head:(h+1)*d_head
    assert torch.equal(flat[..., 8:16], z[:, :, 1])
    assert torch.equal(split_heads(flat, 4), z)
    assert torch.equal(Site(0).unflatten(flat, z), z)
    one = Site(0, head=2)
    assert torch.equal(one.flatten(z), z[:, :, 2])
    new = one.unflatten(torch.zeros(2, 3, 8), z)
    assert torch.equal(new[:, :, 2], torch.zeros(2, 3, 8)) and torch.equal(new[:, :, 1], z[:, :, 1])
