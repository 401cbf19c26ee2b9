"""Load any model TransformerLens' TransformerBridge can boot: a hub id, a local directory, or the default.

The embedded default model (``assets/default_model``, built by ``sae_lens_attn.training.build_default_model``)
is a Hugging Face directory and goes through exactly the code path a hub model does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "default_model"
SAMPLE_TEXT = ASSETS / "sample_text.txt"
#: The name recorded in SAE metadata for the embedded model; ``load_model`` accepts it too.
DEFAULT_MODEL_NAME = "sae-lens-attn/shakespeare-2l"


def resolve_model_name(name_or_path: str | os.PathLike | None) -> str:
    """The name to record in metadata: the default's alias, a hub id, or a local path as given."""
    if name_or_path is None or str(name_or_path) in (DEFAULT_MODEL_NAME, "default"):
        return DEFAULT_MODEL_NAME
    return str(name_or_path)


def _local_dir(name_or_path: str | os.PathLike | None) -> Path | None:
    if name_or_path is None or str(name_or_path) in (DEFAULT_MODEL_NAME, "default"):
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; rebuild it with "
                "`python -m sae_lens_attn.training.build_default_model --corpus <shakespeare folder>`"
            )
        return DEFAULT_MODEL_DIR
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} is not a Hugging Face model directory: it has no config.json")
        return p
    return None


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Boot a model with ``TransformerBridge.boot_transformers`` and put it in eval mode, frozen.

    ``name_or_path``: a hub id (``"gpt2"``, ``"EleutherAI/pythia-70m"``), a local directory in Hugging
    Face format, or None for the embedded default. Parameters are frozen (``requires_grad=False``): the
    toolkit only ever differentiates with respect to activations.
    """
    from transformer_lens.model_bridge import TransformerBridge

    from .devices import check_device

    local = _local_dir(name_or_path)
    target = str(local) if local is not None else str(name_or_path)
    device = str(check_device(device))  # before anything loads: a missing GPU is one clear error
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        bridge = TransformerBridge.boot_transformers(target, device=device, dtype=dtype)
    except OSError as err:
        raise OSError(
            f"could not load model {target!r}: it is not a local directory and the hub could not serve it "
            f"({err.__class__.__name__}: {err}). Pass a local Hugging Face directory, or check the hub id "
            "and the network"
        ) from err
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    bridge.sae_lens_attn_name = resolve_model_name(name_or_path)  # type: ignore[attr-defined]
    return bridge


def model_name(model) -> str:
    """The name to record in SAE metadata for a model returned by :func:`load_model`."""
    return getattr(model, "sae_lens_attn_name", None) or getattr(model.cfg, "model_name", "unknown")


def bos_token_id(model) -> int:
    """The token every packed row starts with: the tokenizer's BOS, else its EOS."""
    tok = model.tokenizer
    for tid in (tok.bos_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the model's tokenizer has neither a BOS nor an EOS token; pass prepend_bos=False")


def model_device(model) -> torch.device:
    return next(iter(model.parameters())).device
