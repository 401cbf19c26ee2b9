"""Checkpoint files: write one atomically, verify it against its manifest, load it, find the latest.

A checkpoint ``checkpoints/step_N`` holds the SAEs in SAELens' layout, ``trainer_state.pt`` (optimizer,
step, dead-latent counters, RNG states and data position of every rank, the run id) and ``manifest.json``
(format version, run id, and the size and sha256 of every file; written last). It is built in a
``.tmp_*`` directory and renamed into place, so a ``step_N`` directory is always complete, and a kill or
a full disk at any moment leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sae_lens_attn import __version__
from sae_lens_attn.errors import InputError
from sae_lens_attn.files import (
    WriteError,
    fsync_dir,
    make_temp_dir,
    save_torch,
    write_error,
    write_json,
)
from sae_lens_attn.sae import SAE
from sae_lens_attn.weights_only import weights_only_refusal

CHECKPOINT_FORMAT = "sae_lens_attn.checkpoint"
#: Bumped when trainer_state.pt changes shape; a newer checkpoint is refused with a clear message.
CHECKPOINT_VERSION = 1
STATE_FILENAME = "trainer_state.pt"
MANIFEST_FILENAME = "manifest.json"


class CheckpointError(InputError):
    """A checkpoint that cannot be used: the message names the file and what is wrong."""


class CheckpointWriteError(WriteError):
    """Writing a checkpoint failed (e.g. ENOSPC); the earlier checkpoints are untouched."""


def rng_state() -> dict:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_checkpoint(out_dir: Path, step: int, payloads: Mapping[str, dict], state: dict,
                     run_id: str | None = None) -> Path:
    """Write ``out_dir/checkpoints/step_N`` from ``payloads`` (per site label: ``cfg``, ``params``,
    ``log_sparsity``) and the trainer ``state``; returns its path.

    Raises :class:`CheckpointWriteError` when the disk refuses (naming the file, the bytes needed and the
    free space); the partial directory is removed and the earlier checkpoints are untouched.
    """
    root = out_dir / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp: Path | None = None
    head = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "sae_lens_attn_version": __version__,
            "step": step, "run_id": run_id}
    try:
        tmp = make_temp_dir(root, ".tmp_")
        for label, p in payloads.items():
            sae = SAE(p["cfg"], init=False)
            with torch.no_grad():
                for name, t in p["params"].items():
                    getattr(sae, name).copy_(t)
            sae.save(tmp / label, p["log_sparsity"])
        save_torch(tmp / STATE_FILENAME, {**head, **state})
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {**head, "sites": sorted(payloads),
                    "files": {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
        write_json(tmp / MANIFEST_FILENAME, manifest, indent=2)
        try:
            if final.exists():  # a re-run of the same step after a resume: replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as err:
            raise write_error(final, err) from err
        tmp = None
        fsync_dir(root)
    except WriteError as err:
        last = latest_checkpoint(out_dir)
        kept = f"the last complete checkpoint {last} is intact" if last else "no earlier checkpoint exists"
        path = final / err.path.relative_to(tmp) if tmp is not None and err.path.is_relative_to(tmp) else err.path
        raise err.with_note(kept, what=f"checkpoint {final}", cls=CheckpointWriteError, path=path,
                            fix=f"{err.fix}; then rerun with --resume true to continue") from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def checkpoint_run_id(ckpt: str | os.PathLike) -> str | None:
    """The run id recorded in a checkpoint's manifest (None for checkpoints written before run ids)."""
    mpath = Path(ckpt) / MANIFEST_FILENAME
    try:
        return json.loads(mpath.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(ckpt: str | os.PathLike) -> None:
    """Check a checkpoint against its manifest (every file present, same size and sha256) and its format
    version; :class:`CheckpointError` naming the file otherwise. Checkpoints without a manifest (written
    before it existed) are only checked for ``trainer_state.pt``."""
    ckpt = Path(ckpt)
    mpath = ckpt / MANIFEST_FILENAME
    if not mpath.exists():
        if not (ckpt / STATE_FILENAME).exists():
            raise CheckpointError(f"{ckpt} is not a checkpoint: it has neither {MANIFEST_FILENAME} nor {STATE_FILENAME}")
        return
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{mpath}: unreadable checkpoint manifest ({err}); delete {ckpt} to resume from "
                              "the previous checkpoint") from err
    _check_format_version(manifest, mpath)
    for rel, info in files.items():
        f = ckpt / rel
        if not f.exists():
            raise CheckpointError(f"{f} is missing (listed in {mpath}); delete {ckpt} to resume from the previous "
                                  "checkpoint")
        size = f.stat().st_size
        if size != info["size"] or _sha256(f) != info["sha256"]:
            what = "truncated" if size < info["size"] else "corrupted"
            raise CheckpointError(
                f"{f} is {what} ({size} bytes, sha256 differs from {mpath}); delete {ckpt} to resume from the "
                "previous checkpoint"
            )


