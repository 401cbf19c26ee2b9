"""The ReLU-family SAEs SAELens v6 runs at inference: standard (ReLU), JumpReLU, BatchTopK (stored as
JumpReLU) and gated. They compute what SAELens' ``StandardSAE``, ``JumpReLUSAE`` and ``GatedSAE`` compute
(checked against files and outputs written by SAELens 6.54 itself, ``tests/fixtures/saelens``); we do not
train them.

With ``xc = x - b_dec`` (``apply_b_dec_to_input``; else ``x``):

* standard: ``f = ReLU(xc @ W_enc + b_enc)``;
* jumprelu: ``f = ReLU(pre) * (pre > threshold)``, ``pre = xc @ W_enc + b_enc`` (Rajamanoharan et al. 2024b;
  Gemma Scope);
* batchtopk: JumpReLU with one threshold for every latent (Bussmann et al. 2024): SAELens' trainer keeps a
  running estimate of the smallest kept activation and saves the SAE for inference as a ``jumprelu`` file
  with that threshold everywhere (``metadata.training_architecture: "batchtopk"``), so the inference
  activation does not depend on the batch;
* gated: ``f = (xc @ W_enc + b_gate > 0) * ReLU(xc @ (W_enc * exp(r_mag)) + b_mag)`` (Rajamanoharan et al.
  2024a): the gate decides *which* latents fire, the magnitude path *how much*.
"""

from __future__ import annotations

import torch

from .base import SAE
from .config import SAEConfig


class StandardSAE(SAE):
    """ReLU SAE (SAELens ``standard``; Kissane et al.'s attention SAEs): ``f = ReLU(pre)``."""

    architecture = "standard"

    def __init__(self, cfg: SAEConfig, init: bool = True):
        super().__init__(cfg)
        self.W_enc = self._empty(cfg.d_in, cfg.d_sae, column_major=True)
        self.W_dec = self._empty(cfg.d_sae, cfg.d_in)
        self.b_enc = self._empty(cfg.d_sae)
        self.b_dec = self._empty(cfg.d_in)
        self._extra_parameters()
        if init:
            self.reset_parameters()

    def _extra_parameters(self) -> None:
        pass

    def activate(self, pre: torch.Tensor, x_centered: torch.Tensor) -> torch.Tensor:
        return pre.relu()


class JumpReLUSAE(StandardSAE):
    """JumpReLU SAE (SAELens ``jumprelu``; Gemma Scope): ``f = ReLU(pre) * (pre > threshold)``.
    ``encode_pre`` is ``pre``: it is compared with the threshold and is the magnitude where it passes."""

    architecture = "jumprelu"

    def _extra_parameters(self) -> None:
        self.threshold = self._empty(self.cfg.d_sae)

    def activate(self, pre: torch.Tensor, x_centered: torch.Tensor) -> torch.Tensor:
        return pre.relu() * (pre > self.threshold).to(pre.dtype)


class BatchTopKSAE(JumpReLUSAE):
    """A BatchTopK SAE as SAELens stores it for inference: a JumpReLU SAE whose threshold (the same for
    every latent) is the trainer's estimate of the smallest activation a batch kept. Saved as SAELens does:
    ``architecture: "jumprelu"`` with ``metadata.training_architecture: "batchtopk"``."""

    architecture = "batchtopk"


class GatedSAE(SAE):
    """Gated SAE (SAELens ``gated``): ``f = (xc @ W_enc + b_gate > 0) * ReLU(xc @ (W_enc * exp(r_mag)) + b_mag)``.

    The gate chooses which latents are active; it shares W_enc with the magnitude path. ``encode_pre``,
    ``linear_encoder`` and every attribution read the *magnitude* pre-activation (``W_enc * exp(r_mag)``,
    ``b_mag``), the value of each active feature; the gate's own pre-activation is :meth:`gate_pre`.
    """

    architecture = "gated"

    def __init__(self, cfg: SAEConfig, init: bool = True):
        super().__init__(cfg)
        self.W_enc = self._empty(cfg.d_in, cfg.d_sae, column_major=True)
        self.W_dec = self._empty(cfg.d_sae, cfg.d_in)
        self.b_gate = self._empty(cfg.d_sae)
        self.b_mag = self._empty(cfg.d_sae)
        self.r_mag = self._empty(cfg.d_sae)
        self.b_dec = self._empty(cfg.d_in)
        if init:
            self.reset_parameters()

    def _pre_weights(self, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if ids is None:
            return self.W_enc * self.r_mag.exp(), self.b_mag
        return self.W_enc[:, ids] * self.r_mag[ids].exp(), self.b_mag[ids]

    def gate_pre(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's pre-activation ``xc @ W_enc + b_gate``: a latent is active where it is > 0."""
        return self.center(x) @ self.W_enc + self.b_gate

    def activate(self, pre: torch.Tensor, x_centered: torch.Tensor) -> torch.Tensor:
        gate = (x_centered @ self.W_enc + self.b_gate) > 0
        return gate.to(pre.dtype) * pre.relu()
