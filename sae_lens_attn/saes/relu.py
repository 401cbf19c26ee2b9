"""The ReLU-family SAEs, one module each: :mod:`.standard`, :mod:`.jumprelu` (JumpReLU and BatchTopK) and
:mod:`.gated`. This module only re-exports them (their old import path)."""

from .gated import GatedSAE
from .jumprelu import BatchTopKSAE, JumpReLUSAE
from .standard import StandardSAE

__all__ = ["BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "StandardSAE"]
