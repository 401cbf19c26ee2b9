"""Writing the activation cache: harvest token rows once and commit them as shards (see :mod:`.cache`).

A shard is written to a temporary name, fsync'ed and renamed (:mod:`~sae_lens_attn.files`), and only then
is the manifest rewritten to list it; a crash at any moment leaves the manifest describing complete shards
only, and the next :func:`write_cache` removes the leftovers and continues from ``rows_done``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from jaxtyping import Int

from .activations import check_sites, harvest
from .cache_manifest import (
    _INDEX_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILENAME,
    CacheError,
    CacheWriteError,
    Manifest,
    ShardInfo,
    _check_compatible,
    _new_manifest,
    _rows_sha256,
    _sha256_file,
    _shard_name,
    read_manifest,
)
from .errors import InputError
from .files import WriteError, ensure_dir, save_tensors, write_error, write_text
from .sites import Site

LOCK_FILENAME = ".write.lock"
_SHARD_RE = re.compile(r"^shard_(\d{5,})\.safetensors$")
_TMP_RE = re.compile(r"^\.(shard_\d{5,}\.safetensors|manifest\.json)\..*\.tmp$")


@contextmanager
def _write_lock(cache_dir: Path):
    """One writer per cache: a second one would interleave shards and delete the first one's temp files."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the single-writer rule is the caller's
        yield
        return
    try:
        fh = open(cache_dir / LOCK_FILENAME, "a")  # write-ok: an empty lock file, its failure reported below
    except OSError as err:
        raise _write_error(cache_dir, LOCK_FILENAME, write_error(cache_dir / LOCK_FILENAME, err), None, None) from err
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(
                f"another write_cache is writing to {cache_dir}; wait for it to finish"
            ) from None
        yield
    finally:
        fh.close()  # closing releases the lock


def _remove_leftovers(cache_dir: Path, manifest: Manifest | None) -> list[str]:
    """Temp files of an interrupted write, and shard files the manifest never listed (renamed, then crash)."""
    listed = {s.file for s in manifest.shards} if manifest is not None else set()
    removed = []
    for p in cache_dir.iterdir():
        if _TMP_RE.match(p.name) or (_SHARD_RE.match(p.name) and p.name not in listed):
            p.unlink()
            removed.append(p.name)
    return removed



def write_cache(
    model,
    rows: Int[torch.Tensor, "rows pos"],
    sites: Sequence[Site],
    cache_dir: str | os.PathLike,
    *,
    with_grad: bool = False,
    drop_bos: bool = True,
    shard_tokens: int = 65536,
    model_batch_rows: int = 32,
) -> Manifest:
    """Harvest ``rows`` through :func:`~sae_lens_attn.activations.harvest` and store them as shards.

    On an existing cache this continues from the manifest's ``rows_done``: pass the same full row tensor
    (longer, to extend). Settings must match the cache's (else :class:`CacheError` naming the field), and
    the already-cached rows must be the ones passed (checked by hash). Leftovers of a crashed write are
    removed first. A shard holds whole rows and at most ``shard_tokens`` vectors per site (more only when a
    single row is longer). Vectors are stored exactly as harvested, in row-major (row, pos) order, BOS
    dropped with ``drop_bos`` -- the order and values of :func:`~sae_lens_attn.activations.harvest_all`.

    Raises :class:`CacheWriteError` when the disk refuses a write (e.g. ENOSPC); the partial shard is
    removed and the manifest and the shards already committed are untouched, so the same call can be
    repeated once space is freed.
    """
    sites = list(sites)
    _check_arguments(model, rows, sites, shard_tokens, model_batch_rows)
    rows = rows.detach().cpu()
    cache_dir = ensure_dir(cache_dir)
    with _write_lock(cache_dir):
        manifest = _open_manifest(cache_dir, _new_manifest(model, sites, with_grad, drop_bos, int(rows.shape[1])),
                                  rows)
        writer = _ShardWriter(cache_dir, manifest, rows, shard_tokens)
        # The cache's site order (which may differ from the caller's) decides the order tensors are stored.
        sites = manifest.site_objects()
        for start in range(manifest.rows_done, rows.shape[0], model_batch_rows):
            chunk = rows[start : start + model_batch_rows]
            writer.add(start, harvest(model, chunk, sites, with_grad, drop_bos), sites, with_grad)
        writer.flush()
        return manifest


def _check_arguments(model, rows: torch.Tensor, sites: list[Site], shard_tokens: int,
                     model_batch_rows: int) -> None:
    if shard_tokens <= 0:
        raise InputError(f"shard_tokens must be positive, got {shard_tokens}")
    if model_batch_rows <= 0:
        raise InputError(f"model_batch_rows must be positive, got {model_batch_rows}")
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise InputError(f"rows must be a non-empty [rows, pos] token tensor, got shape {tuple(rows.shape)}")
    if rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise InputError(f"rows must hold integer token ids, got dtype {rows.dtype}")
    check_sites(model, sites)
    if len({s.label for s in sites}) != len(sites):
        raise InputError(f"duplicate sites in {[s.label for s in sites]}")


