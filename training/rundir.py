"""A run directory is one unit: one run's config, log, checkpoints and SAEs, tied together by a run id.

* A fresh run gets a new run id (a uuid), written into ``train_config.json`` and into every checkpoint's
  manifest and trainer state.
* A fresh run refuses an ``out_dir`` that already holds a run, unless ``overwrite`` (which first deletes
  that run's files: ``train_config.json``, ``metrics.json``, ``log.jsonl``, ``checkpoints/``, the SAE
  directories, W&B files; nothing else in the directory is touched) or ``resume``. A directory holding only
  a ``train_config.json`` (a run that failed before its first step) does not count as a run.
* ``resume`` continues only the run in ``train_config.json``: the settings that decide what is computed must
  equal it (the message names every field that differs), and the latest checkpoint must carry its run id
  (and, for directories from before run ids, lie within its number of steps). So nothing of an earlier run
  can leak into a later one.

* **One writer.** A run holds an exclusive advisory lock (``flock``) on ``out_dir/.sae_lens_attn.lock`` from
  :func:`prepare_run_dir` until :func:`train` returns (under torchrun: rank 0, the one that writes). A
  second run into the same folder, ``--overwrite`` included, is refused naming the holder's pid (written into
  the lock file). The kernel drops the lock when the holder's process ends, however it ends (a SIGKILL
  too), so there is no stale lock to clean up; the file itself stays (deleting it would let two runs lock
  two different files of one name).

All of this is decided before the model loads, so a refusal costs a second, not a harvest.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sae_lens_attn.errors import InputError
from sae_lens_attn.files import ensure_dir, write_error, write_json, write_text

from .checkpoints import (
    MANIFEST_FILENAME,
    checkpoint_run_id,
    drop_advice,
    latest_checkpoint,
    manifest_damage,
    remove_partial_checkpoints,
)
from .config import TrainConfig

CONFIG_FILENAME = "train_config.json"
LOG_FILENAME = "log.jsonl"
LOCK_FILENAME = ".sae_lens_attn.lock"
#: Settings that may change between a run and its ``--resume`` (they do not change what is computed).
RESUME_MAY_CHANGE = frozenset(
    {"resume", "overwrite", "progress", "out_dir", "checkpoint_every", "log_every", "device", "distributed",
     "wandb_project", "deterministic"}
)
_RUN_FILES = (CONFIG_FILENAME, "metrics.json", LOG_FILENAME, "wandb_run_id")
_RUN_DIRS = ("checkpoints", "wandb")
_TMP_RE = re.compile(r"^\.(train_config\.json|metrics\.json|log\.jsonl|wandb_run_id)\..*\.tmp$")
_SAE_DIR_RE = re.compile(r"^L\d+\.(z|attn_out)(\.h\d+)?$")
_KEPT = "the checkpoints here are kept; --overwrite true would delete them"


class RunDirError(InputError):
    """``out_dir`` cannot be used as asked (it holds another run, or resuming would mix two runs)."""


@dataclass
class RunStart:
    """How a run begins: its id and, when resuming, the checkpoint to continue from."""

    run_id: str | None
    """None only when resuming a run written before run ids existed."""
    checkpoint: Path | None


def new_run_id() -> str:
    return uuid.uuid4().hex


# ----------------------------------------------------------------------------------------- one writer

#: Locks this process holds, by (run directory, thread): a thread that already holds a directory's lock
#: (a caller of prepare_run_dir outside train) gets it again; any other open of the file is refused.
_HELD: dict[tuple[Path, int], int] = {}
_HELD_GUARD = threading.Lock()


class RunDirBusyError(RunDirError):
    """Another live run holds the run directory's lock."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "a process that has not written its pid yet"


