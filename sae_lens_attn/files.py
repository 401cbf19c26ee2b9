"""Every file this package writes goes through here: atomic, with the umask's mode, and one error for failure.

* **Atomic.** A file is written to a temporary name beside its final one, flushed, fsync'ed, renamed over
  the final name (``os.replace``, atomic on POSIX) and the directory fsync'ed, so a reader, a crash or a
  kill sees either the old file or the complete new one, never a half-written file. The temporary file is
  removed on any failure.
* **Mode.** Files and directories are created with ``os.open(..., 0o666)`` / ``os.mkdir(..., 0o777)``, so
  the process umask (and default ACLs) decide their mode, as for any other program's files
  (``tempfile.mkstemp`` would make them 0600).
* **One error.** Any failure to write -- an ``OSError`` from the kernel, or what a serialiser makes of one
  (torch.save reports a failed write as ``RuntimeError: [enforce fail ...] unexpected pos``) -- becomes a
  :class:`WriteError` (an ``OSError``) whose one-line message names the file, the bytes it needed, the
  free space there (``shutil.disk_usage``) and the fix for the errno at hand.

The bytes of every atomic write pass through :func:`_os_write` (tests replace it to fail at a chosen byte).
"""

from __future__ import annotations

import errno as errno_mod
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError

_CHUNK = 8 << 20  # bytes per write(2): big enough to be cheap, small enough to report progress
_OS_ERROR_RE = re.compile(r"os error (\d+)")
_NOSPACE = (errno_mod.ENOSPC, getattr(errno_mod, "EDQUOT", -1))


def _os_write(fd: int, data: memoryview) -> int:
    """The one low-level write (``os.write``); returns the bytes written."""
    return os.write(fd, data)


# ------------------------------------------------------------------------------------------------ errors


