"""The standard (ReLU) SAE SAELens v6 runs at inference (Kissane et al.'s attention SAEs): with ``xc = x - b_dec``
(``apply_b_dec_to_input``; else ``x``), ``f = ReLU(xc @ W_enc + b_enc)``. Checked against files and outputs
written by SAELens 6.54 itself (``tests/fixtures/saelens``); we do not train it.
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
