"""The fast kernels against their pure-PyTorch twins (fp32 within 1e-5 relative)."""

import pytest
import torch

from sae_lens_attn import ckernels
from sae_lens_attn.kernels import (
    TOPK_GROUP,
    gathered_dots,
    rowwise_dot,
    sparse_decode,
    sparse_decode_reference,
    topk_indices,
    topk_indices_reference,
)
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.training.trainer import LayoutAwareAdam


def _sae(d_in, d_sae, k, seed):
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return sae


def _same_choice(scores, got, want):
    """Per row: the same multiset of selected values as torch.topk, and k distinct latents."""
    assert torch.equal(scores.gather(-1, got).sort(-1).values, scores.gather(-1, want).sort(-1).values)
    assert all(len(set(r.tolist())) == got.shape[1] for r in got)


@pytest.fixture(params=["auto", "two_level"])
def topk_path(request, monkeypatch):
    """Both CPU selection paths: ``auto`` (the compiled kernel; asserted built) and ``two_level`` (PyTorch)."""
    monkeypatch.setenv("SAE_LENS_ATTN_TOPK", request.param)
    if request.param == "auto":
        assert ckernels.available(), ckernels.unavailable_reason()
    return request.param


@pytest.mark.parametrize("n,k", [(1024, 8), (6144, 32), (4096, 16), (24576, 32)])
def test_two_level_topk_matches_torch_topk(n, k, topk_path):
    assert n >= 4 * k * TOPK_GROUP  # the two-level path is the one under test
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randn(300, n, generator=g)
    scores[0, :k] = 100.0  # all of a row's top entries in one block
    scores[1] = torch.linspace(-1, 1, n)  # the top entries in the last column of the [G, nb] view
    scores[2, :: n // TOPK_GROUP] = 50.0  # all of block 0 in the top k
    got = topk_indices(scores, k)
    want = topk_indices_reference(scores, k)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_two_level_topk_with_ties_picks_equal_values(topk_path):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (64, 2048), generator=g).float()  # heavy ties
    scores[3] = 0.0  # a row that is all ties (a zero input row with a zero bias)
    got = topk_indices(scores, 8)
    _same_choice(scores, got, topk_indices_reference(scores, 8))


@pytest.mark.parametrize("case", ["plain", "nan", "inf", "odd_width", "bf16"])
def test_topk_with_bias_adds_it_once_and_selects_as_torch(case, topk_path):
    """``topk_indices(scores, k, bias)`` leaves scores + bias in ``scores`` (bit for bit what ``add_`` gives)
    and selects what torch.topk selects from it: also when the compiled kernel refuses the matrix (a NaN or
    an inf after the bias was added, a width that is not a multiple of 32, bf16) and PyTorch finishes."""
    g = torch.Generator().manual_seed(7)
    n = 3000 if case == "odd_width" else 4096
    base = torch.randn(200, n, generator=g)
    if case == "nan":
        base[5, 17] = float("nan")
    if case == "inf":
        base[9, 100] = float("-inf")
        base[11, 3] = float("inf")
    bias = torch.randn(n, generator=g)
    if case == "bf16":
        base, bias = base.bfloat16(), bias.bfloat16()
    scores = base.clone()
    if topk_path == "auto":  # the compiled kernel serves exactly the plain case
        assert (ckernels.topk_rows(base.clone(), 16, bias)[0] is not None) == (case == "plain")
    got = topk_indices(scores, 16, bias=bias)
    want_scores = base + bias
    assert torch.equal(scores.nan_to_num(), want_scores.nan_to_num()) and scores.isnan().sum() == want_scores.isnan().sum()
    want = topk_indices_reference(want_scores, 16)
    if case == "nan":  # torch orders NaN above everything; the row with it must match exactly
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    else:
        _same_choice(want_scores, got, want)


