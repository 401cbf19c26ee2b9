"""Sparse TopK encode/decode: after one dense GEMM, only the k chosen latents are touched.

The TopK step needs the full pre-activation matrix only to *choose* latents. So the fast path runs that
GEMM once outside autograd (optionally in bf16), picks the k latents, and recomputes the chosen
pre-activations exactly, in the parameters' dtype, from the gathered encoder columns. Backward then
reaches W_enc, b_enc and W_dec only through the chosen latents: no dense [batch, d_sae] gradient and no
second and third GEMM. Decoding gathers the k chosen decoder rows (``embedding_bag``).

Every function has a pure-PyTorch reference twin used by the equivalence tests; set
``SAE_LENS_ATTN_KERNELS=reference`` to run the reference (dense autograd) path everywhere.
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from .errors import InputError

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def kernels_enabled() -> bool:
    """False when the environment asks for the pure-PyTorch reference (``SAE_LENS_ATTN_KERNELS=reference``)."""
    return os.environ.get("SAE_LENS_ATTN_KERNELS", "auto").lower() not in ("reference", "off", "0", "false")


ROWWISE_CHUNK = 256


def rowwise_dot(a: Float[torch.Tensor, "n d"], b: Float[torch.Tensor, "n d"]) -> Float[torch.Tensor, " n"]:
    """out[i] = a[i] . b[i]. On a CPU, in blocks of ``ROWWISE_CHUNK`` rows through one small product buffer
    that stays in the core's cache: about 3x faster than ``einsum("ij,ij->i")``, which becomes a batched
    [1, d] x [d, 1] matrix product, and than one [n, d] temporary. Elsewhere, or with
    ``SAE_LENS_ATTN_KERNELS=reference``, it is that einsum."""
    if not kernels_enabled() or a.device.type != "cpu" or a.shape[0] <= ROWWISE_CHUNK:
        return torch.einsum("ij,ij->i", a, b)
    n = a.shape[0]
    out = torch.empty(n, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    buf = torch.empty(ROWWISE_CHUNK, a.shape[1], dtype=out.dtype, device=a.device)
    for s in range(0, n, ROWWISE_CHUNK):
        e = min(s + ROWWISE_CHUNK, n)
        torch.sum(torch.mul(a[s:e], b[s:e], out=buf[: e - s]), 1, out=out[s:e])
    return out


_MALLOC_TUNED: bool | None = None


def keep_freed_host_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from its heap and keep them after they are freed (raise
    ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB). Returns whether the setting is in force.

    By default glibc gives every block above 32 MiB its own ``mmap`` and unmaps it on ``free``, so the
    gradients, Adam's temporaries and the [batch, d_sae] buffers of a training step (75-400 MB each) come
    back as fresh pages every step: about 60,000 page faults and 0.15-0.2 s of kernel time per step at
    d_sae 24576, a fifth of the step. With the blocks kept, the same step makes about 3,000, and in steady
    state most steps none. The process keeps its peak footprint instead of returning it to the system
    between steps, and the heap grows a few more times in the first steps (aligned blocks of one size do
    not always fit the holes of another) before it settles: resident memory about 10% higher at d_sae
    12288 (1,026 vs ~920 MiB, flat over 60 steps). That is the usual trade for a training process
    (PyTorch's CPU tuning guide recommends jemalloc or tcmalloc for the same reason).

    Called by the trainer; ``SAE_LENS_ATTN_MALLOC=default`` leaves malloc alone. Outside Linux with glibc
    this does nothing and returns False. Process-wide and applied once.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is not None:
        return _MALLOC_TUNED
    _MALLOC_TUNED = False
    if os.environ.get("SAE_LENS_ATTN_MALLOC", "auto").lower() in ("default", "off", "0", "false"):
        return False
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
        _MALLOC_TUNED = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # pragma: no cover - no usable libc
        pass
    return _MALLOC_TUNED


# --- decode -------------------------------------------------------------------------------------------
def sparse_decode_reference(
    values: Float[torch.Tensor, "batch k"],
    indices: Int[torch.Tensor, "batch k"],
    W_dec: Float[torch.Tensor, "d_sae d_in"],
) -> Float[torch.Tensor, "batch d_in"]:
    """sum_j values[b, j] * W_dec[indices[b, j]]: the definition, written plainly."""
    return torch.einsum("bk,bkd->bd", values.to(W_dec.dtype), W_dec[indices])


def sparse_decode(
    values: Float[torch.Tensor, "batch k"],
    indices: Int[torch.Tensor, "batch k"],
    W_dec: Float[torch.Tensor, "d_sae d_in"],
) -> Float[torch.Tensor, "batch d_in"]:
    """Decode k active latents per row without forming the dense [batch, d_sae] code."""
    if not kernels_enabled():
        return sparse_decode_reference(values, indices, W_dec)
    return _SparseDecode.apply(values.to(W_dec.dtype), indices, W_dec)


class _SparseDecode(torch.autograd.Function):
    """``embedding_bag`` forward; backward by hand: d values[b, j] = g[b] . W_dec[i_bj] (:func:`gathered_dots`,
    aten's fused per-sample-weight backward) and d W_dec = the CSR product :func:`latent_outer_sum` (rows
    sorted by latent, written into uninitialised memory), which is cheaper on a CPU than ``embedding_bag``'s
    dense backward (a zeroed [d_sae, d_in] buffer plus a scatter)."""

    @staticmethod
    def forward(ctx, values, indices, W_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        values, indices, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        g_values = g_W = None
        if ctx.needs_input_grad[0]:
            g_values = gathered_dots(grad, indices, W_dec)
        if ctx.needs_input_grad[2]:
            g_W = latent_outer_sum(indices, values, grad, W_dec.shape[0]).to(W_dec.dtype)
        return g_values, None, g_W


def gathered_dots(
    x: Float[torch.Tensor, "batch d"], indices: Int[torch.Tensor, "batch k"], rows: Float[torch.Tensor, "n d"]
) -> Float[torch.Tensor, "batch k"]:
    """out[b, j] = x[b] . rows[indices[b, j]], without materialising the [batch, k, d] gather.

    This is exactly the gradient of ``embedding_bag(indices, rows, per_sample_weights=w)`` with respect to
    ``w`` at upstream gradient ``x``, which aten computes in one fused pass
    (``_embedding_bag_per_sample_weights_backward``, several times faster on a CPU than gathering the rows
    and multiplying). That op is called directly; if a torch version lacks it, the same number comes from
    ``torch.autograd.grad`` through the public ``embedding_bag`` (one extra forward pass).
    """
    x = x.detach().to(rows.dtype).contiguous()
    rows = rows.detach()
    b, k = indices.shape
    try:
        offsets = torch.arange(0, b * k, k, device=indices.device)
        offset2bag = torch.arange(b, device=indices.device).repeat_interleave(k)
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            x, rows, indices.reshape(-1), offsets, offset2bag, 0, -1  # mode 0: sum; no padding index
        )
        return out.view(b, k)
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - depends on the torch build
        with torch.enable_grad():
            w = torch.ones(indices.shape, dtype=rows.dtype, device=rows.device, requires_grad=True)
            y = F.embedding_bag(indices, rows, per_sample_weights=w, mode="sum")
            return torch.autograd.grad(y, w, x)[0]


# --- selection ----------------------------------------------------------------------------------------
TOPK_GROUP = 16


def topk_indices_reference(scores: Float[torch.Tensor, "batch n"], k: int) -> Int[torch.Tensor, "batch k"]:
    return scores.topk(k, dim=-1, sorted=False).indices


def topk_mode() -> str:
    """``SAE_LENS_ATTN_TOPK``: ``auto`` (default: two-level on a CPU, where it is measured faster, and
    ``torch.topk`` elsewhere, where it is not yet measured), ``two_level`` (everywhere) or ``torch``."""
    mode = os.environ.get("SAE_LENS_ATTN_TOPK", "auto").lower().replace("-", "_")
    if mode not in ("auto", "two_level", "torch"):
        raise InputError(f"SAE_LENS_ATTN_TOPK={mode!r}: use auto, two_level or torch")
    return mode


def topk_indices(
    scores: Float[torch.Tensor, "batch n"], k: int, bias: Float[torch.Tensor, " n"] | None = None
) -> Int[torch.Tensor, "batch k"]:
    """The k largest entries per row (unordered), as ``torch.topk`` chooses them, about 1.5x faster on a CPU.

    Two levels. Split each row's n entries into nb = n / TOPK_GROUP blocks, block c = {c, c + nb, c + 2nb,
    ...} (a strided partition, so the block maxima are one vectorised reduction over a [G, nb] view). Each of
    the row's k largest entries is >= the k-th largest block maximum t, so it lies in a block whose maximum
    is >= t: one of the k blocks with the largest maxima. ``topk`` then runs over those k * TOPK_GROUP
    candidates instead of n. The selected values are exactly torch.topk's; only which of several exactly
    tied entries is taken may differ. On CUDA, for small rows, or with ``SAE_LENS_ATTN_KERNELS=reference``
    this is ``torch.topk`` itself; ``SAE_LENS_ATTN_TOPK`` overrides the device rule (:func:`topk_mode`).

    On a CPU in fp32 (``auto``), the same two-level rule runs as one compiled pass per row
    (:mod:`sae_lens_attn.ckernels`) when a C compiler was found; otherwise as PyTorch ops.

    ``bias``: first ``scores += bias`` in place (the compiled kernel does it in the same pass).
    """
    mode = topk_mode()
    with torch.no_grad():
        if kernels_enabled() and mode == "auto" and scores.device.type == "cpu":
            from . import ckernels

            indices, bias_added = ckernels.topk_rows(scores, k, bias)
            if bias_added:
                bias = None
            if indices is not None:
                return indices
        if bias is not None:
            scores.add_(bias.to(scores.dtype))
        if not kernels_enabled() or scores.dim() != 2 or mode == "torch" or (mode == "auto" and scores.device.type != "cpu"):
            return topk_indices_reference(scores, k)
        return _topk_two_level(scores, k, TOPK_GROUP)


def _topk_two_level(scores: torch.Tensor, k: int, G: int) -> torch.Tensor:
    """Two-level selection with the largest group G' <= G (halving) that divides the row into >= 4k blocks;
    the k best blocks are themselves chosen the same way (the block maxima form a narrower row)."""
    n = scores.shape[-1]
    while G >= 4 and (n % G or n < 4 * k * G):
        G //= 2
    if G < 4:
        return topk_indices_reference(scores, k)
    rows, nb = scores.shape[0], n // G
    top_blocks = _topk_two_level(scores.reshape(rows, G, nb).amax(1), k, G)  # [rows, k]
    cand = (top_blocks.unsqueeze(-1) + nb * torch.arange(G, device=scores.device)).reshape(rows, k * G)
    return cand.gather(1, scores.gather(1, cand).topk(k, dim=-1, sorted=False).indices)


# --- encode -------------------------------------------------------------------------------------------
def dense_pre(
    x_centered: Float[torch.Tensor, "batch d_in"],
    W_enc: Float[torch.Tensor, "d_in d_sae"],
    b_enc: Float[torch.Tensor, " d_sae"] | None,
    bf16: bool = False,
    out: torch.Tensor | None = None,
) -> Float[torch.Tensor, "batch d_sae"]:
    """All pre-activations, for choosing latents: one GEMM, no autograd graph. ``b_enc`` None: the bias is
    left out (the caller adds it, e.g. ``topk_indices(pre, k, bias=b_enc)`` in the same pass as the top-k).

    ``out``: a reusable [batch, d_sae] buffer (a fresh 400 MB output every step costs page faults on the
    CPU). ``bf16``: the GEMM runs in bf16 (on a CPU with AMX or on a GPU, several times faster than fp32)
    and returns bf16 pre-activations. The bias is added after the GEMM rather than by ``addmm``, which
    first copies the broadcast bias into the whole output.
    """
    dtype = torch.bfloat16 if bf16 else W_enc.dtype
    with torch.no_grad():
        if out is None or out.shape != (x_centered.shape[0], W_enc.shape[1]) or out.dtype != dtype:
            out = torch.empty(x_centered.shape[0], W_enc.shape[1], dtype=dtype, device=x_centered.device)
        torch.mm(x_centered.to(dtype), W_enc.to(dtype), out=out)
        return out if b_enc is None else out.add_(b_enc.to(dtype))


@torch.no_grad()
def exact_pre_at(
    x_centered: Float[torch.Tensor, "batch d_in"],
    indices: Int[torch.Tensor, "batch k"],
    W_enc: Float[torch.Tensor, "d_in d_sae"],
    b_enc: Float[torch.Tensor, " d_sae"],
) -> Float[torch.Tensor, "batch k"]:
    """The chosen pre-activations in the weights' dtype, from the k chosen encoder columns; no autograd
    graph."""
    return gathered_dots(x_centered, indices, W_enc.T).add_(b_enc.detach()[indices])


class _SelectedPre(torch.autograd.Function):
    """Values already computed by the selection GEMM, given a sparse backward.

    pre[b, j] = (x[b] - b_dec) . W_enc[:, i_bj] + b_enc[i_bj] reaches W_enc[:, i_bj], b_enc[i_bj], x[b] and
    b_dec only: a CSR product into the chosen encoder columns instead of the dense [batch, d_sae] gradient
    and two more GEMMs that autograd through ``topk`` costs. b_dec's gradient is -W_enc @ (the gradient
    summed per latent), one matrix-vector product; the per-row input gradient is formed only when ``x``
    itself requires a gradient.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, indices, values, x_centered):
        ctx.save_for_backward(x_centered, W_enc, indices)
        ctx.d_sae = b_enc.shape[0]
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x_centered, W_enc, indices = ctx.saved_tensors
        need_x, need_bdec, need_W, need_benc = ctx.needs_input_grad[:4]
        grad = grad.to(W_enc.dtype)
        gx = g_bdec = gW = gb = None
        if need_x:
            gx = F.embedding_bag(indices, W_enc.T, per_sample_weights=grad, mode="sum")
        if need_W:
            gW = latent_outer_sum(indices, grad, x_centered, ctx.d_sae).to(W_enc.dtype).T
        if need_benc or need_bdec:
            per_latent = torch.zeros(ctx.d_sae, dtype=grad.dtype, device=grad.device)
            per_latent.index_add_(0, indices.reshape(-1), grad.reshape(-1))
            gb = per_latent if need_benc else None
            g_bdec = -(W_enc @ per_latent) if need_bdec else None
        return gx, g_bdec, gW, gb, None, None, None


