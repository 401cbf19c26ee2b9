"""Atomic file writes: a file is either its old self or its complete new self, never half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a crash right after ``os.replace`` keeps the new name)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(final: Path, write) -> None:
    """``write(tmp)`` to a temp file beside ``final``, fsync, rename over ``final``, fsync the directory.

    The temp file is removed on any failure (ENOSPC included), so ``final`` is either untouched or whole.
    """
    final = Path(final)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)
