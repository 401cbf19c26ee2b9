"""SAEs of every SAELens v6 architecture behind one interface (:class:`SAE`).

``SAE(SAEConfig(...))`` builds the class ``cfg.architecture`` names (TopK by default); ``SAE.load(dir)``
reads any SAELens or sae_lens_attn directory (and Kissane et al.'s files) into the right subclass;
``SAE.from_pretrained(release, sae_id)`` fetches a published attention SAE. Modules: ``config`` (SAEConfig,
its cfg.json and the architecture registry), ``base`` (the interface), one module per architecture
(``topk``: TopK / g-SAE with the fast kernels; ``standard``, ``jumprelu`` with BatchTopK, ``gated``),
``files`` and ``loading`` (the file formats), ``pretrained``.
"""

from .base import SAE, LinearEncoder, NonFiniteOutputError, SparseCode, sae_class
from .config import REGISTRY, SAEConfig, SAEFileError, architectures

# One module per architecture; defining its class registers it (config.REGISTRY), so importing the module
# here is what makes SAE(cfg) and SAE.load find it.
from .gated import GatedSAE
from .jumprelu import BatchTopKSAE, JumpReLUSAE
from .standard import StandardSAE
from .topk import TopKSAE

#: The built-in architectures (registered above); :func:`architectures` also lists ones added later.
ARCHITECTURES: tuple[str, ...] = architectures()

__all__ = [
    "ARCHITECTURES",
    "REGISTRY",
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
    "architectures",
    "sae_class",
]