def lock_run_dir(out_dir: Path, overwrite: bool = False) -> bool:
    """Take ``out_dir``'s exclusive lock for this thread until :func:`release_run_dir`, or raise
    :class:`RunDirBusyError` naming the pid that holds it. False when this thread held it already."""
    key = (out_dir.resolve(), threading.get_ident())
    with _HELD_GUARD:
        if key in _HELD:
            return False
        path = out_dir / LOCK_FILENAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # the umask decides the mode
        except OSError as err:
            raise write_error(path, err).with_note("", what=f"lock file {path}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            busy = isinstance(err, BlockingIOError)
            holder = _holder(fd) if busy else ""
            os.close(fd)
            if not busy:  # e.g. ENOLCK: a network file system without locks
                raise RunDirError(f"cannot lock {path} ({err.strerror}): this file system does not support file "
                                  "locks, so a second run into this folder could not be refused; train into an "
                                  "--out-dir on a local disk") from err
            also = " --overwrite does not delete a folder a live run is writing." if overwrite else ""
            raise RunDirBusyError(
                f"{out_dir} is being written by another training run ({holder}, holding {path}); two runs in one "
                f"folder would overwrite each other's checkpoints and SAEs.{also} Wait for that run to end (or "
                "stop it), or train into a new --out-dir"
            ) from None
        # In place, not through files.py's atomic rename: the lock belongs to this inode. Only the holder
        # writes here, so readers see the holder's pid or (for a moment) nothing.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = fd
        return True


def release_run_dir(out_dir: str | os.PathLike) -> None:
    """Drop this thread's lock on ``out_dir`` (nothing when it holds none)."""
    with _HELD_GUARD:
        fd = _HELD.pop((Path(out_dir).resolve(), threading.get_ident()), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor of the open file releases the flock


def holds_run_dir(train: Callable) -> Callable:
    """Decorator of ``train(cfg, ...)``: the lock :func:`prepare_run_dir` takes is released when ``train``
    returns or raises (a process that dies releases it through the kernel)."""

    @functools.wraps(train)
    def wrapper(cfg: TrainConfig, *args, **kwargs):
        try:
            return train(cfg, *args, **kwargs)
        finally:
            release_run_dir(cfg.out_dir)

    return wrapper


def run_files(out_dir: Path, keep: Path | None = None) -> list[Path]:
    """The entries of ``out_dir`` that a training run writes (``keep``, e.g. an activation cache placed
    inside it, is never one of them)."""
    if not out_dir.is_dir():
        return []
    found = []
    for p in sorted(out_dir.iterdir()):
        if keep is not None and p.resolve() == keep:
            continue
        name = p.name
        if (name in _RUN_FILES and p.is_file()) or (name in _RUN_DIRS and p.is_dir()) or _TMP_RE.match(name):
            found.append(p)
        elif _SAE_DIR_RE.match(name) and p.is_dir() and (p / "cfg.json").exists():
            found.append(p)
    return found


def prepare_run_dir(cfg: TrainConfig, log: Callable[[str], None] = print) -> RunStart:
    """Lock ``cfg.out_dir`` for this run, check it against ``cfg.resume`` / ``cfg.overwrite`` (the rules in the
    module docstring), clear it for ``overwrite``, and return the run id and the checkpoint to resume from.
    The lock is held until :func:`release_run_dir` (``train`` releases it when it ends); a refusal drops it."""
    out_dir = ensure_dir(cfg.out_dir)  # a file in the way, read-only, no permission: WriteError with the fix
    took = lock_run_dir(out_dir, cfg.overwrite)  # before anything is read or deleted: one writer per folder
    try:
        return _fresh_or_resumed(cfg, out_dir, log)
    except BaseException:
        if took:  # refused: the folder is not ours to hold (train's own release covers the other paths)
            release_run_dir(out_dir)
        raise


def _fresh_or_resumed(cfg: TrainConfig, out_dir: Path, log) -> RunStart:
    keep = Path(cfg.activation_cache).resolve() if cfg.activation_cache else None
    found = run_files(out_dir, keep)
    if cfg.resume:
        return _resume_start(cfg, out_dir, found, log)
    if [p for p in found if p.name != CONFIG_FILENAME]:
        if not cfg.overwrite:
            raise RunDirError(
                f"{out_dir} already holds a training run ({_names(found)}): pass --resume true to continue it, "
                "--overwrite true to delete it and start afresh, or train into a new --out-dir"
            )
        for p in found:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        log(f"--overwrite: deleted the earlier run in {out_dir} ({_names(found)})")
    return RunStart(new_run_id(), None)


def _names(paths: list[Path]) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:6]) + (f", and {len(names) - 6} more" if len(names) > 6 else "")


