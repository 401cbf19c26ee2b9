"""Interoperability with SAELens: the export SAELens reads, and a check of its cfg.json conventions.

Loading lives in :mod:`sae_lens_attn.saes` (``SAE.load``: every SAELens v6 architecture, older SAELens
configs and Kissane et al.'s files); :func:`load_sae` here is the same function, kept for old callers, and
``ReLUSAE`` an alias of :class:`~sae_lens_attn.saes.StandardSAE` (JumpReLU and BatchTopK SAEs subclass it).

Exporting (:func:`export_saelens`) writes the v6 layout with ``metadata.sae_lens_version`` set, without
which SAELens treats a config as pre-v6 and drops the metadata (hook name, model name, ...).
:func:`saelens_cfg_problems` checks a cfg.json against SAELens v6's field list and conventions.
The Neuronpedia export builds on the analysis, so it is a front end: :mod:`sae_lens_attn.frontends.neuronpedia`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .sae import SAE, StandardSAE
from .saes.config import SAELENS_FORMAT_VERSION, version_tuple  # noqa: F401  (re-exported)
from .saes.files import (  # noqa: F401  (re-exported)
    SAELENS_ARCH_FIELDS,
    SAELENS_BASE_FIELDS,
    SAELENS_NORMALIZE,
    check_version,
)
from .saes.loading import load_sae, normalise_saelens_cfg  # noqa: F401  (re-exported)

#: Deprecated alias: the ReLU SAE class (JumpReLUSAE and BatchTopKSAE are subclasses of it).
ReLUSAE = StandardSAE


# --------------------------------------------------------------------------------- SAELens cfg handling


def saelens_cfg_problems(d: Mapping[str, Any]) -> list[str]:
    """What in ``d`` (a cfg.json) SAELens v6 would reject, misread or silently drop; empty when fine.

    Checked: every v6 field present with SAELens' type and value conventions (dtype spelled like
    ``"float32"``, ``normalize_activations`` and ``reshape_activations`` among SAELens' choices,
    ``reshape_activations: "hook_z"`` only for a hook_z site), no unknown top-level field (SAELens drops
    them), and ``metadata.sae_lens_version`` >= 6 (else SAELens drops the metadata).
    """
    problems = []
    arch = d.get("architecture")
    if arch not in SAELENS_ARCH_FIELDS:
        return [f"architecture {arch!r} is not one of {sorted(SAELENS_ARCH_FIELDS)}"]
    wanted = SAELENS_BASE_FIELDS + SAELENS_ARCH_FIELDS[arch]
    problems += [f"missing field {k!r}" for k in wanted if k not in d]
    problems += [f"unknown top-level field {k!r} (SAELens drops it)" for k in d if k not in wanted]
    for k in ("d_in", "d_sae") + (("k",) if arch == "topk" else ()):
        v = d.get(k)
        if k in d and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            problems.append(f"{k} must be a positive integer, got {v!r}")
    if arch == "topk" and isinstance(d.get("k"), int) and isinstance(d.get("d_sae"), int) and d["k"] > d["d_sae"]:
        problems.append(f"k={d['k']} exceeds d_sae={d['d_sae']}")
    dtype = d.get("dtype")
    if "dtype" in d and not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
        problems.append(f"dtype must name a torch dtype like 'float32' (no 'torch.' prefix), got {dtype!r}")
    for k in ("apply_b_dec_to_input",) + (("rescale_acts_by_decoder_norm",) if arch == "topk" else ()):
        if k in d and not isinstance(d[k], bool):
            problems.append(f"{k} must be a boolean, got {d[k]!r}")
    if "device" in d and not isinstance(d["device"], str):
        problems.append(f"device must be a string, got {d['device']!r}")
    if "normalize_activations" in d and d["normalize_activations"] not in SAELENS_NORMALIZE:
        problems.append(f"normalize_activations must be one of {SAELENS_NORMALIZE}, got {d['normalize_activations']!r}")
    meta = d.get("metadata")
    if not isinstance(meta, dict):
        problems.append(f"metadata must be an object, got {type(meta).__name__}")
        meta = {}
    if d.get("reshape_activations") not in ("none", "hook_z"):
        problems.append(f"reshape_activations must be 'none' or 'hook_z', got {d.get('reshape_activations')!r}")
    elif d["reshape_activations"] == "hook_z" and meta.get("hook_name") and not str(meta["hook_name"]).endswith("_z"):
        problems.append(f"reshape_activations 'hook_z' needs a hook_z hook_name, got {meta['hook_name']!r}")
    version = meta.get("sae_lens_version")
    if version is None or version_tuple(str(version)) < (6,):
        problems.append(f"metadata.sae_lens_version must be >= 6 (got {version!r}): SAELens would read the file "
                        "as pre-v6 and drop the metadata")
    if "hook_name" not in meta:
        problems.append("metadata.hook_name is missing: SAELens and Neuronpedia need it to attach the SAE")
    return problems


# ------------------------------------------------------------------------------------------ exporting


def saelens_export_dict(sae: SAE) -> dict[str, Any]:
    """cfg.json for SAELens v6 (what ``sae.save`` writes): our fields, ``metadata.sae_lens_version`` set, the
    architecture under SAELens' name."""
    return sae.cfg.to_saelens_dict()


def export_saelens(sae: SAE, path: str | os.PathLike, log_sparsity: torch.Tensor | None = None) -> Path:
    """Write ``sae`` so that ``sae_lens.SAE.load_from_disk(path)`` loads it with its metadata.

    A g-SAE is written as ``topk`` (without a gradient it is one); its rule stays in ``metadata.selection``.
    Raises ValueError when the config would not pass :func:`saelens_cfg_problems` (e.g. no hook_name).
    """
    problems = saelens_cfg_problems(saelens_export_dict(sae))
    if problems:
        raise InputError(f"cannot export to SAELens: {'; '.join(problems)}")
    return sae.save(path, log_sparsity)