def _open_manifest(cache_dir: Path, want: Manifest, rows: torch.Tensor) -> Manifest:
    """The cache's manifest, checked against ``want`` and the rows passed, leftovers of a crashed write
    removed; a new cache gets ``want``, committed."""
    if not (cache_dir / MANIFEST_FILENAME).exists():
        _remove_leftovers(cache_dir, None)
        _commit_manifest(cache_dir, want, None)
        return want
    manifest = read_manifest(cache_dir)
    _check_compatible(manifest, want, cache_dir)
    _remove_leftovers(cache_dir, manifest)
    if rows.shape[0] < manifest.rows_done:
        raise CacheError(
            f"{cache_dir} already holds {manifest.rows_done} rows but only {rows.shape[0]} were passed: "
            "pass the same full row tensor the cache was written from"
        )
    for sh in manifest.shards:
        if _rows_sha256(rows[sh.row_start : sh.row_end]) != sh.rows_sha256:
            raise CacheError(
                f"rows {sh.row_start}..{sh.row_end} passed differ from those cached in {sh.file} of "
                f"{cache_dir}: pass the same row tensor the cache was written from"
            )
    return manifest


def _commit_manifest(cache_dir: Path, manifest: Manifest, shard: str | None) -> None:
    text = manifest.to_json()
    try:
        write_text(cache_dir / MANIFEST_FILENAME, text)
    except WriteError as err:
        raise _write_error(cache_dir, MANIFEST_FILENAME, err, manifest, shard) from err


def _write_error(
    cache_dir: Path, what: str, err: WriteError, manifest: Manifest | None, shard: str | None
) -> CacheWriteError:
    """``err`` told as a cache write: what is still intact, and that the same call continues the cache."""
    if manifest is not None and (cache_dir / MANIFEST_FILENAME).exists():
        n_shards = len(manifest.shards) - (1 if shard else 0)
        state = f"manifest.json still lists the {n_shards} complete shard(s) written before"
    else:
        state = "no manifest.json was written yet"
    return err.with_note(
        f"nothing already saved was damaged: the partial file was removed and {state}",
        what=f"{what} of the activation cache {cache_dir}", cls=CacheWriteError,
        fix=f"{err.fix}; then call write_cache again with the same rows to continue",
    )


class _ShardWriter:
    """Groups harvested rows into shards of whole rows and commits each one (shard file, then manifest)."""

    def __init__(self, cache_dir: Path, manifest: Manifest, rows: torch.Tensor, shard_tokens: int):
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.rows = rows
        self.shard_tokens = shard_tokens
        self.pieces: list[dict[str, torch.Tensor]] = []
        self.n = 0
        self.row_start = manifest.rows_done
        self.row_end = manifest.rows_done
        self.dtype = getattr(torch, manifest.dtype)

    def add(self, start: int, h, sites: Sequence[Site], with_grad: bool) -> None:
        """Queue the harvest ``h`` of rows ``start..``; commit a shard whenever the next row would overflow it."""
        mask = h.mask.cpu()
        chunk = self.rows[start : start + mask.shape[0]]
        keep = mask.reshape(-1)
        r_local, pos = mask.nonzero(as_tuple=True)
        flat = {
            "token_ids": chunk[mask].to(_INDEX_DTYPES["token_ids"]),
            "row": (r_local + start).to(_INDEX_DTYPES["row"]),
            "pos": pos.to(_INDEX_DTYPES["pos"]),
        }
        for s in sites:
            for kind, src in (("acts", h.acts), ("grads", h.grads if with_grad else None)):
                if src is None:
                    continue
                t = src[s]
                if t.dtype != self.dtype:
                    raise CacheError(
                        f"site {s.label}: harvested {kind} are {t.dtype} but the cache {self.cache_dir} stores "
                        f"{self.manifest.dtype}"
                    )
                flat[f"{s.label}.{kind}"] = t.reshape(-1, t.shape[-1]).cpu()[keep]
        counts = mask.sum(1).tolist()
        seg_from, offset = 0, 0  # vector offsets within this chunk
        for i, c in enumerate(counts):
            if self.n > 0 and self.n + c > self.shard_tokens:
                self.pieces.append({k: v[seg_from:offset] for k, v in flat.items()})
                self.flush_pending()
                seg_from = offset
            self.n += c
            offset += c
            self.row_end = start + i + 1
        self.pieces.append({k: v[seg_from:offset] for k, v in flat.items()})

    def flush(self) -> None:
        """Commit the last, possibly smaller, shard."""
        if self.row_end > self.row_start:
            self.flush_pending()

    def flush_pending(self) -> None:
        tensors = {k: torch.cat([p[k] for p in self.pieces]).contiguous() for k in self.pieces[0]}
        m = self.manifest
        index = len(m.shards)
        name = _shard_name(index)
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "shard": str(index),
            "row_start": str(self.row_start),
            "row_end": str(self.row_end),
            "n_tokens": str(self.n),
        }
        try:
            save_tensors(self.cache_dir / name, tensors, metadata=meta)
        except WriteError as err:
            raise _write_error(self.cache_dir, name, err, m, None) from err
        path = self.cache_dir / name
        info = ShardInfo(
            file=name,
            n_tokens=self.n,
            row_start=self.row_start,
            row_end=self.row_end,
            size=path.stat().st_size,
            sha256=_sha256_file(path),
            rows_sha256=_rows_sha256(self.rows[self.row_start : self.row_end]),
        )
        m.shards.append(info)
        m.rows_done, m.n_tokens = self.row_end, m.n_tokens + self.n
        try:
            _commit_manifest(self.cache_dir, m, name)
        except CacheWriteError:
            m.shards.pop()
            m.rows_done, m.n_tokens = self.row_start, m.n_tokens - self.n
            path.unlink(missing_ok=True)  # listed nowhere; the next write_cache would remove it anyway
            raise
        self.pieces, self.n, self.row_start = [], 0, self.row_end
