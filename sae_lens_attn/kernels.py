"""Sparse decode for TopK SAEs: only the k chosen decoder rows are read.

``sparse_decode`` is the pure-PyTorch reference every faster path is checked against. The default path
uses ``torch.nn.functional.embedding_bag`` (a fused gather-scale-sum whose backward reaches only the
chosen rows of W_dec); set ``SAE_LENS_ATTN_KERNELS=reference`` to force the plain reference.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int


def kernels_enabled() -> bool:
    """False when the environment asks for the pure-PyTorch reference (``SAE_LENS_ATTN_KERNELS=reference``)."""
    return os.environ.get("SAE_LENS_ATTN_KERNELS", "auto").lower() not in ("reference", "off", "0", "false")


def sparse_decode_reference(
    values: Float[torch.Tensor, "batch k"],
    indices: Int[torch.Tensor, "batch k"],
    W_dec: Float[torch.Tensor, "d_sae d_in"],
) -> Float[torch.Tensor, "batch d_in"]:
    """sum_j values[b, j] * W_dec[indices[b, j]]: the definition, written plainly."""
    return torch.einsum("bk,bkd->bd", values, W_dec[indices])


def sparse_decode(
    values: Float[torch.Tensor, "batch k"],
    indices: Int[torch.Tensor, "batch k"],
    W_dec: Float[torch.Tensor, "d_sae d_in"],
) -> Float[torch.Tensor, "batch d_in"]:
    """Decode k active latents per row without forming the dense [batch, d_sae] code."""
    if not kernels_enabled():
        return sparse_decode_reference(values, indices, W_dec)
    if values.dtype != W_dec.dtype:
        values = values.to(W_dec.dtype)
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
