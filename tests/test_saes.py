"""Every SAELens v6 architecture through ``SAE.load``, against files and outputs SAELens 6.54 itself wrote
(``tests/fixtures/saelens``, made by ``make_fixtures.py`` in SAELens' own venv), on ``[batch, pos, ...]``
inputs; plus the interface every architecture shares (shapes, the linear pre-activation, the sparse path,
saving under SAELens' architecture names, class dispatch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lens_attn.sae import (
    SAE,
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    SAEConfig,
    SAEFileError,
    StandardSAE,
    TopKSAE,
)

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
CLASSES = {"topk": TopKSAE, "topk_rescale": TopKSAE, "batchtopk": BatchTopKSAE, "batchtopk_checkpoint": BatchTopKSAE,
           "jumprelu": JumpReLUSAE, "standard": StandardSAE, "gated": GatedSAE}
TOL = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def _pre_from_file(name: str, x_flat: torch.Tensor) -> torch.Tensor:
    """The pre-activation that decides each feature, from the raw file tensors and SAELens' formulas."""
    t = load_file(str(FIXTURES / name / "sae_weights.safetensors"))
    xc = x_flat - t["b_dec"]  # every fixture has apply_b_dec_to_input
    if name == "gated":
        return xc @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]
    pre = xc @ t["W_enc"] + t["b_enc"]
    if name in ("topk_rescale", "batchtopk_checkpoint"):  # SAELens scales by the decoder norms first
        pre = pre * t["W_dec"].norm(dim=-1)
    return pre


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_saelens_files_give_saelens_outputs(name):
    sae = SAE.load(FIXTURES / name)
    assert type(sae) is CLASSES[name]
    exp = load_file(str(FIXTURES / name / "expected.safetensors"))
    x = exp["x"]  # [2, 5, 4, 8] for the hook_z SAEs, [2, 5, 24] for the others
    with torch.no_grad():
        feats = sae.encode(x)
        assert _max_diff(feats, exp["encode"]) <= TOL
        assert (feats > 0).sum(-1).float().mean() >= 4  # features really fire
        # SAELens' hook_z decode returns [..., n_heads, d_head]; ours stays flat (no state kept): same numbers
        recon = sae.decode(feats)
        assert recon.shape == (2, 5, sae.cfg.d_in)
        assert _max_diff(recon.reshape(exp["decode"].shape), exp["decode"]) <= TOL
        assert _max_diff(sae(x), exp["forward"]) <= TOL  # forward keeps the input's shape
        code = sae.encode_sparse(x)
        assert _max_diff(sae.decode_sparse(code.values, code.indices).reshape(x.shape), exp["forward"]) <= TOL
        flat = sae.flat_input(x)
        assert _max_diff(sae.encode(flat), exp["encode"]) <= TOL  # flat input reads the same
        pre = _pre_from_file(name, flat.reshape(-1, sae.cfg.d_in)).reshape(2, 5, -1)
        assert _max_diff(sae.encode_pre(x), pre) <= TOL
        W, b = sae.linear_encoder()
        assert _max_diff(flat @ W + b, pre) <= TOL
        ids = torch.tensor([5, 0, 17])
        sub = sae.linear_encoder(ids)
        assert _max_diff(flat @ sub.W + sub.b, pre[..., ids]) <= TOL


def test_architectures_in_the_files():
    """What SAELens 6.54 writes: BatchTopK for inference is a jumprelu file with one threshold; its training
    checkpoint is 'batchtopk' with a scalar topk_threshold; rescaled TopK keeps its decoder norms."""
    cfg = {n: json.loads((FIXTURES / n / "cfg.json").read_text()) for n in CLASSES}
    assert cfg["batchtopk"]["architecture"] == "jumprelu"
    assert cfg["batchtopk"]["metadata"]["training_architecture"] == "batchtopk"
    assert cfg["batchtopk_checkpoint"]["architecture"] == "batchtopk"
    thr = load_file(str(FIXTURES / "batchtopk" / "sae_weights.safetensors"))["threshold"]
    assert torch.all(thr == thr[0]) and thr[0] > 0
    assert cfg["topk_rescale"]["rescale_acts_by_decoder_norm"] is True
    norms = load_file(str(FIXTURES / "topk_rescale" / "sae_weights.safetensors"))["W_dec"].norm(dim=1)
    assert norms.min() < 0.9 and norms.max() > 1.1
    folded = SAE.load(FIXTURES / "topk_rescale")  # folded exactly: unit decoder rows, the same function
    torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(folded.cfg.d_sae))
    assert {c["reshape_activations"] for c in cfg.values()} == {"hook_z", "none"}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_architecture_saves_under_its_saelens_name_and_loads_back(tmp_path, name):
    sae = SAE.load(FIXTURES / name)
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    want = {"batchtopk": "jumprelu", "batchtopk_checkpoint": "jumprelu", "topk_rescale": "topk"}.get(name, name)
    assert cfg["architecture"] == want and cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg.get("rescale_acts_by_decoder_norm", False) is False
    back = SAE.load(tmp_path / "s")
    assert type(back) is type(sae) and back.cfg == sae.cfg
    for (n, p), q in zip(sae.state_dict().items(), back.state_dict().values()):
        assert torch.equal(p, q), n
    from sae_lens_attn.interop import saelens_cfg_problems

    assert saelens_cfg_problems(cfg) == []


