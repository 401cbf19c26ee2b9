"""Published attention-output SAEs by SAELens' release names: ``SAE.from_pretrained(release, sae_id)``.

The registry (``pretrained_releases.json``, copied from sae-lens' ``pretrained_saes.yaml`` by
``tests/fixtures/saelens/make_registry.py``) gives each SAE's Hugging Face hub repo and file path:

* ``gpt2-small-hook-z-kk``: Kissane et al. (2024)'s GPT-2 small hook_z SAEs, ReLU (``standard``), ids
  ``blocks.L.hook_z``; files ``<name>.pt`` (a state dict) beside ``<name>_cfg.json``;
* ``gemma-scope-2b-pt-att`` / ``gemma-scope-9b-pt-att`` (ids ``layer_L/width_W/average_l0_N``) and their
  ``-canonical`` releases (``layer_L/width_W/canonical``): Gemma Scope's JumpReLU SAEs on Gemma 2's hook_z
  (Lieberum et al. 2024); files ``<path>/params.npz`` with W_enc, W_dec, b_enc, b_dec, threshold, used as
  SAELens' ``gemma_2`` converter does (``apply_b_dec_to_input`` False, d_in = n_heads * d_head).

Files come through ``huggingface_hub`` (its cache; ``HF_HUB_OFFLINE=1`` is honoured), or from ``local_dir``:
a folder laid out like the hub repo (the same relative paths), for machines without the hub.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .base import SAE
from .config import SAELENS_FORMAT_VERSION, SAEFileError
from .files import read_tensors
from .loading import build_sae, load_sae

REGISTRY_FILE = Path(__file__).with_name("pretrained_releases.json")


@cache
def releases() -> dict[str, dict[str, Any]]:
    """Every release of the registry: repo_id, model, file format, architecture, and its SAEs."""
    return json.loads(REGISTRY_FILE.read_text())["releases"]


def pretrained_saes(release: str) -> dict[str, str]:
    """``sae_id -> path in the hub repo`` for ``release``."""
    rel = _release(release)
    saes = rel["saes"]
    return {s: s for s in saes} if isinstance(saes, list) else dict(saes)


def _release(release: str) -> dict[str, Any]:
    if release not in releases():
        raise InputError(f"unknown release {release!r}; known attention-SAE releases: {sorted(releases())}")
    return releases()[release]


def _sae_path(release: str, sae_id: str) -> str:
    ids = pretrained_saes(release)
    if sae_id in ids:
        return ids[sae_id]
    if len(ids) <= 40:
        listing = f"valid ids: {list(ids)}"
    else:
        def nearness(s: str) -> tuple[int, float]:  # the longest shared prefix first, then similarity
            return -len(os.path.commonprefix([sae_id, s])), -difflib.SequenceMatcher(None, sae_id, s).ratio()

        close = sorted(ids, key=nearness)[:8]
        listing = (f"closest of its {len(ids)} ids: {close} (all of them: "
                   f"sae_lens_attn.saes.pretrained.pretrained_saes({release!r}))")
    raise InputError(f"release {release!r} has no SAE {sae_id!r}; {listing}")


def fetch_file(repo_id: str, filename: str, local_dir: str | os.PathLike | None = None) -> Path:
    """``filename`` of hub repo ``repo_id``: from ``local_dir`` (laid out like the repo) when given, else
    downloaded (or taken from the cache) by ``huggingface_hub``. One-line errors naming repo and file."""
    if local_dir is not None:
        f = Path(local_dir) / filename
        if not f.is_file():
            raise SAEFileError(f"{f} is missing: local_dir must be laid out like the hub repo {repo_id} "
                               f"(with {filename} inside it)")
        return f
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename))
    except Exception as err:  # offline, no such file, no access: huggingface_hub raises many types
        raise SAEFileError(
            f"could not download {filename} from the Hugging Face hub repo {repo_id} ({type(err).__name__}); "
            "download that file elsewhere and pass local_dir=<a folder laid out like the repo>"
        ) from err


def gemma_scope_cfg(release: str, sae_id: str, path: str, W_enc_shape: tuple[int, ...]) -> dict[str, Any]:
    """The v6 config of one Gemma Scope attention SAE (as SAELens' ``gemma_2`` converter builds it). d_in and
    d_sae are the file's (``W_enc_shape``): 2048 = 8 heads x 256 on Gemma 2 2B, and the path's width."""
    rel = _release(release)
    layer = re.search(r"layer_(\d+)", path)
    if layer is None or len(W_enc_shape) != 2:
        raise InputError(f"{release}: cannot read the layer from the SAE path {path!r}, or W_enc is not a matrix")
    return {
        "architecture": rel["architecture"], "d_in": int(W_enc_shape[0]), "d_sae": int(W_enc_shape[1]), "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": bool(rel["apply_b_dec_to_input"]), "normalize_activations": "none",
        "reshape_activations": "hook_z",
        "metadata": {"model_name": rel["model"], "hook_name": f"blocks.{layer.group(1)}.attn.hook_z",
                     "hook_layer": int(layer.group(1)), "hook_head_index": None, "prepend_bos": True,
                     "context_size": rel["context_size"], "dataset_path": rel["dataset_path"],
                     "sae_lens_version": SAELENS_FORMAT_VERSION, "release": release, "sae_id": sae_id},
    }


def from_pretrained(release: str, sae_id: str, *, device: str | torch.device | None = None,
                    local_dir: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None) -> SAE:
    """The SAE ``sae_id`` of ``release`` (SAELens' names, e.g. ``("gpt2-small-hook-z-kk", "blocks.5.hook_z")``
    or ``("gemma-scope-2b-pt-att-canonical", "layer_3/width_16k/canonical")``).

    ``device``: None (default) loads on the CPU; ``dtype``: None keeps the file's (float32).
    ``local_dir``: a folder laid out like the release's hub repo, read instead of the hub. Unknown release or
    id: a ValueError listing the valid ones. Missing files or no network: :class:`SAEFileError` naming the
    repo and the file.
    """
    rel = _release(release)
    path = _sae_path(release, sae_id)
    repo = rel["repo_id"]
    if rel["format"] == "kissane_pt":
        fetch_file(repo, path[: -len(".pt")] + "_cfg.json", local_dir)  # load_sae reads it beside the .pt
        sae = load_sae(fetch_file(repo, path, local_dir), device, dtype)
        sae.cfg.metadata.update(release=release, sae_id=sae_id)
        return sae
    if rel["format"] == "gemma_scope_npz":
        f = fetch_file(repo, f"{path}/params.npz", local_dir)
        tensors = {("W_" + k[2:] if k.startswith("w_") else k): t.float() for k, t in read_tensors(f).items()}
        if "W_enc" not in tensors:
            raise SAEFileError(f"{f}: no W_enc (has {sorted(tensors)}); not a Gemma Scope params.npz")
        cfg = gemma_scope_cfg(release, sae_id, path, tuple(tensors["W_enc"].shape))
        return build_sae(cfg, tensors, str(f), f, device, dtype)
    raise InputError(f"{release}: unknown file format {rel['format']!r} in {REGISTRY_FILE}")  # pragma: no cover
