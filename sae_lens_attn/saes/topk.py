"""TopK (Gao et al. 2024) and gradient-aware TopK (g-SAE, Olmo et al. 2024): the SAE we train, with the
fast sparse kernels.

Weights follow SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``,
and ``pre = (x - b_dec) @ W_enc + b_enc`` (``apply_b_dec_to_input``). A g-SAE is saved as
``architecture: "topk"``: without a gradient it *is* a TopK SAE, and that is how SAELens will run it; the
training rule is kept in ``metadata.selection``. SAELens' ``rescale_acts_by_decoder_norm`` is folded into
the weights when such a file is loaded (same function, unit decoder rows).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int

from ..errors import InputError
from ..kernels import dense_pre, kernels_enabled, selected_pre, topk_indices
from .base import SAE, SparseCode
from .config import SAEConfig, register_field_check


def check_topk_fields(cfg: SAEConfig) -> None:
    """TopK's fields, checked on every SAEConfig (they sit on every one: SAELens' cfg.json is flat): ``k``
    within ``d_sae`` for a TopK SAE, a known ``selection`` (``gsae`` only for TopK), and a finite
    ``gsae_beta`` >= 0. (``k`` is a positive width like ``d_in`` and ``d_sae``: SAEConfig checks that first.)"""
    if cfg.architecture == "topk" and cfg.k > cfg.d_sae:
        raise InputError(f"SAEConfig.k ({cfg.k}) must not exceed d_sae ({cfg.d_sae})")
    if cfg.selection not in ("topk", "gsae"):
        raise InputError(f"SAEConfig.selection must be 'topk' or 'gsae', got {cfg.selection!r}")
    if cfg.selection == "gsae" and cfg.architecture != "topk":
        raise InputError(f"SAEConfig.selection='gsae' needs architecture='topk', got {cfg.architecture!r}")
    if isinstance(cfg.gsae_beta, bool) or not isinstance(cfg.gsae_beta, (int, float)) \
            or not math.isfinite(cfg.gsae_beta) or cfg.gsae_beta < 0:
        raise InputError(f"SAEConfig.gsae_beta must be a finite number >= 0, got {cfg.gsae_beta!r}")


register_field_check(check_topk_fields)


class TopKSAE(SAE):
    """A TopK / g-SAE over ``d_in``-wide activations: each row keeps its k largest pre-activations (ReLU'd).
    ``encode_pre`` is the pre-activation that decides them."""

    architecture = "topk"

    def __init__(self, cfg: SAEConfig, init: bool = True):
        super().__init__(cfg)
        d_in, d_sae = cfg.d_in, cfg.d_sae
        # W_enc is [d_in, d_sae] as in SAELens, but laid out column-major (a transposed [d_sae, d_in] buffer):
        # the sparse step reads and writes whole encoder columns, which are then contiguous.
        self.W_enc = self._empty(d_in, d_sae, column_major=True)
        self.W_dec = self._empty(d_sae, d_in)
        self.b_enc = self._empty(d_sae)
        self.b_dec = self._empty(d_in)
        if init:
            self.reset_parameters()

    #: Run the selection GEMM under bf16 autocast (kept values are still recomputed in the weights' dtype).
    bf16_select: bool = False

    #: Trainers set this: ``encode_sparse`` then writes ``pre`` into one reused [batch, d_sae] buffer, so a
    #: returned ``SparseCode.pre`` is only valid until the next call (a fresh 400 MB tensor every step costs
    #: page faults on the CPU).
    reuse_pre_buffer: bool = False

    def _pre_buffer(self, xc: torch.Tensor, name: str = "_buf") -> torch.Tensor | None:
        """A reused [batch, d_sae] buffer in the selection dtype (``name``: one per use), or None when
        ``reuse_pre_buffer`` is off."""
        if not self.reuse_pre_buffer:
            return None
        shape = (xc.shape[0], self.cfg.d_sae)
        dtype = torch.bfloat16 if self.bf16_select else self.W_enc.dtype
        buf = self.__dict__.get(name)
        if buf is None or buf.shape != shape or buf.device != xc.device or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype, device=xc.device)
            self.__dict__[name] = buf
        return buf

    def activate(self, pre: torch.Tensor, x_centered: torch.Tensor) -> torch.Tensor:
        """ReLU of the k largest entries per row, zeros elsewhere (the dense TopK of SAELens)."""
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def pre_at(
        self, x: Float[torch.Tensor, "batch d_in"], indices: Int[torch.Tensor, "batch k"], pre: torch.Tensor | None = None
    ) -> Float[torch.Tensor, "batch k"]:
        """Differentiable pre-activations of the given latents only. ``pre``: the exact dense pre-activations
        if already computed (their values are reused; the backward is sparse either way)."""
        if not kernels_enabled():
            return (self.center(x) @ self.W_enc + self.b_enc).gather(-1, indices)
        x, b_dec = self._input(x)
        return selected_pre(x, b_dec, indices, self.W_enc, self.b_enc, None if self.bf16_select else pre)

    def gsae_scores(
        self,
        pre: Float[torch.Tensor, "batch d_sae"],
        grad: Float[torch.Tensor, "batch d_in"],
        out: torch.Tensor | None = None,
    ) -> Float[torch.Tensor, "batch d_sae"]:
        """``z_i * (1 + beta * |W_dec[i] . g|)`` with z = ReLU(pre): each latent's activation weighted by its
        first-order effect on the loss (Olmo et al. 2024, "Features that Make a Difference", the g-TopK
        rule). The gradient is data (detached), so selection itself is not differentiated.

        Where the paper is silent: latents with pre <= 0 (z = 0) all score 0 there; we keep their raw
        pre-activation as the score, so ties among them break exactly as in TopK and beta = 0 reproduces
        TopK's choice latent for latent (their kept value is 0 either way).

        Computed as ``max(pre, pre + pre * |beta*e|)``, which is that rule (the factor is >= 1, so the max
        picks the weighted score where pre > 0 and pre itself elsewhere): one GEMM (beta folded into the
        [batch, d_in] gradient, not applied to the [batch, d_sae] product) and three in-place passes over one
        [batch, d_sae] buffer (``out``, reused by trainers). The GEMM runs in ``pre``'s dtype: bf16 after a
        bf16 selection GEMM (``bf16_select``), else the weights' dtype.
        """
        pre = pre.detach()
        W_dec = self.W_dec.detach().to(pre.dtype)
        g = grad.detach().to(device=pre.device, dtype=pre.dtype) * self.cfg.gsae_beta
        if out is None or out.shape != pre.shape or out.dtype != pre.dtype:
            out = torch.empty_like(pre)
        torch.mm(g, W_dec.T, out=out).abs_()
        torch.addcmul(pre, pre, out, out=out)
        return torch.maximum(out, pre, out=out)

    def encode_sparse(self, x: Float[torch.Tensor, "... d_in"], grad: torch.Tensor | None = None) -> SparseCode:
        """Choose k latents per row. A g-SAE uses ``grad`` (dL/dx at the site, the input's shape); without
        one it falls back to TopK and says so in ``selection``. Leading dims are kept.

        Sparse path (default): the selection GEMM runs outside autograd and the kept values are recomputed
        from the k chosen encoder columns, so gradients touch only those. Reference path
        (``SAE_LENS_ATTN_KERNELS=reference``): dense autograd through the full pre-activation matrix.
        """
        x = self.flat_input(x)
        if x.dim() == 2:
            return self._encode_rows(x, grad)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.cfg.d_in)
        code = self._encode_rows(rows, None if grad is None else self.flat_input(grad).reshape(rows.shape))
        return SparseCode(code.values.reshape(*lead, -1), code.indices.reshape(*lead, -1),
                          code.pre.reshape(*lead, -1), code.selection)

    def _encode_rows(self, x: Float[torch.Tensor, "batch d_in"], grad: torch.Tensor | None) -> SparseCode:
        fast = kernels_enabled()
        gsae = self.cfg.selection == "gsae" and grad is not None
        if fast:
            x, b_dec = self._input(x)
            with torch.no_grad():
                xc = x - b_dec if b_dec is not None else x
            # TopK adds b_enc inside the selection pass (topk_indices(bias=...)); the g-SAE needs it first
            pre = dense_pre(xc, self.W_enc, self.b_enc if gsae else None, bf16=self.bf16_select,
                            out=self._pre_buffer(xc))
        else:
            xc = self.center(x)
            pre = xc @ self.W_enc + self.b_enc
        k = self.cfg.k
        if gsae:
            indices = topk_indices(self.gsae_scores(pre, grad, out=self._pre_buffer(xc, "_score_buf")), k)
            rule = "gsae"
        else:
            indices = topk_indices(pre.detach(), k, bias=self.b_enc.detach() if fast else None)
            rule = "topk" if self.cfg.selection == "topk" else "topk (gsae without gradient)"
        if not fast:
            values = pre.gather(-1, indices).relu()
        else:  # after a bf16 selection the kept values are recomputed in the weights' dtype
            values = selected_pre(
                x, b_dec, indices, self.W_enc, self.b_enc, None if self.bf16_select else pre, x_centered=xc
            ).relu()
        return SparseCode(values, indices, pre, rule)

    def _encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """Dense activations, zeros off the top k (SAELens' ``encode``), through the sparse selection."""
        code = self.encode_sparse(x)
        dense = torch.zeros(*code.values.shape[:-1], self.cfg.d_sae, dtype=code.values.dtype, device=code.values.device)
        return dense.scatter(-1, code.indices, code.values)

    def _reconstruct(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        code = self.encode_sparse(x)
        return self.decode_sparse(code.values, code.indices)