@pytest.mark.parametrize("arch,cls", [("topk", TopKSAE), ("batchtopk", BatchTopKSAE), ("jumprelu", JumpReLUSAE),
                                      ("standard", StandardSAE), ("gated", GatedSAE)])
def test_sae_of_a_config_is_its_architecture(arch, cls):
    sae = SAE(SAEConfig(d_in=8, d_sae=12, k=3, architecture=arch))
    assert type(sae) is cls and isinstance(sae, SAE)
    x = torch.randn(3, 4, 8)
    assert sae.encode(x).shape == (3, 4, 12) and sae(x).shape == x.shape and sae.decode(sae.encode(x)).shape == x.shape
    assert type(SAE(SAEConfig(d_in=8, d_sae=12, k=3))) is TopKSAE  # the default stays TopK
    if cls is not TopKSAE:
        with pytest.raises(ValueError, match=f"needs SAEConfig.architecture='{arch}', got 'topk'"):
            cls(SAEConfig(d_in=8, d_sae=12, k=3))
        with pytest.raises(ValueError, match="selection='gsae' needs architecture='topk'"):
            SAEConfig(d_in=8, d_sae=12, architecture=arch, selection="gsae")
        with pytest.raises(ValueError, match="no gradient-aware selection"):
            sae.encode_sparse(x, torch.randn(3, 4, 8))


def test_any_leading_shape_and_hook_z_input():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=48, k=5, reshape_activations="hook_z"))
    with torch.no_grad():
        sae.b_enc.normal_()
    z = torch.randn(2, 3, 5, 4, 8)  # [..., n_heads, d_head] with two leading dims
    flat = z.reshape(2, 3, 5, 32)  # head-major, as Site.flatten and SAELens flatten
    f = sae.encode(z)
    assert f.shape == (2, 3, 5, 48) and torch.equal(f, sae.encode(flat))
    assert ((f > 0).sum(-1) <= 5).all()
    pre = (flat - sae.b_dec) @ sae.W_enc + sae.b_enc
    kept = pre.topk(5, dim=-1).values.relu()
    torch.testing.assert_close(f.sort(-1, descending=True).values[..., :5], kept)
    assert sae(z).shape == z.shape and sae(flat).shape == flat.shape
    torch.testing.assert_close(sae(z).reshape(flat.shape), sae(flat))
    code = sae.encode_sparse(z)
    assert code.values.shape == code.indices.shape == (2, 3, 5, 5) and code.pre.shape == (2, 3, 5, 48)
    torch.testing.assert_close(sae.decode_sparse(code.values, code.indices), sae.decode(f), atol=1e-5, rtol=1e-5)
    assert sae.encode(flat[0, 0, 0]).shape == (48,)
    plain = SAE(SAEConfig(d_in=32, d_sae=48, k=5))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 5, 4, 8\).*reshape_activations is 'none': flatten the heads"):
        plain.encode(z)
    with pytest.raises(ValueError, match="input width 31 does not match the SAE's d_in=32"):
        sae.encode(torch.randn(4, 31))


def test_relu_family_sparse_code_pads_with_zeros():
    sae = SAE(SAEConfig(d_in=8, d_sae=30, architecture="jumprelu"), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    want = pre.relu() * (pre > 0.3)
    code = sae.encode_sparse(x)
    assert code.selection == "jumprelu" and code.values.shape[-1] == int((want > 0).sum(-1).max())
    dense = torch.zeros(6, 30).scatter(-1, code.indices, code.values)
    torch.testing.assert_close(dense, want)
    torch.testing.assert_close(sae.encode(x), want)


def test_load_names_the_class_it_found():
    with pytest.raises(SAEFileError, match="holds a jumprelu SAE, not a TopKSAE; load it with SAE.load"):
        TopKSAE.load(FIXTURES / "jumprelu")
    assert type(JumpReLUSAE.load(FIXTURES / "batchtopk")) is BatchTopKSAE  # a BatchTopK SAE is a JumpReLU SAE
    from sae_lens_attn.interop import load_sae  # the old entry point is the same loader

    assert type(load_sae(FIXTURES / "gated")) is GatedSAE
