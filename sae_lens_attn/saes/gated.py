"""The gated SAE (Rajamanoharan et al. 2024a) as SAELens v6 runs it at inference:
``f = (xc @ W_enc + b_gate > 0) * ReLU(xc @ (W_enc * exp(r_mag)) + b_mag)``: the gate decides *which* latents
fire, the magnitude path *how much*. Checked against SAELens 6.54's own files and outputs; we do not train it.
"""

from __future__ import annotations

import torch

from .base import SAE
from .config import SAEConfig


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
