import json

import pytest
import torch

from sae_lens_attn.kernels import sparse_decode, sparse_decode_reference
from sae_lens_attn.sae import SAE, SAEConfig, SAEFileError
from sae_lens_attn.sites import Site


def make_sae(d_in=16, d_sae=64, k=4, seed=0, **kw):
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, **kw), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 2))
    return sae


def test_init_unit_decoder_and_tied_encoder():
    sae = make_sae()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(sae.W_enc, sae.W_dec.T)


def test_topk_invariants():
    sae = make_sae()
    x = torch.randn(32, 16)
    code = sae.encode_sparse(x)
    assert code.values.shape == code.indices.shape == (32, 4)
    assert (code.values >= 0).all()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(code.pre, pre)
    # the chosen latents are exactly the k largest pre-activations
    top = pre.topk(4, dim=-1).values
    torch.testing.assert_close(code.pre.gather(-1, code.indices).sort(-1).values, top.sort(-1).values)
    assert torch.equal(code.values, code.pre.gather(-1, code.indices).relu())
    dense = sae.encode(x)
    assert ((dense != 0).sum(-1) <= 4).all()
    assert torch.equal(dense, torch.zeros(32, 64).scatter(-1, code.indices, code.values))
    torch.testing.assert_close(sae.decode(dense), dense @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(sae.decode(dense), sae(x), atol=1e-5, rtol=1e-5)
    assert code.selection == "topk"


def test_sparse_decode_matches_reference(monkeypatch):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(50, 12, generator=g, requires_grad=True)
    vals = torch.rand(7, 5, generator=g, requires_grad=True)
    idx = torch.randint(0, 50, (7, 5), generator=g)
    fast = sparse_decode(vals, idx, W)
    ref = sparse_decode_reference(vals, idx, W)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    gw_fast, gv_fast = torch.autograd.grad(fast.pow(2).sum(), [W, vals])
    gw_ref, gv_ref = torch.autograd.grad(ref.pow(2).sum(), [W, vals])
    torch.testing.assert_close(gw_fast, gw_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gv_fast, gv_ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("SAE_LENS_ATTN_KERNELS", "reference")
    assert torch.equal(sparse_decode(vals, idx, W), ref)


def test_parallel_gradient_removed_and_rows_renormalised():
    sae = make_sae()
    x = torch.randn(32, 16)
    sae(x).pow(2).sum().backward()
    sae.remove_parallel_decoder_grad()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert (parallel.abs() <= 1e-5 * sae.W_dec.grad.norm(dim=1) + 1e-7).all()
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_save_load_round_trip_is_exact(tmp_path):
    sae = make_sae(metadata={"model_name": "m", "hook_name": "blocks.1.attn.hook_z", "hook_head_index": None,
                             "context_size": 128, "prepend_bos": True}, reshape_activations="hook_z")
    sparsity = torch.log10(torch.rand(64) + 1e-10)
    sae.save(tmp_path / "sae", sparsity)
    loaded = SAE.load(tmp_path / "sae")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    assert loaded.cfg == sae.cfg
    assert torch.equal(SAE.load_sparsity(tmp_path / "sae"), sparsity)
    x = torch.randn(8, 16)
    assert torch.equal(loaded(x), sae(x))
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    # SAELens v6 TopK fields
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["reshape_activations"] == "hook_z"
    assert cfg["metadata"]["hook_name"] == "blocks.1.attn.hook_z" and cfg["metadata"]["context_size"] == 128
    assert not list((tmp_path / "sae").glob("*.tmp"))


def test_gsae_saved_as_topk_keeps_its_rule(tmp_path):
    sae = make_sae(selection="gsae", gsae_beta=2.5)
    sae.save(tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["metadata"]["selection"] == "gsae"
    loaded = SAE.load(tmp_path / "g")
    assert loaded.cfg.selection == "gsae" and loaded.cfg.gsae_beta == 2.5


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(SAEFileError, match="cfg.json is missing"):
        SAE.load(tmp_path)
    sae = make_sae()
    sae.save(tmp_path / "s")
    w = tmp_path / "s" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(SAEFileError, match="sae_weights.safetensors: unreadable"):
        SAE.load(tmp_path / "s")
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg["d_in"] = 17
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFileError, match=r"W_enc has shape \(16, 64\) but cfg.json \(d_in=17"):
        SAE.load(tmp_path / "s")
    cfg["d_in"] = 16
    cfg["architecture"] = "jumprelu"  # a TopK file relabelled: it lacks the threshold
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFileError, match="sae_weights.safetensors: tensor 'threshold' is missing"):
        SAE.load(tmp_path / "s")
    cfg["architecture"] = "crosscoder"
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFileError, match="architecture 'crosscoder' is not supported"):
        SAE.load(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFileError, match="not valid JSON"):
        SAE.load(tmp_path / "s")