def _resume_start(cfg: TrainConfig, out_dir: Path, found: list[Path], log) -> RunStart:
    config_file = out_dir / CONFIG_FILENAME
    if not config_file.exists():
        if found:
            raise RunDirError(
                f"--resume: {out_dir} holds run files ({_names(found)}) but no {CONFIG_FILENAME}, so whether they "
                "belong to this run cannot be checked; pass --overwrite true instead of --resume to delete them "
                "and start afresh, or train into a new --out-dir"
            )
        log(f"resume: no run in {out_dir}; starting afresh")
        return RunStart(new_run_id(), None)
    saved = read_config(config_file)
    check_same_config(cfg, saved, out_dir)
    run_id = saved.get("run_id")
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        log(f"resume: no complete checkpoint in {out_dir}; starting afresh")
        truncate_log(out_dir, 0)
        remove_partial_checkpoints(out_dir)
        return RunStart(run_id or new_run_id(), None)
    damage = manifest_damage(ckpt)
    if damage and not (damage == "is missing" and run_id is None):  # runs with ids always wrote manifests
        raise RunDirError(
            f"--resume: {ckpt}, the latest checkpoint of the run in {out_dir}, is damaged: its {MANIFEST_FILENAME} "
            f"{damage}, so its files cannot be verified; {drop_advice(ckpt)}"
        )
    theirs = checkpoint_run_id(ckpt)
    if theirs != run_id:
        raise RunDirError(
            f"--resume: {ckpt} belongs to run {theirs or '(none: written before run ids)'}, but {config_file} is "
            f"run {run_id or '(none)'}: {out_dir} mixes two runs, and resuming would continue the wrong one. Train "
            "into a new --out-dir (this folder stays as it is), or pass --overwrite true instead of --resume to "
            "delete both runs' files here and start afresh"
        )
    step = int(ckpt.name.removeprefix("step_"))
    if step > cfg.steps:
        raise RunDirError(
            f"--resume: {ckpt} is at step {step}, beyond the {cfg.steps} steps of the run in {config_file}, so it "
            "belongs to another run; pass --overwrite true instead of --resume to delete it all and start "
            "afresh, or train into a new --out-dir"
        )
    return RunStart(run_id, ckpt)


def read_config(config_file: Path) -> dict:
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(f"{config_file}: unreadable ({err}); cannot check that --resume continues the same "
                          f"run. Restore that file, or train into a new --out-dir ({_KEPT})") from err
    if not isinstance(saved, dict):
        raise RunDirError(f"{config_file}: not a training configuration (a JSON object). Restore that file, or "
                          f"train into a new --out-dir ({_KEPT})")
    return saved


def check_same_config(cfg: TrainConfig, saved: dict, out_dir: Path) -> None:
    """The settings that decide what is computed must be those of the run being resumed."""
    current = asdict(cfg)
    names = {f.name for f in fields(TrainConfig)}
    diffs = [
        f"--{k.replace('_', '-')}: checkpointed run {saved[k]!r}, now {current[k]!r}"
        for k in sorted(names - RESUME_MAY_CHANGE)
        if k in saved and saved[k] != current[k]
    ]
    if diffs:
        raise RunDirError(
            f"--resume: {out_dir} holds a run with other settings ({'; '.join(diffs)}). Resume with the original "
            "settings, or train into a new --out-dir"
        )


def write_config(cfg: TrainConfig, out_dir: Path, run_id: str | None) -> None:
    write_json(out_dir / CONFIG_FILENAME, {**asdict(cfg), "run_id": run_id}, indent=2)


def truncate_log(out_dir: Path, step: int) -> None:
    """Drop log records written after the checkpoint we resume from (they will be written again)."""
    f = out_dir / LOG_FILENAME
    if not f.exists():
        return
    kept = []
    for line in f.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut by the kill: drop it
            continue
    write_text(f, "".join(line + "\n" for line in kept))