def human_bytes(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor); None if unknown."""
    p = Path(path).absolute()
    for candidate in (p, *p.parents):
        try:
            if candidate.exists():
                return shutil.disk_usage(candidate if candidate.is_dir() else candidate.parent).free
        except OSError:
            return None
    return None


def _blocking_file(path: Path) -> Path | None:
    """The first component of ``path`` that exists but is not a directory (why mkdir gets EEXIST/ENOTDIR)."""
    p = Path(path).absolute()
    for candidate in (*reversed(p.parents), p):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def _fix(err_no: int | None, path: Path, needed: int | None, free: int | None) -> str:
    where = path.parent if not path.is_dir() else path
    if err_no in _NOSPACE:
        quota = " (or your quota)" if err_no != errno_mod.ENOSPC else ""
        short = needed is not None and free is not None and needed > free
        amount = f"at least {human_bytes(needed - free)}" if short else "space"
        return f"free {amount} on that file system{quota}, or write to a directory on another one"
    if err_no == errno_mod.EROFS:
        return "that file system is mounted read-only: write to a directory on a writable file system"
    if err_no in (errno_mod.EACCES, errno_mod.EPERM):
        return f"this user may not write in {where}: fix its permissions (chmod/chown), or write elsewhere"
    if err_no in (errno_mod.EEXIST, errno_mod.ENOTDIR):
        blocker = _blocking_file(path)
        if blocker is not None:
            return f"{blocker} is a file, not a directory: move or delete it, or choose another directory"
        return "a file is in the way of a directory of that path: move it, or choose another directory"
    if err_no == errno_mod.EISDIR:
        return f"{path} is a directory: move it, or choose another file name"
    if err_no == errno_mod.ENAMETOOLONG:
        return "the path is too long for the file system: choose a shorter one"
    if err_no == errno_mod.EIO:
        return "the device reported an I/O error: check the disk, and write elsewhere meanwhile"
    return "fix the cause above, or write to another directory"


class WriteError(UserError, OSError):
    """A file or directory could not be written.

    ``str()`` is one line: ``could not write <what>: <reason> (<bytes needed>, <free there>); <note>; <fix>``.
    Attributes: ``path`` (the file or directory that failed), ``errno``, ``needed`` and ``written`` (bytes;
    None when unknown), ``free`` (bytes free on that file system when it failed, or None), ``note`` (what
    is intact and how to continue, set by the caller) and ``fix``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        reason: str,
        *,
        err_no: int | None = None,
        needed: int | None = None,
        written: int | None = None,
        free: int | None = None,
        what: str | None = None,
        note: str = "",
        fix: str | None = None,
    ):
        path = Path(path)
        super().__init__(err_no, reason, str(path))
        self.path = path
        self.reason = reason
        self.needed = needed
        self.written = written
        self.free = free
        self.what = what or str(path)
        self.note = note
        self.fix = fix if fix is not None else _fix(err_no, path, needed, free)

    def with_note(self, note: str, what: str | None = None, cls: type[WriteError] | None = None,
                  fix: str | None = None, path: Path | None = None) -> WriteError:
        """The same failure described as part of a larger write (``what``), with ``note`` (what is intact)
        and, optionally, another ``fix`` and ``path``; ``cls``: a subclass to raise it as."""
        return (cls or type(self))(path or self.path, self.reason, err_no=self.errno, needed=self.needed,
                                   written=self.written, free=self.free, what=what or self.what, note=note,
                                   fix=fix or self.fix)

    def __str__(self) -> str:
        sizes = []
        if str(self.path) not in self.what:
            sizes.append(f"at {self.path}")
        if self.needed is not None:
            done = f", {human_bytes(self.written)} written" if self.written else ""
            sizes.append(f"it needed {human_bytes(self.needed)}{done}")
        if self.free is not None and (self.needed is not None or self.errno in _NOSPACE):
            sizes.append(f"{human_bytes(self.free)} free there")
        code = errno_mod.errorcode.get(self.errno, "") if self.errno is not None else ""
        detail = f" ({code + '; ' if code and sizes else code}{', '.join(sizes)})" if sizes or code else ""
        note = f"; {self.note}" if self.note else ""
        return f"could not write {self.what}: {self.reason}{detail}{note}; {self.fix}"

    def __reduce__(self):  # picklable across processes (OSError's default drops the keyword arguments)
        return (_rebuild, (type(self), self.path, self.reason, dict(
            err_no=self.errno, needed=self.needed, written=self.written, free=self.free, what=self.what,
            note=self.note, fix=self.fix)))


def _rebuild(cls, path, reason, kw):
    return cls(path, reason, **kw)