def _check_format_version(d: Mapping, where: Path) -> None:
    fv = d.get("format_version", 1)
    if not isinstance(fv, int) or fv > CHECKPOINT_VERSION:
        made_by = d.get("sae_lens_attn_version", "a newer version")
        raise CheckpointError(
            f"{where}: checkpoint format_version {fv!r} was written by sae_lens_attn {made_by}; this is "
            f"sae_lens_attn {__version__}, which reads format_version <= {CHECKPOINT_VERSION}: upgrade "
            "sae_lens_attn to resume it"
        )


def load_trainer_state(ckpt: str | os.PathLike) -> dict:
    """``trainer_state.pt`` of a checkpoint, read with ``weights_only=True``; :class:`CheckpointError`
    naming the file when it is missing, truncated, corrupted or from a newer format."""
    f = Path(ckpt) / STATE_FILENAME
    if not f.exists():
        raise CheckpointError(f"{f} is missing; {ckpt} is not a complete checkpoint")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # zipfile/pickle/RuntimeError: a truncated or corrupted file
        refusal = weights_only_refusal(f, err)
        if refusal is not None:
            raise CheckpointError(f"{refusal}; delete {Path(ckpt)} to resume from the previous checkpoint") from err
        raise CheckpointError(
            f"{f}: unreadable trainer state ({type(err).__name__}: {' '.join(str(err).split())[:200]}); the file "
            "is truncated or corrupted. "
            f"Delete {Path(ckpt)} to resume from the previous checkpoint"
        ) from err
    if not isinstance(state, dict) or "step" not in state or "sites" not in state:
        raise CheckpointError(f"{f}: not a trainer state (no 'step'/'sites')")
    _check_format_version(state, f)
    return state


def remove_partial_checkpoints(out_dir: str | os.PathLike) -> list[str]:
    """Delete ``checkpoints/.tmp_*``: checkpoints a killed run was still building (never renamed into place)."""
    root = Path(out_dir) / "checkpoints"
    removed = []
    if root.exists():
        for p in root.glob(".tmp_*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def step_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoints/step_N`` under ``out_dir`` that holds a manifest or a trainer state, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(
        p for p in root.iterdir()
        if p.name.startswith("step_") and ((p / MANIFEST_FILENAME).exists() or (p / STATE_FILENAME).exists())
    )


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoints/step_N`` under ``out_dir`` (None if there is none).

    A ``step_N`` directory only ever appears whole (it is renamed into place), so this does not read the
    files; :meth:`Trainer.restore` verifies them.
    """
    done = step_checkpoints(out_dir)
    return done[-1] if done else None


def manifest_damage(ckpt: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint's ``manifest.json`` (``"is missing"``, ``"is empty"``, ...), or None
    when it reads as a manifest. It is written last, so damage here (a disk error, a truncating copy, a
    hand edit) leaves the checkpoint's files unverifiable; it never means another run wrote them."""
    mpath = Path(ckpt) / MANIFEST_FILENAME
    if not mpath.exists():
        return "is missing"
    try:
        text = mpath.read_bytes()
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not text.strip():
        return f"is empty ({len(text)} bytes)"
    try:
        manifest = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        return f"is not valid JSON ({len(text)} bytes, {err}): it is truncated or corrupted"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return "is not a checkpoint manifest (no 'files' table)"
    return None


def drop_advice(ckpt: Path) -> str:
    """How to go on without a damaged checkpoint ``ckpt``, losing nothing that is good: delete it alone, and
    resume from the checkpoint before it (or from the start, when there is none)."""
    earlier = [p for p in step_checkpoints(ckpt.parent.parent) if p.name < ckpt.name]
    if earlier:
        return (f"delete {ckpt} (only that folder) and rerun with --resume true to resume from the previous "
                f"checkpoint, {earlier[-1].name}")
    return (f"delete {ckpt} (only that folder) and rerun with --resume true: it is the run's only checkpoint, so "
            "the run starts again from step 0 with the same settings")
