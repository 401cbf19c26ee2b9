"""llama.cpp GGUF checkpoints, read through ``transformers``' GGUF support (the ``gguf`` package).

``transformers`` dequantizes every tensor to the requested dtype and builds the tokenizer from the same
file, so a GGUF model is an ordinary Hugging Face model afterwards and the bridge boots it as one. What
the file was quantized to (``Q4_1``, ``Q8_0``, ...) is recorded in the model description
(:attr:`~sae_lens_attn.spec.ModelSpec.source`): a quantized model's activations are those of the
dequantized weights, not of the original full-precision checkpoint. ``save_pretrained`` of such a model is
refused by ``transformers``; nothing here relies on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import InputError, MissingExtraError, MissingFileError
from .spec import UnsupportedModelError


class GGUFInfo(NamedTuple):
    path: Path
    architecture: str
    """``general.architecture`` (llama.cpp's name: ``llama``, ``qwen2``, ``gemma2``, ...)."""
    file_type: str
    """Quantization of most tensors (``MOSTLY_Q4_1``, ``ALL_F32``, ...), or ``unknown``."""

    def describe(self, dtype: torch.dtype) -> str:
        quant = self.file_type.removeprefix("MOSTLY_").removeprefix("ALL_")
        return f"gguf {self.path.name} ({self.architecture}, {quant}, dequantized to {str(dtype).removeprefix('torch.')})"


def is_gguf(name_or_path: str | os.PathLike | None) -> bool:
    return name_or_path is not None and str(name_or_path).lower().endswith(".gguf")


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise MissingExtraError(f"reading {path} needs the gguf package: pip install 'sae-lens-attn[gguf]'") from None
    try:
        return GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/struct errors on anything that is not GGUF
        raise InputError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); pass a llama.cpp "
                         ".gguf file or a Hugging Face model directory") from err


def _field_str(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def gguf_info(path: str | os.PathLike) -> GGUFInfo:
    """Architecture and quantization of a GGUF file (its header only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"GGUF file {path} does not exist")
    reader = _reader(path)
    arch = _field_str(reader, "general.architecture") or "unknown"
    file_type = "unknown"
    ft = reader.fields.get("general.file_type")
    if ft is not None:
        from gguf import LlamaFileType

        try:
            file_type = LlamaFileType(int(ft.parts[ft.data[0]][0])).name
        except ValueError:
            file_type = f"type {int(ft.parts[ft.data[0]][0])}"
    return GGUFInfo(path, arch, file_type)


def check_supported(info: GGUFInfo) -> None:
    """Refuse, by name, an architecture ``transformers`` cannot build from GGUF."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if info.architecture not in supported:
        raise UnsupportedModelError(
            f"{info.path}: GGUF architecture {info.architecture!r} cannot be read by this transformers (it reads "
            f"{', '.join(supported)}); convert the model to a Hugging Face directory, or use a GGUF of a "
            "supported architecture"
        )


def load_gguf(path: str | os.PathLike, dtype: torch.dtype):
    """``(hf_model, tokenizer, info)`` of a GGUF file, dequantized to ``dtype`` (on the CPU)."""
    info = gguf_info(path)
    check_supported(info)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(info.path.parent), info.path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model, tokenizer, info
