"""Loading SAEs of every architecture from the files SAELens (any version), we, or Kissane et al. wrote.

Accepted:

* SAELens v6 directories (``cfg.json`` + ``sae_weights.safetensors``) of architecture ``topk`` (with or
  without ``rescale_acts_by_decoder_norm``), ``standard``, ``jumprelu`` (BatchTopK SAEs saved for inference
  are ``jumprelu`` with ``metadata.training_architecture: "batchtopk"``) and ``gated``, plus ``batchtopk``
  training checkpoints (``save_model`` of SAELens' BatchTopKTrainingSAE: a scalar ``topk_threshold``);
  hook_z attention SAEs included (``reshape_activations: "hook_z"``: SAELens flattens
  ``[..., n_heads, d_head]`` head-major, exactly as :meth:`Site.flatten` does, so the weights are used as
  they are);
* our own files (the same layout; a g-SAE is ``topk`` with its rule in ``metadata.selection``);
* SAELens configs from before v6 (``hook_point``, ``activation_fn_str``/``activation_fn_kwargs.k``, boolean
  ``normalize_activations``), converted the way SAELens' ``handle_pre_6_0_config`` does;
* the original files of Kissane et al.'s attention SAEs (``<name>.pt`` beside ``<name>_cfg.json`` with
  ``act_size``/``dict_size``/``act_name``), the source of SAELens' ``gpt2-small-hook-z-kk`` release.

Functions SAELens applies at run time are folded into the weights, so the loaded SAE computes the same
function with nothing left to apply: ``rescale_acts_by_decoder_norm`` (the decoder norms move into
W_enc/b_enc, SAELens' own ``_fold_norm_topk``) and a pre-6 ``scaling_factor`` (into W_dec).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..devices import check_device
from .base import SAE
from .config import MAX_WIDTH, SAELENS_FORMAT_VERSION, SAEConfig, SAEFileError, version_tuple
from .files import (
    CFG_FILENAME,
    WEIGHTS_FILENAME,
    check_version,
    read_cfg_json,
    read_safetensors_layout,
    read_tensors,
    readable_architectures,
)

#: A tensor as the file describes it: (shape, dtype name, is floating point).
Layout = dict[str, tuple[tuple[int, ...], str, bool]]

#: Metadata keys SAELens' pre-6 converter lifts from the top level (its LLM_METADATA_KEYS).
_PRE6_METADATA_KEYS = (
    "model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
    "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
    "sae_lens_version", "sae_lens_training_version", "hook_layer",
)


def normalise_saelens_cfg(d: Mapping[str, Any], source: str = CFG_FILENAME) -> dict[str, Any]:
    """A SAELens (or sae_lens_attn) cfg.json in its v6 shape: pre-6 keys renamed, metadata collected,
    TopK given as ``architecture: "topk"`` with ``k``. Raises :class:`SAEFileError` naming ``source``."""
    d = dict(d)
    if d.get("metadata") is not None and not isinstance(d.get("metadata"), dict):
        raise SAEFileError(f"{source}: metadata must be a JSON object, got {d['metadata']!r}")
    meta = dict(d.get("metadata") or {})
    version = d.get("sae_lens_version") or meta.get("sae_lens_version")
    pre6 = "metadata" not in d and (version is None or version_tuple(str(version)) < (6,))
    if pre6:  # SAELens' handle_pre_6_0_config
        renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                   "hook_point_layer": "hook_layer", "activation_fn_str": "activation_fn"}
        d = {renames.get(k, k): v for k, v in d.items()}
        d.setdefault("architecture", "standard")
        fn_k = (d.get("activation_fn_kwargs") or {}).get("k")
        if d.get("activation_fn") == "topk" and fn_k is not None:
            d["architecture"], d["k"] = "topk", fn_k
        d.setdefault("reshape_activations", "hook_z" if "hook_z" in str(d.get("hook_name", "")) else "none")
        for key in _PRE6_METADATA_KEYS:
            if key in d and key not in meta:
                meta[key] = d[key]
    norm = d.get("normalize_activations", "none")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    d["normalize_activations"] = "none" if norm is None else norm
    missing = [k for k in ("d_in", "d_sae") if k not in d]
    if missing:
        raise SAEFileError(f"{source}: missing field(s) {missing}")
    arch = d.get("architecture")
    if not isinstance(arch, str) or arch not in readable_architectures():
        raise SAEFileError(
            f"{source}: architecture {arch!r} is not supported (supported: {sorted(readable_architectures())})"
        )
    if arch == "topk" and "k" not in d:
        raise SAEFileError(f"{source}: a topk SAE needs the field 'k'")
    for key in ("d_in", "d_sae") + (("k",) if arch == "topk" else ()):
        if not isinstance(d[key], int) or isinstance(d[key], bool) or not 0 < d[key] <= MAX_WIDTH:
            raise SAEFileError(f"{source}: {key} must be a positive integer of at most {MAX_WIDTH:,}, got {d[key]!r}")
    for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
        if key in d and not isinstance(d[key], bool):
            raise SAEFileError(f"{source}: {key} must be true or false (a JSON boolean), got {d[key]!r}")
    d["metadata"] = meta
    return d


def kissane_cfg(pt: Path) -> dict[str, Any]:
    """Kissane et al.'s ``<name>_cfg.json`` as a SAELens v6 config (as SAELens' connor_rob_hook_z loader)."""
    f = pt.with_name(pt.name[: -len(".pt")] + "_cfg.json")
    old = read_cfg_json(f)
    missing = [k for k in ("act_size", "dict_size", "act_name") if k not in old]
    if missing:
        raise SAEFileError(f"{f}: missing field(s) {missing} of a Kissane et al. attention-SAE config")
    hook = str(old["act_name"])
    return {
        "architecture": "standard", "d_in": old["act_size"], "d_sae": old["dict_size"],
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none",
        "metadata": {"model_name": old.get("model_name", "gpt2-small"), "hook_name": hook,
                     "hook_layer": old.get("layer"), "hook_head_index": None, "prepend_bos": True,
                     "context_size": old.get("seq_len", 128), "sae_lens_version": SAELENS_FORMAT_VERSION},
    }


def load_sae(path: str | os.PathLike, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> SAE:
    """Load an SAE written by sae_lens_attn or SAELens (any version), or a Kissane et al. ``.pt`` file.

    ``device``: where its parameters live; None (default) is the CPU, whatever device ``cfg.json`` records
    (the one it was trained on). ``dtype``: its parameter dtype; None keeps the file's ``dtype``.

    Returns the :class:`SAE` subclass of its architecture. Every problem raises :class:`SAEFileError` naming
    the file: missing or damaged files, unsupported or mistyped fields, shapes or dtypes that disagree with
    cfg.json (checked against a safetensors header before its data is read, and against every file before
    the SAE is allocated), non-finite weights, or a config from a newer sae_lens_attn.
    """
    path = Path(path)
    if path.suffix == ".pt" and path.is_file():
        raw, weights_file, source = kissane_cfg(path), path, str(path.with_name(path.stem + "_cfg.json"))
    else:
        cfg_file = path / CFG_FILENAME
        raw, source = read_cfg_json(cfg_file), str(cfg_file)
        check_version(path, raw)
        weights_file = path / WEIGHTS_FILENAME
    d = normalise_saelens_cfg(raw, source)
    if weights_file.suffix == ".safetensors":
        check_layout(d, sae_config(d, source, "meta", dtype), read_safetensors_layout(weights_file), source,
                     weights_file)
    return build_sae(d, read_tensors(weights_file), source, weights_file, device, dtype)


def sae_config(d: dict[str, Any], source: str, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> SAEConfig:
    """The SAEConfig of a v6-shaped config ``d`` on ``device`` (None: the CPU) in ``dtype`` (None: the file's),
    run-time rescalings left to :func:`build_sae`."""
    cfg = SAEConfig.from_saelens_dict({**d, "rescale_acts_by_decoder_norm": False, "normalize_activations": "none"},
                                      source)
    device = "cpu" if device is None else str(device if str(device) == "meta" else check_device(device))
    dtype = cfg.dtype if dtype is None else str(dtype).removeprefix("torch.")
    return dataclasses.replace(cfg, device=device, dtype=dtype)


def _as_parameters(d: dict[str, Any], cfg: SAEConfig, layout: Layout, weights_file: Path) -> Layout:
    """A file's tensor layout under the SAE's parameter names and shapes (the renames build_sae makes)."""
    layout = dict(layout)
    if cfg.architecture in ("jumprelu", "batchtopk") and "log_threshold" in layout and "threshold" not in layout:
        layout["threshold"] = layout.pop("log_threshold")  # older SAELens JumpReLU files
    if d["architecture"] == "batchtopk":  # a training checkpoint: one scalar threshold
        if "topk_threshold" not in layout:
            raise SAEFileError(f"{weights_file}: tensor 'topk_threshold' of a batchtopk checkpoint is missing "
                               f"(has {sorted(layout)})")
        shape, dtype, is_float = layout.pop("topk_threshold")
        if math.prod(shape) != 1:
            raise SAEFileError(f"{weights_file}: topk_threshold has shape {shape}; a batchtopk checkpoint holds "
                               "one scalar threshold")
        layout["threshold"] = ((cfg.d_sae,), dtype, is_float)
    return layout


def check_layout(d: dict[str, Any], cfg: SAEConfig, layout: Layout, source: str, weights_file: Path) -> None:
    """Every parameter ``cfg`` needs is in the file with its shape, as floating point (``layout``: the file's
    tensors, e.g. a safetensors header). The expected shapes come from an SAE on the meta device, so a
    hostile ``d_sae`` allocates nothing."""
    layout = _as_parameters(d, cfg, layout, weights_file)
    expected = SAE(dataclasses.replace(cfg, device="meta"), init=False).state_dict()
    for name, t in expected.items():
        if name not in layout:
            raise SAEFileError(f"{weights_file}: tensor {name!r} is missing (has {sorted(layout)})")
        shape, dtype, is_float = layout[name]
        if shape != tuple(t.shape):
            raise SAEFileError(
                f"{weights_file}: {name} has shape {shape} but {Path(source).name} (d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}) needs {tuple(t.shape)}; the config and the weights are of different SAEs"
            )
        if not is_float:
            raise SAEFileError(f"{weights_file}: {name} holds {dtype} values; SAE weights are floating point, so the "
                               "file is damaged or not an SAE")


def build_sae(d: dict[str, Any], tensors: dict[str, torch.Tensor], source: str, weights_file: Path,
              device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> SAE:
    """The SAE of a v6-shaped config ``d`` (:func:`normalise_saelens_cfg`) with ``tensors`` as the file
    holds them, on ``device`` (None: the CPU) in ``dtype`` (None: the config's); run-time rescalings folded
    into the weights. Shapes and dtypes are checked before the SAE is allocated."""
    if d["normalize_activations"] not in ("none", "expected_average_only_in"):
        # expected_average_only_in is folded into the weights by SAELens when it saves (its inference SAE
        # applies nothing at run time), so such files read like "none"; the others transform at run time.
        raise SAEFileError(
            f"{source}: normalize_activations={d['normalize_activations']!r} is not supported (its run-time "
            "normalisation is not part of this SAE); fold it into the weights first"
        )
    rescale = bool(d.get("rescale_acts_by_decoder_norm")) and d["architecture"] in ("topk", "batchtopk")
    cfg = sae_config(d, source, device, dtype)
    check_layout(d, cfg, {n: (tuple(t.shape), str(t.dtype).removeprefix("torch."), t.is_floating_point())
                          for n, t in tensors.items()}, source, weights_file)
    tensors = dict(tensors)
    if cfg.architecture in ("jumprelu", "batchtopk") and "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if d["architecture"] == "batchtopk":
        tensors["threshold"] = tensors.pop("topk_threshold").double().reshape(()).expand(cfg.d_sae)
    weights = _weights(cfg, tensors, weights_file)
    if rescale:
        # SAELens: pre *= ||W_dec_i|| before the selection, acts /= ||W_dec_i|| before decoding. Folding the
        # norms into W_enc/b_enc and out of W_dec computes the same function with unit decoder rows.
        norms = weights["W_dec"].norm(dim=1)
        weights["W_enc"] = weights["W_enc"] * norms
        weights["b_enc"] = weights["b_enc"] * norms
        weights["W_dec"] = weights["W_dec"] / norms[:, None]
    sae = SAE(cfg, init=False)
    with torch.no_grad():
        for name, t in sae.state_dict().items():
            t.copy_(weights[name])
    sae.source = str(weights_file.parent if weights_file.name == WEIGHTS_FILENAME else weights_file)
    return sae


def _weights(cfg: SAEConfig, tensors: dict[str, torch.Tensor], weights_file: Path) -> dict[str, torch.Tensor]:
    """The parameters in float64, finite, with a pre-6 ``scaling_factor`` folded into W_dec."""
    names = SAE(dataclasses.replace(cfg, device="meta"), init=False).state_dict()
    for name in names:
        if not torch.isfinite(tensors[name]).all():
            raise SAEFileError(f"{weights_file}: {name} holds NaN/inf values; the file is corrupted")
    weights = {name: tensors[name].double() for name in names}
    scale = tensors.get("scaling_factor", tensors.get("finetuning_scaling_factor"))
    if scale is not None and not torch.allclose(scale.double(), torch.ones_like(scale.double())):
        if scale.numel() not in (1, cfg.d_sae) or not torch.isfinite(scale).all():
            raise SAEFileError(f"{weights_file}: scaling_factor has shape {tuple(scale.shape)} or non-finite values; "
                               f"it must be {cfg.d_sae} finite numbers (one per latent)")
        weights["W_dec"] = weights["W_dec"] * scale.double().reshape(-1)[:, None]  # SAELens (pre 6): acts * scale
    return weights
