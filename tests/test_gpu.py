"""The CUDA path against the CPU one (run on a GPU machine: ``python -m pytest -m gpu``; skipped without CUDA).

Nothing here has run on a GPU yet: no session so far was lent one. ``benchmarks/gpu_check.sh`` runs this
file before it measures anything.
"""

import pytest
import torch

from sae_lens_attn.activations import SiteBatch
from sae_lens_attn.kernels import topk_indices, topk_indices_reference
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.training.trainer import OptimConfig, SiteState

pytestmark = pytest.mark.gpu


def _pair(d_in=64, d_sae=2048, k=16, **kw):
    out = []
    for device in ("cpu", "cuda"):
        sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device, **kw), init=False)
        sae.reset_parameters(torch.Generator().manual_seed(0))  # drawn on the CPU, copied: identical weights
        out.append(sae)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_level_topk_on_cuda_picks_torch_topk_values(dtype, monkeypatch):
    monkeypatch.setenv("SAE_LENS_ATTN_TOPK", "two_level")
    scores = torch.randn(512, 24576, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    got, want = topk_indices(scores, 32), topk_indices_reference(scores, 32)
    assert got.device.type == "cuda"
    assert torch.equal(scores.gather(1, got).sort(1).values, scores.gather(1, want).sort(1).values)


def test_training_steps_on_cuda_match_the_cpu():
    """Five fp32 steps (TF32 off) from identical weights and batches: same losses and parameters within fp32
    reduction-order noise."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, gpu = _pair()
    states = [SiteState(s, OptimConfig(steps=5, warmup_steps=0)) for s in (cpu, gpu)]
    g = torch.Generator().manual_seed(2)
    for i in range(5):
        x = torch.randn(256, 64, generator=g) * 2 + 0.5
        a = states[0].step(SiteBatch(x, None), i)
        b = states[1].step(SiteBatch(x.cuda(), None), i)
        assert b.fvu == pytest.approx(a.fvu, rel=1e-4)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=1e-3, atol=1e-5)


def test_bf16_selection_on_cuda_keeps_exact_fp32_values():
    _, gpu = _pair()
    gpu.bf16_select = True
    x = torch.randn(128, 64, device="cuda")
    code = gpu.encode_sparse(x)
    exact = ((x - gpu.b_dec) @ gpu.W_enc + gpu.b_enc).gather(1, code.indices).relu()
    torch.testing.assert_close(code.values, exact, rtol=1e-5, atol=1e-6)