def _errno_of(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    m = _OS_ERROR_RE.search(str(err))  # safetensors: "I/O error: No space left on device (os error 28)"
    return int(m.group(1)) if m else None


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` (raised while writing a file) reports the disk refusing the write rather than a bug."""
    if isinstance(err, OSError):
        return True
    text = str(err)
    if type(err).__name__ == "SafetensorError":
        return "I/O error" in text or _OS_ERROR_RE.search(text) is not None
    # torch.save turns a failed write of its zip writer into these RuntimeErrors
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("unexpected pos", "file write failed", "PytorchStreamWriter failed", "os error")
    )


def write_error(
    path: str | os.PathLike, err: BaseException, needed: int | None = None, written: int | None = None
) -> WriteError:
    """The :class:`WriteError` for ``err``, raised while writing ``path`` (``needed`` bytes, if known)."""
    if isinstance(err, WriteError):
        return err
    path = Path(path)
    free = free_bytes(path)
    err_no = _errno_of(err)
    if err_no is None and needed is not None and free is not None and free < needed - (written or 0):
        err_no = errno_mod.ENOSPC  # torch.save's "unexpected pos" on a full disk carries no errno
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    elif err_no is not None:
        reason = os.strerror(err_no)
        if not isinstance(err, OSError):
            reason += f" ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    else:
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    return WriteError(path, reason, err_no=err_no, needed=needed, written=written, free=free)


# -------------------------------------------------------------------------------------------- directories


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


def ensure_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p path`` (mode from the umask); :class:`WriteError` naming the fix when it cannot be made
    (a file in the way, a read-only file system, no permission)."""
    path = Path(path)
    if path.is_dir():
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(path, err).with_note("", what=f"directory {path}") from err
    return path


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new, uniquely named directory in ``parent`` (mode from the umask, unlike ``tempfile.mkdtemp``'s 0700)."""
    parent = ensure_dir(parent)
    for _ in range(100):
        p = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(p, 0o777)
            return p
        except FileExistsError:
            continue
        except OSError as err:
            raise write_error(p, err) from err
    raise write_error(parent, FileExistsError(errno_mod.EEXIST, "no free temporary name"))


# ------------------------------------------------------------------------------------------ atomic files


class _AtomicFile:
    """A binary file object over a temporary file; every byte goes through :func:`_os_write`.

    The first ``OSError`` is kept in ``error``: serialisers that swallow it (torch.save) still let the
    caller report the real errno.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.written = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            while view:
                n = _os_write(self.fd, view[:_CHUNK])
                self.written += n
                view = view[n:]
        except OSError as err:
            self.error = self.error or err
            raise
        return total

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True


def _open_temp(final: Path) -> tuple[int, Path]:
    for _ in range(100):
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno_mod.EEXIST, "no free temporary name", str(final))


@contextmanager
def _atomic(final: Path, needed: int | None) -> Iterator[tuple[_AtomicFile, Path]]:
    ensure_dir(final.parent)
    fd, tmp, fh = None, None, None
    try:
        fd, tmp = _open_temp(final)
        fh = _AtomicFile(fd)
        yield fh, tmp
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, final)
        tmp = None
        fsync_dir(final.parent)
    except BaseException as err:
        cause = fh.error if fh is not None and fh.error is not None else err
        if is_write_failure(err) or cause is not err:
            written = fh.written if fh is not None and fh.written else None
            raise write_error(final, cause, needed=needed, written=written) from err
        raise
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


@contextmanager
def atomic_file(final: str | os.PathLike, needed: int | None = None) -> Iterator[_AtomicFile]:
    """``with atomic_file(path, needed) as fh: fh.write(...)``: the file appears whole under ``path`` when
    the block ends, or not at all (the old file stays) when it raises. A failure to write raises
    :class:`WriteError`; ``needed``: the expected size in bytes, for its message."""
    with _atomic(Path(final), needed) as (fh, _):
        yield fh


def atomic_write(final: str | os.PathLike, write: Callable[[str], Any], needed: int | None = None) -> None:
    """``write(tmp)`` to a temporary *path* beside ``final``, then as :func:`atomic_file`: for writers that
    need a file name. Prefer :func:`write_bytes` and the others below, whose bytes go through
    :func:`_os_write`."""
    with _atomic(Path(final), needed) as (_, tmp):
        write(str(tmp))


def write_bytes(final: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    with atomic_file(final, needed=len(data)) as fh:
        fh.write(data)
    return Path(final)


def write_text(final: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes(final, text.encode(encoding))


def write_json(final: str | os.PathLike, obj: Any, **kw) -> Path:
    return write_text(final, json.dumps(obj, **kw))


def save_tensors(final: str | os.PathLike, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file (serialised in memory, so its exact size is known, then written atomically)."""
    from safetensors.torch import save

    return write_bytes(final, save(dict(tensors), metadata=metadata))


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors inside ``obj`` (dicts, lists, tuples): what torch.save of it needs, nearly."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_torch(final: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` atomically; the bytes needed are estimated from its tensors plus 64 kB."""
    import torch

    with atomic_file(final, needed=tensor_bytes(obj) + (64 << 10)) as fh:
        torch.save(obj, fh)
    return Path(final)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a log file (not atomic: a line cut by a crash is dropped by whoever reads it back);
    failures raise :class:`WriteError`."""
    path = Path(path)
    data = text.encode()
    try:
        with open(path, "ab") as f:
            f.write(data)
    except OSError as err:
        raise write_error(path, err, needed=len(data)) from err
