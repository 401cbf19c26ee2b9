"""Fault injection for tests: make the package's one low-level write (``files._os_write``) fail."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import sae_lens_attn.files as files


def enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def fd_name(fd: int) -> str:
    """The path of an open file descriptor (Linux: /proc/self/fd)."""
    return os.readlink(f"/proc/self/fd/{fd}")


class WriteFault:
    """Replace :func:`sae_lens_attn.files._os_write` so that writing the ``nth`` file whose (temporary) name
    contains ``match`` fails once ``at_byte`` bytes of it are written: those bytes reach the disk, then
    ``exc()`` is raised (ENOSPC by default), as a disk filling up mid-file does.

    ``before_fail`` runs just before the failure (to look at the disk at that moment). ``files`` lists
    the names of the matching files written so far; ``failed`` whether the fault fired.
    """

    def __init__(self, monkeypatch, match: str, at_byte: int = 0, nth: int = 1,
                 exc: Callable[[], BaseException] = enospc, before_fail: Callable[[], None] | None = None,
                 once: bool = True):
        self.match, self.at_byte, self.nth, self.exc, self.before_fail = match, at_byte, nth, exc, before_fail
        self.once = once
        self.files: list[str] = []
        self.written: dict[str, int] = {}
        self.failed = False
        self._real = files._os_write
        monkeypatch.setattr(files, "_os_write", self._write)

    def _write(self, fd: int, data: memoryview) -> int:
        name = os.path.basename(fd_name(fd))
        if self.match not in name or (self.failed and self.once):
            return self._real(fd, data)
        key = name  # temporary names are unique (descriptors and inodes are reused)
        if key not in self.written:
            self.written[key] = 0
            self.files.append(name)
        if self.files.index(name) + 1 != self.nth:
            return self._real(fd, data)
        room = self.at_byte - self.written[key]
        if len(data) <= room:
            n = self._real(fd, data)
            self.written[key] += n
            return n
        if room > 0:  # a short write, as write(2) makes when the disk fills up; the next call fails
            n = self._real(fd, data[:room])
            self.written[key] += n
            return n
        if self.before_fail is not None:
            self.before_fail()
        self.failed = True
        raise self.exc()