def latent_outer_sum(
    indices: Int[torch.Tensor, "batch k"],
    weights: Float[torch.Tensor, "batch k"],
    x: Float[torch.Tensor, "batch d"],
    n_latents: int,
) -> Float[torch.Tensor, "n_latents d"]:
    """out[i] = sum over (b, j) with indices[b, j] == i of weights[b, j] * x[b]: G^T @ x for the sparse
    [batch, n_latents] matrix G, as a CSR product (rows sorted by latent) instead of materialising the
    [batch*k, d] outer products."""
    if x.dtype not in (torch.float32, torch.float64) and x.device.type == "cpu":
        return latent_outer_sum_reference(indices, weights.to(x.dtype), x, n_latents)  # no bf16 CSR on CPU (MKL)
    crow, col, order = latent_csr(indices, n_latents)
    G = torch.sparse_csr_tensor(crow, col, weights.reshape(-1)[order].to(x.dtype), (n_latents, x.shape[0]),
                                check_invariants=False)
    out = torch.empty(n_latents, x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.addmm(out, G, x, beta=0, out=out)  # beta=0: the uninitialised buffer is never read (G @ x zero-fills)


_csr_cache: tuple | None = None


def latent_csr(indices: Int[torch.Tensor, "batch k"], n_latents: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow, col, order): the CSR structure of the [n_latents, batch] matrix with a non-zero at (i, b) for
    every indices[b, j] == i, and the permutation that sorts the flattened (b, j) entries by latent.

    The encoder's and the decoder's backward both need it for the same ``indices`` tensor in one step, so
    the last result is kept (keyed by the tensor's identity and version; a weak reference, so nothing is
    kept alive)."""
    global _csr_cache
    if _csr_cache is not None:
        ref, version, n, result = _csr_cache
        if ref() is indices and version == indices._version and n == n_latents:
            return result
    flat = indices.reshape(-1)
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=n_latents)
    crow = torch.zeros(n_latents + 1, dtype=torch.long, device=indices.device)
    crow[1:] = counts.cumsum(0)
    col = torch.arange(indices.shape[0], device=indices.device).repeat_interleave(indices.shape[1])[order]
    result = (crow, col, order)
    _csr_cache = (weakref.ref(indices), indices._version, n_latents, result)
    return result


def latent_outer_sum_reference(indices, weights, x, n_latents):
    """The definition of :func:`latent_outer_sum`, with the outer products materialised."""
    rows = (weights.unsqueeze(-1) * x.unsqueeze(1)).reshape(-1, x.shape[-1])
    return torch.zeros(n_latents, x.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, indices.reshape(-1), rows)


def selected_pre(
    x: Float[torch.Tensor, "batch d_in"],
    b_dec: Float[torch.Tensor, " d_in"] | None,
    indices: Int[torch.Tensor, "batch k"],
    W_enc: Float[torch.Tensor, "d_in d_sae"],
    b_enc: Float[torch.Tensor, " d_sae"],
    pre: Float[torch.Tensor, "batch d_sae"] | None,
    x_centered: Float[torch.Tensor, "batch d_in"] | None = None,
) -> Float[torch.Tensor, "batch k"]:
    """The chosen pre-activations ``(x - b_dec) @ W_enc[:, i] + b_enc[i]`` with a sparse backward (``b_dec``
    None: no centring). Values come from ``pre`` (the exact selection GEMM) or, when ``pre`` is None (a bf16
    selection), are recomputed exactly by :func:`exact_pre_at`. ``x_centered``: ``x - b_dec`` if the caller
    has it already."""
    if x_centered is None:
        with torch.no_grad():
            x_centered = x - b_dec if b_dec is not None else x
    values = exact_pre_at(x_centered, indices, W_enc, b_enc) if pre is None else pre.gather(-1, indices)
    return _SelectedPre.apply(x, b_dec, W_enc, b_enc, indices, values, x_centered.detach())
