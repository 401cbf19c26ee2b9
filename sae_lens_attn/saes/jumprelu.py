"""JumpReLU (Rajamanoharan et al. 2024b; Gemma Scope) and BatchTopK (Bussmann et al. 2024) as SAELens v6
runs them at inference: ``f = ReLU(pre) * (pre > threshold)``, ``pre = xc @ W_enc + b_enc``.

BatchTopK is JumpReLU with one threshold for every latent: SAELens' trainer keeps a running estimate of the
smallest kept activation and saves the SAE for inference as a ``jumprelu`` file with that threshold
everywhere (``metadata.training_architecture: "batchtopk"``), so the inference activation does not depend on
the batch. Checked against SAELens 6.54's own files and outputs; we do not train them.
"""

from __future__ import annotations

import torch

from .standard import StandardSAE


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
    saelens_name = "jumprelu"
