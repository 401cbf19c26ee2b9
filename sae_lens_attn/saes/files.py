"""SAE files: SAELens' v6 directory layout, read and written, with an error naming the file for every way a
file can be bad."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..files import ensure_dir, save_tensors, write_json
from ..weights_only import weights_only_refusal
from .config import REGISTRY, SAEFileError, version_tuple

__all__ = ["SAEFileError", "CFG_FILENAME", "WEIGHTS_FILENAME", "SPARSITY_FILENAME"]

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"

#: SAELens v6 ``SAEConfig`` fields (sae_lens/saes/sae.py), plus each inference architecture's own.
SAELENS_BASE_FIELDS = (
    "architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
    "reshape_activations", "metadata",
)
SAELENS_ARCH_FIELDS = {
    "standard": (),
    "topk": ("k", "rescale_acts_by_decoder_norm"),
    "jumprelu": (),
    "gated": (),
}
SAELENS_NORMALIZE = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm",
                     "covariance_whitening")


def readable_architectures() -> tuple[str, ...]:
    """Architectures a cfg.json may name that we read: SAELens' inference ones, and every registered one
    (``batchtopk`` among them, which SAELens' trainer writes into its checkpoints)."""
    return tuple(dict.fromkeys((*SAELENS_ARCH_FIELDS, *REGISTRY)))


def read_cfg_json(f: Path) -> dict[str, Any]:
    """An SAE directory's ``cfg.json`` as a dict, with an error naming the file for every way it can be bad."""
    if not f.exists():
        raise SAEFileError(f"{f.parent} is not an SAE directory: {f.name} is missing")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEFileError(f"{f}: not valid JSON ({err}); the file is truncated or corrupted") from err
    if not isinstance(d, dict):
        raise SAEFileError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not f.exists():
        raise SAEFileError(f"{f} is missing")
    try:
        return load_file(str(f))
    except Exception as err:  # safetensors raises its own error type for truncated or corrupted files
        raise SAEFileError(f"{f}: unreadable safetensors file ({err}); it is truncated or corrupted") from err


def read_safetensors_layout(f: Path) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """Each tensor's ``(shape, dtype, is_float)`` from a ``.safetensors`` header, without reading the data
    (so a config can be checked against the file before anything is allocated)."""
    from safetensors import safe_open

    if not f.exists():
        raise SAEFileError(f"{f} is missing")
    try:
        with safe_open(str(f), framework="pt") as fh:
            out = {}
            for name in fh.keys():
                sl = fh.get_slice(name)
                dtype = str(sl.get_dtype())
                out[name] = (tuple(int(n) for n in sl.get_shape()), dtype, dtype.startswith("F") or dtype == "BF16")
            return out
    except Exception as err:  # safetensors raises its own error type for truncated or corrupted files
        raise SAEFileError(f"{f}: unreadable safetensors file ({err}); it is truncated or corrupted") from err


def read_tensors(f: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors``, ``.npz`` (Gemma Scope) or torch ``.pt`` file (a state dict)."""
    if not f.exists():
        raise SAEFileError(f"{f} is missing")
    if f.suffix == ".safetensors":
        return read_safetensors(f)
    try:
        if f.suffix == ".npz":
            import numpy as np

            with np.load(f) as data:
                return {str(k): torch.from_numpy(np.array(data[k])) for k in data.files}
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # zipfile / pickle / numpy errors for damaged files
        refusal = weights_only_refusal(f, err)
        if refusal is not None:  # a valid pickle of more than tensors: refused on purpose, not damaged
            raise SAEFileError(refusal) from err
        raise SAEFileError(f"{f}: unreadable weights file ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                           "it is truncated or corrupted") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise SAEFileError(f"{f}: expected a dict of tensors, got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def check_version(path: str | os.PathLike, cfg: Mapping[str, Any] | None = None) -> None:
    """Refuse an SAE written by a newer sae_lens_attn (``metadata.sae_lens_attn_version`` > ours).

    ``path``: the SAE directory (or its cfg.json). The error names the file and both versions.
    """
    path = Path(path)
    f = path if path.suffix == ".json" else path / CFG_FILENAME
    d = dict(cfg) if cfg is not None else read_cfg_json(f)
    meta = d.get("metadata") if isinstance(d.get("metadata"), dict) else {}
    theirs = meta.get("sae_lens_attn_version", d.get("sae_lens_attn_version"))
    if theirs is None:
        return
    if version_tuple(str(theirs)) > version_tuple(__version__):
        raise SAEFileError(
            f"{f}: written by sae_lens_attn {theirs}, newer than this sae_lens_attn {__version__}; its format "
            "may have changed, so it is not read. Upgrade sae_lens_attn (pip install -U sae-lens-attn)"
        )


def write_sae_dir(path: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any],
                  log_sparsity: torch.Tensor | None = None) -> Path:
    """``sae_weights.safetensors``, ``sparsity.safetensors`` (if given) and ``cfg.json``, each written to a
    temporary name and renamed, so a crash never leaves a half-written file under the final name. A failure
    to write raises :class:`~sae_lens_attn.files.WriteError` naming the file, the bytes needed and the free
    space."""
    path = ensure_dir(path)
    save_tensors(path / WEIGHTS_FILENAME, tensors)
    if log_sparsity is not None:
        save_tensors(path / SPARSITY_FILENAME, {"sparsity": log_sparsity.detach().float().contiguous().cpu()})
    write_json(path / CFG_FILENAME, cfg, indent=2)
    return path
