"""A toy SAE architecture, as a user adds one: this one module (``tests/test_architecture_registry.py``).

A shifted ReLU, ``f = ReLU(pre - 0.5)``: the standard SAE's parameters and files, its own activation and
its own name; defining the class registers it.
"""

import torch

from sae_lens_attn.saes.standard import StandardSAE


class ShiftedReLUSAE(StandardSAE):
    """``f = ReLU(pre - 0.5)``."""

    architecture = "toy_shifted_relu"

    def activate(self, pre: torch.Tensor, x_centered: torch.Tensor) -> torch.Tensor:
        return (pre - 0.5).relu()