def test_compiled_kernel_builds_into_the_cache_dir_named_by_the_environment(tmp_path):
    """A fresh process with SAE_LENS_ATTN_CACHE pointing at an empty directory compiles the kernel there;
    with no compiler to be found it says so and the PyTorch path serves."""
    import os
    import subprocess
    import sys

    code = ("from sae_lens_attn import ckernels, kernels; import torch; s = torch.randn(64, 2048); "
            "print(ckernels.available(), ckernels.unavailable_reason()); "
            "print(torch.equal(kernels.topk_indices(s, 8).sort(1).values.float().sum(1), "
            "s.topk(8).indices.sort(1).values.float().sum(1)))")

    def run(env):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                             text=True, check=True).stdout.splitlines()
        return out[0], out[1]

    built, same = run({"SAE_LENS_ATTN_CACHE": str(tmp_path / "cache")})
    assert built == "True None" and same == "True"
    assert len(list((tmp_path / "cache" / "sae_lens_attn").glob("topk_*.so"))) == 1
    missing, same = run({"SAE_LENS_ATTN_CACHE": str(tmp_path / "other"), "CC": "", "PATH": str(tmp_path)})
    assert missing == "False RuntimeError: no C compiler (cc, gcc or clang) on PATH" and same == "True"


def test_compiled_topk_threads_split_rows_and_match_one_thread():
    assert ckernels.available(), ckernels.unavailable_reason()
    scores = torch.randn(1000, 2048, generator=torch.Generator().manual_seed(8))
    one = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, _ = ckernels.topk_rows(scores.clone(), 8)
        torch.set_num_threads(3)  # three Python threads over 1000 rows: uneven parts
        b, _ = ckernels.topk_rows(scores.clone(), 8)
    finally:
        torch.set_num_threads(one)
    assert a is not None and torch.equal(a.sort(-1).values, b.sort(-1).values)


