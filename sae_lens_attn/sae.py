"""The SAE classes (kept importable from here: ``from sae_lens_attn.sae import SAE, SAEConfig, SAEFileError``).

They live in :mod:`sae_lens_attn.saes`, one module per concept.
"""

from .saes import (  # noqa: F401  (re-exported)
    ARCHITECTURES,
    SAE,
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    LinearEncoder,
    NonFiniteOutputError,
    SAEConfig,
    SAEFileError,
    SparseCode,
    StandardSAE,
    TopKSAE,
)
from .saes.config import Selection, version_tuple  # noqa: F401
from .saes.files import CFG_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME, read_cfg_json  # noqa: F401

#: Deprecated name of :class:`SparseCode` (what ``SAE.encode`` returned before it became dense).
EncodeOutput = SparseCode
