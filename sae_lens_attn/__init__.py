"""sae_lens_attn: sparse autoencoders on attention-layer outputs.

Ten lines from Python::

    from sae_lens_attn import TrainConfig, train
    result = train(TrainConfig(layers="1", k=16))
    print(result.table())
"""

__version__ = "0.1.0"

from .models import DEFAULT_MODEL_DIR, SAMPLE_TEXT, load_model  # noqa: E402
from .sae import SAE, SAEConfig, SparseCode  # noqa: E402
from .sites import Site, parse_sites  # noqa: E402


def __getattr__(name: str):
    # The trainer lives in sae_lens_attn.training; import it lazily so `import sae_lens_attn` stays light.
    if name in ("TrainConfig", "train", "TrainResult"):
        from . import training

        return getattr(training, name)
    raise AttributeError(name)


__all__ = [
    "DEFAULT_MODEL_DIR",
    "SAMPLE_TEXT",
    "SAE",
    "SAEConfig",
    "SparseCode",
    "Site",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "load_model",
    "parse_sites",
    "train",
]
