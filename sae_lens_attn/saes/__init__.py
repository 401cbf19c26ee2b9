"""SAEs of every SAELens v6 architecture behind one interface (:class:`SAE`).

``SAE(SAEConfig(...))`` builds the class ``cfg.architecture`` names (TopK by default); ``SAE.load(dir)``
reads any SAELens or sae_lens_attn directory (and Kissane et al.'s files) into the right subclass;
``SAE.from_pretrained(release, sae_id)`` fetches a published attention SAE. Modules: ``config`` (SAEConfig
and its cfg.json), ``base`` (the interface), ``topk`` (TopK / g-SAE with the fast kernels), ``relu``
(standard, JumpReLU, BatchTopK, gated), ``files`` and ``loading`` (the file formats), ``pretrained``.
"""

from .base import SAE, LinearEncoder, NonFiniteOutputError, SparseCode, sae_class
from .config import ARCHITECTURES, SAEConfig, SAEFileError
from .relu import BatchTopKSAE, GatedSAE, JumpReLUSAE, StandardSAE
from .topk import TopKSAE

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "LinearEncoder",
    "NonFiniteOutputError",
    "SAEConfig",
    "SAEFileError",
    "SparseCode",
    "StandardSAE",
    "TopKSAE",
    "sae_class",
]