def test_topk_reference_switch(monkeypatch):
    scores = torch.randn(8, 2048, generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv("SAE_LENS_ATTN_KERNELS", "reference")
    assert torch.equal(topk_indices(scores, 8), topk_indices_reference(scores, 8))


def test_topk_mode_switch(monkeypatch):
    scores = torch.randn(8, 4096, generator=torch.Generator().manual_seed(5))
    monkeypatch.setenv("SAE_LENS_ATTN_TOPK", "torch")
    assert torch.equal(topk_indices(scores, 8), topk_indices_reference(scores, 8))
    monkeypatch.setenv("SAE_LENS_ATTN_TOPK", "two-level")
    _same_choice(scores, topk_indices(scores, 8), topk_indices_reference(scores, 8))
    monkeypatch.setenv("SAE_LENS_ATTN_TOPK", "radix")
    with pytest.raises(ValueError, match="SAE_LENS_ATTN_TOPK='radix': use auto, two_level or torch"):
        topk_indices(scores, 8)


def test_sparse_decode_backward_matches_reference():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(500, 24, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 500, (70, 6), generator=g)
    vals = torch.randn(70, 6, generator=g, dtype=torch.float64)
    up = torch.randn(70, 24, generator=g, dtype=torch.float64)
    grads = []
    for fn in (sparse_decode, sparse_decode_reference):
        w, v = W.clone().requires_grad_(), vals.clone().requires_grad_()
        out = fn(v, idx, w)
        grads.append((out, *torch.autograd.grad(out, (w, v), up)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gathered_dots_matches_definition():
    g = torch.Generator().manual_seed(4)
    rows, x = torch.randn(300, 16, generator=g), torch.randn(1100, 16, generator=g)
    idx = torch.randint(0, 300, (1100, 5), generator=g)
    torch.testing.assert_close(gathered_dots(x, idx, rows), torch.einsum("bd,bkd->bk", x, rows[idx]))


def _train(sae, opt, xs):
    for x in xs:
        opt.zero_grad(set_to_none=True)
        ((x - sae(x)).pow(2).sum() / x.pow(2).sum()).backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        sae.normalize_decoder()


def test_layout_aware_fused_adam_equals_plain_adam():
    """The fused update through the transposed aliases of W_enc gives torch's default Adam's parameters."""
    xs = [torch.randn(128, 16, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    a = _sae(16, 2048, 8, 0)
    b = _sae(16, 2048, 8, 0)
    assert not a.W_enc.is_contiguous()  # the case the aliasing exists for
    _train(a, LayoutAwareAdam(a.parameters(), lr=1e-3, eps=6.25e-10), xs)
    _train(b, torch.optim.Adam(b.parameters(), lr=1e-3, eps=6.25e-10, foreach=False), xs)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.stride() == q.stride(), name
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_sparse_step_matches_reference_with_two_level_topk(monkeypatch):
    """A full sparse step at a width where two-level selection and the CSR decoder backward both run."""
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(5))
    grads = {}
    for mode in ("reference", "auto"):
        monkeypatch.setenv("SAE_LENS_ATTN_KERNELS", mode)
        sae = _sae(32, 4096, 16, 1)
        x_hat = sae(x)
        ((x - x_hat).pow(2).sum()).backward()
        grads[mode] = {n: p.grad.clone() for n, p in sae.named_parameters()} | {"x_hat": x_hat.detach()}
    for name, ref in grads["reference"].items():
        assert (grads["auto"][name] - ref).abs().max() <= 1e-5 * ref.abs().max(), name


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_input_and_b_dec_gradients_match_reference(monkeypatch, apply_b_dec):
    """b_dec's gradient comes from a matrix-vector product and x's from embedding_bag; both against autograd."""
    got = {}
    for mode in ("reference", "auto"):
        monkeypatch.setenv("SAE_LENS_ATTN_KERNELS", mode)
        sae = SAE(SAEConfig(d_in=24, d_sae=2048, k=8, apply_b_dec_to_input=apply_b_dec), init=False)
        sae.reset_parameters(torch.Generator().manual_seed(7))
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(8))
        x = torch.randn(200, 24, generator=torch.Generator().manual_seed(9)).requires_grad_()
        code = sae.encode_sparse(x)
        (sae.decode_sparse(code.values, code.indices).pow(2).sum() + code.values.sum()).backward()
        got[mode] = {"x": x.grad, "b_dec": sae.b_dec.grad, "W_enc": sae.W_enc.grad, "b_enc": sae.b_enc.grad}
    for name, ref in got["reference"].items():
        assert (got["auto"][name] - ref).abs().max() <= 1e-5 * ref.abs().max(), name


@pytest.mark.parametrize("n", [7, 256, 1000])  # below, at and above one block, with a partial last block
def test_rowwise_dot_matches_definition(n, monkeypatch):
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, 33, generator=g), torch.randn(n, 33, generator=g)
    want = (a.double() * b.double()).sum(1).float()
    torch.testing.assert_close(rowwise_dot(a, b), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("SAE_LENS_ATTN_KERNELS", "reference")
    torch.testing.assert_close(rowwise_dot(a, b), want, rtol=1e-5, atol=1e-5)


_FAULTS = """
import resource, torch
from sae_lens_attn.activations import SiteBatch
from sae_lens_attn.kernels import keep_freed_host_memory
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.training.trainer import OptimConfig, SiteState

torch.manual_seed(0)
# W_enc's and W_dec's gradients are 64 MiB each, fresh every step: above glibc's 32 MiB mmap ceiling
state = SiteState(SAE(SAEConfig(d_in=512, d_sae=32768, k=8)), OptimConfig(steps=20, warmup_steps=0))
x = torch.randn(256, 512)
faults = []
for i in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state.step(SiteBatch(x, None), i)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(keep_freed_host_memory(), *faults)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_trainer_step_stops_page_faulting_its_large_blocks():
    """In steady state a training step gets its 64 MiB gradients back without fresh pages once the trainer
    has tuned malloc; with SAE_LENS_ATTN_MALLOC=default every step faults them in again (2 x 16,384 pages
    at least)."""
    import os
    import statistics
    import subprocess
    import sys

    def run(setting):
        env = {**os.environ, "SAE_LENS_ATTN_MALLOC": setting}
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0] == "True", [int(f) for f in out[3:]]  # after two warm-up steps

    tuned, faults = run("auto")
    untouched, faults_default = run("default")
    assert tuned and not untouched
    # tuned: 0-3 faults in most steps, with an occasional 16k when the heap grows once more (fragmentation)
    assert statistics.median(faults) < 1_000 and min(faults_default) > 30_000, (faults, faults_default)
