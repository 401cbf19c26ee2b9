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

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def kernels_enabled() -> bool:
    """False when the environment asks for the pure-PyTorch reference (``SAE_LENS_ATTN_KERNELS=reference``)."""
    return os.environ.get("SAE_LENS_ATTN_KERNELS", "auto").lower() not in ("reference", "off", "0", "false")


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
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


# --- encode -------------------------------------------------------------------------------------------
def dense_pre(
    x_centered: Float[torch.Tensor, "batch d_in"],
    W_enc: Float[torch.Tensor, "d_in d_sae"],
    b_enc: Float[torch.Tensor, " d_sae"],
    bf16: bool = False,
    out: torch.Tensor | None = None,
) -> Float[torch.Tensor, "batch d_sae"]:
    """All pre-activations, for choosing latents: one GEMM, no autograd graph.

    ``out``: a reusable [batch, d_sae] buffer (a fresh 400 MB output every step costs page faults on the
    CPU). ``bf16``: the GEMM runs in bf16 with a bf16 bias (an fp32 bias would promote the output).
    """
    with torch.no_grad():
        if bf16:
            return torch.addmm(b_enc.to(torch.bfloat16), x_centered.to(torch.bfloat16), W_enc.to(torch.bfloat16))
        if out is not None and out.shape == (x_centered.shape[0], W_enc.shape[1]) and out.dtype == W_enc.dtype:
            return torch.addmm(b_enc, x_centered, W_enc, out=out)
        return torch.addmm(b_enc, x_centered, W_enc)


@torch.no_grad()
def exact_pre_at(
    x_centered: Float[torch.Tensor, "batch d_in"],
    indices: Int[torch.Tensor, "batch k"],
    W_enc: Float[torch.Tensor, "d_in d_sae"],
    b_enc: Float[torch.Tensor, " d_sae"],
    chunk: int = 512,
) -> Float[torch.Tensor, "batch k"]:
    """The chosen pre-activations in the weights' dtype, from gathered encoder columns, in row chunks (so the
    [chunk, k, d_in] gather stays small); no autograd graph."""
    out = torch.empty(indices.shape, dtype=W_enc.dtype, device=indices.device)
    Wt = W_enc.T
    for start in range(0, indices.shape[0], chunk):
        idx = indices[start : start + chunk]
        cols = F.embedding(idx, Wt)
        out[start : start + chunk] = torch.einsum("bd,bkd->bk", x_centered[start : start + chunk], cols) + b_enc[idx]
    return out


class _SelectedPre(torch.autograd.Function):
    """Values already computed by the selection GEMM, given a sparse backward.

    d pre[b, j] reaches W_enc[:, i_bj], b_enc[i_bj] and x[b] only: an index-add of k columns per row
    instead of the dense [batch, d_sae] gradient and two more GEMMs that autograd through ``topk`` costs.
    """

    @staticmethod
    def forward(ctx, x_centered, W_enc, b_enc, indices, values):
        ctx.save_for_backward(x_centered, W_enc, indices)
        ctx.b_shape = b_enc.shape
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x_centered, W_enc, indices = ctx.saved_tensors
        flat_idx = indices.reshape(-1)
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            gx = F.embedding_bag(indices, W_enc.T, per_sample_weights=grad.to(W_enc.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            gW = latent_outer_sum(indices, grad, x_centered, W_enc.shape[1]).to(W_enc.dtype).T
        if ctx.needs_input_grad[2]:
            gb = torch.zeros(ctx.b_shape, dtype=grad.dtype, device=grad.device).index_add_(0, flat_idx, grad.reshape(-1))
        return gx, gW, gb, None, None


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
    flat = indices.reshape(-1)
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=n_latents)
    crow = torch.zeros(n_latents + 1, dtype=torch.long, device=x.device)
    crow[1:] = counts.cumsum(0)
    col = torch.arange(indices.shape[0], device=x.device).repeat_interleave(indices.shape[1])[order]
    G = torch.sparse_csr_tensor(crow, col, weights.reshape(-1)[order].to(x.dtype), (n_latents, x.shape[0]),
                                check_invariants=False)
    return G @ x


def latent_outer_sum_reference(indices, weights, x, n_latents):
    """The definition of :func:`latent_outer_sum`, with the outer products materialised."""
    rows = (weights.unsqueeze(-1) * x.unsqueeze(1)).reshape(-1, x.shape[-1])
    return torch.zeros(n_latents, x.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, indices.reshape(-1), rows)


def selected_pre(
    x_centered: Float[torch.Tensor, "batch d_in"],
    indices: Int[torch.Tensor, "batch k"],
    W_enc: Float[torch.Tensor, "d_in d_sae"],
    b_enc: Float[torch.Tensor, " d_sae"],
    pre: Float[torch.Tensor, "batch d_sae"] | None,
) -> Float[torch.Tensor, "batch k"]:
    """The chosen pre-activations with a sparse backward. Values come from ``pre`` (the exact selection GEMM)
    or, when ``pre`` is None (a bf16 selection), are recomputed exactly by :func:`exact_pre_at`."""
    values = exact_pre_at(x_centered, indices, W_enc, b_enc) if pre is None else pre.gather(-1, indices)
    return _SelectedPre.apply(x_centered, W_enc, b_enc, indices, values)