def test_d_in_mismatch_with_site(tiny_neox):
    sae = make_sae(d_in=16)
    with pytest.raises(ValueError, match=r"d_in mismatch: the SAE expects d_in=16, but site L1.z .* has width 32"):
        sae.check_site(Site(1), tiny_neox.cfg)
    make_sae(d_in=8).check_site(Site(1, head=0), tiny_neox.cfg)


@pytest.mark.parametrize(
    "kw,msg",
    [({"k": 0}, "k must be a positive"), ({"k": 100}, "must not exceed d_sae"), ({"selection": "relu"}, "selection"),
     ({"gsae_beta": -1.0}, "gsae_beta"), ({"dtype": "float99"}, "dtype")],
)
def test_config_validation(kw, msg):
    base = {"d_in": 16, "d_sae": 64, "k": 4}
    with pytest.raises(ValueError, match=msg):
        SAEConfig(**(base | kw))


def _step_grads(sae, x):
    sae.zero_grad()
    code = sae.encode_sparse(x)
    x_hat = sae.decode_sparse(code.values, code.indices)
    ((x - x_hat).pow(2).sum() + code.values.sum()).backward()
    return x_hat.detach().float(), {n: p.grad.detach().float().clone() for n, p in sae.named_parameters()}


def test_sparse_step_matches_dense_reference_fp32(monkeypatch):
    """The sparse TopK step (selection GEMM outside autograd + CSR backward) against plain dense autograd."""
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(3))
    sae = make_sae(d_sae=128, k=8)
    monkeypatch.setenv("SAE_LENS_ATTN_KERNELS", "reference")
    ref_x, ref_g = _step_grads(sae, x)
    monkeypatch.setenv("SAE_LENS_ATTN_KERNELS", "auto")
    fast_x, fast_g = _step_grads(sae, x)
    assert (fast_x - ref_x).abs().max() <= 1e-5 * ref_x.abs().max()
    for name in ref_g:
        assert (fast_g[name] - ref_g[name]).abs().max() <= 1e-5 * ref_g[name].abs().max(), name


def test_sparse_step_matches_dense_reference_bf16(monkeypatch):
    """In bf16 both paths round differently, so a near-tie can pick another latent in a few rows: rows that
    chose the same latents agree to 1e-2, and the gradients agree to 1e-2 in relative norm."""
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(3))
    sae = make_sae(d_sae=128, k=8).to(torch.bfloat16)
    sae.cfg.dtype = "bfloat16"
    monkeypatch.setenv("SAE_LENS_ATTN_KERNELS", "reference")
    ref_idx = sae.encode_sparse(x).indices.sort(-1).values
    ref_x, ref_g = _step_grads(sae, x)
    monkeypatch.setenv("SAE_LENS_ATTN_KERNELS", "auto")
    same = (sae.encode_sparse(x).indices.sort(-1).values == ref_idx).all(-1)
    fast_x, fast_g = _step_grads(sae, x)
    assert same.float().mean() >= 0.9
    assert (fast_x[same] - ref_x[same]).abs().max() <= 1e-2 * ref_x.abs().max()
    for name in ref_g:
        assert (fast_g[name] - ref_g[name]).norm() <= 5e-2 * ref_g[name].norm(), name


def test_bf16_selection_keeps_exact_values():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    sae = make_sae(d_sae=128, k=8)
    sae.bf16_select = True
    code = sae.encode_sparse(x)
    exact = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).gather(-1, code.indices).relu()
    torch.testing.assert_close(code.values, exact, rtol=1e-5, atol=1e-6)  # fp32, whatever chose them
    assert code.pre.dtype == torch.bfloat16


def test_latent_outer_sum_matches_reference():
    from sae_lens_attn.kernels import latent_outer_sum, latent_outer_sum_reference

    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 40, (33, 4), generator=g)
    w = torch.randn(33, 4, generator=g)
    x = torch.randn(33, 7, generator=g)
    torch.testing.assert_close(latent_outer_sum(idx, w, x, 40), latent_outer_sum_reference(idx, w, x, 40))
