"""On-disk activation cache: harvest once, train and analyse many times without running the model.

Layout of a cache directory::

    manifest.json            settings + the list of committed shards (written atomically)
    shard_00000.safetensors  per site "{label}.acts" [n, d_in] (and "{label}.grads"), plus "token_ids",
    shard_00001.safetensors  "row" and "pos" [n] so every vector maps back to its text
    ...

Why it is built this way:

* **A shard is committed only when it is whole.** Each shard is written to a temp name in the cache
  directory, fsync'ed and renamed (``os.replace`` is atomic on POSIX); the directory is fsync'ed so the rename
  is durable, and only then is the manifest (itself atomic) rewritten to list it. A crash at any moment
  leaves the manifest describing complete shards only; leftovers (temp files, a renamed shard the manifest
  never listed) are removed by the next :func:`write_cache`.
* **Shards cover whole token rows**, rows ``[row_start, row_end)`` of the caller's row tensor, so the
  manifest's ``rows_done`` says exactly where to continue: extending a cache and resuming after a crash are
  the same operation (call :func:`write_cache` again with the same full row tensor). A sha256 of each
  shard's token rows is kept so a *different* row tensor is refused rather than silently mixed in.
* **Nothing damaged is ever used.** :class:`CachedActivations` checks every shard's size (always) and, with
  ``verify=True``, its sha256 and tensor names/shapes/dtypes against the manifest; a missing, truncated or
  mismatched shard raises :class:`CacheError` naming the file and what is wrong.
* **Reads are memory-mapped** (``safetensors.safe_open``): only the shards being served are paged in.

Shuffle scheme of :meth:`CachedActivations.batches` (bounded memory): each epoch the shard order is
permuted; shards are then taken ``window_shards`` at a time, the vectors of the window are permuted as a
whole, and the epoch's stream is the concatenation of these window permutations. Batches are consecutive
``batch_size`` slices of the stream of all epochs, so every batch is full (a slice may straddle a window or
epoch boundary: the remainder is carried over, not dropped), and every vector appears exactly once in each
epoch's stretch of ``n_tokens`` vectors. Memory is about twice one window of shards. Because a shard holds
``shard_tokens`` vectors of whole rows, a window of 4 default shards mixes ~256k tokens from many rows, more
than the 64k-token buffer of :func:`sae_lens_attn.activations.activation_batches`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Int
from safetensors import safe_open
from safetensors.torch import save_file

from .activations import SiteBatch, check_sites, harvest
from .files import atomic_write
from .models import model_name
from .sites import Site

FORMAT = "sae_lens_attn.activation_cache"
FORMAT_VERSION = 1
MANIFEST_FILENAME = "manifest.json"
LOCK_FILENAME = ".write.lock"
_SHARD_RE = re.compile(r"^shard_(\d{5,})\.safetensors$")
_TMP_RE = re.compile(r"^\.(shard_\d{5,}\.safetensors|manifest\.json)\..*\.tmp$")
_INDEX_KEYS = ("token_ids", "row", "pos")
_INDEX_DTYPES = {"token_ids": torch.int32, "row": torch.int64, "pos": torch.int32}
# safetensors' header spelling of torch dtypes (what ``get_slice(...).get_dtype()`` returns).
_ST_DTYPE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
}


class CacheError(ValueError):
    """A cache directory that cannot be used as asked: the message names the file/field and what is wrong."""


class CacheWriteError(CacheError, OSError):
    """Writing a shard or the manifest failed (e.g. ENOSPC); what was already committed is intact."""


# --------------------------------------------------------------------------------------------- manifest


@dataclass
class SiteInfo:
    label: str
    hook_name: str
    d_in: int

    @property
    def site(self) -> Site:
        return Site.parse(self.label)


@dataclass
class ShardInfo:
    file: str
    """File name inside the cache directory."""
    n_tokens: int
    """Vectors per site in this shard."""
    row_start: int
    """First token row (index into the caller's row tensor) this shard covers."""
    row_end: int
    """One past the last token row it covers."""
    size: int
    """Bytes on disk: a cheap truncation check done on every open."""
    sha256: str
    """Of the whole file: checked when opened with ``verify=True``."""
    rows_sha256: str
    """Of the token rows ``[row_start, row_end)`` as int64: refuses extending with a different row tensor."""


@dataclass
class Manifest:
    """Everything needed to trust and read a cache, and to continue writing it."""

    model_name: str
    model_cfg: dict[str, int]
    """n_layers, n_heads, d_head, d_model of the model that produced the activations."""
    sites: list[SiteInfo]
    dtype: str
    """Activation dtype, e.g. ``"float32"``."""
    with_grad: bool
    drop_bos: bool
    context_size: int
    """Tokens per row (the row tensor's second dimension)."""
    rows_done: int = 0
    """Leading token rows of the caller's row tensor that are committed to shards."""
    n_tokens: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def site_objects(self) -> list[Site]:
        return [s.site for s in self.sites]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: Path) -> Manifest:
        if d.get("format") != FORMAT:
            raise CacheError(f"{where}: not an activation-cache manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{where}: format_version {d.get('format_version')!r} is not supported (this code reads "
                f"{FORMAT_VERSION}); rebuild the cache with this version of sae_lens_attn"
            )
        try:
            d = dict(d)
            d["sites"] = [SiteInfo(**s) for s in d["sites"]]
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            return cls(**d)
        except (KeyError, TypeError) as err:
            raise CacheError(f"{where}: malformed manifest ({err})") from err


def read_manifest(cache_dir: str | os.PathLike) -> Manifest:
    """The manifest of ``cache_dir``; :class:`CacheError` if it is missing or unreadable."""
    path = Path(cache_dir) / MANIFEST_FILENAME
    if not path.exists():
        raise CacheError(
            f"{path} is missing: {cache_dir} is not an activation cache (write one with write_cache)"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CacheError(f"{path}: unreadable manifest ({err})") from err
    return Manifest.from_dict(raw, path)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_dtype(model) -> torch.dtype:
    dt = getattr(model.cfg, "dtype", None)
    return dt if isinstance(dt, torch.dtype) else next(iter(model.parameters())).dtype


def _new_manifest(
    model, sites: Sequence[Site], with_grad: bool, drop_bos: bool, context_size: int
) -> Manifest:
    cfg = model.cfg
    return Manifest(
        model_name=model_name(model),
        model_cfg={k: int(getattr(cfg, k)) for k in ("n_layers", "n_heads", "d_head", "d_model")},
        sites=[SiteInfo(s.label, s.hook_name, s.d_in(cfg)) for s in sites],
        dtype=_dtype_name(_model_dtype(model)),
        with_grad=with_grad,
        drop_bos=drop_bos,
        context_size=context_size,
    )


def _check_compatible(have: Manifest, want: Manifest, cache_dir: Path) -> None:
    """Refuse to append data produced under other settings: a cache must be one homogeneous data set."""

    def sites_key(m: Manifest) -> list[tuple[str, str, int]]:
        return sorted((s.label, s.hook_name, s.d_in) for s in m.sites)

    diffs = []
    for name, a, b in (
        ("model_name", have.model_name, want.model_name),
        ("model_cfg", have.model_cfg, want.model_cfg),
        ("sites", [s[0] for s in sites_key(have)], [s[0] for s in sites_key(want)]),
        ("site widths", sites_key(have), sites_key(want)),
        ("with_grad", have.with_grad, want.with_grad),
        ("dtype", have.dtype, want.dtype),
        ("drop_bos", have.drop_bos, want.drop_bos),
        ("context_size", have.context_size, want.context_size),
    ):
        if a != b:
            diffs.append(f"{name}: cache has {a!r}, this call has {b!r}")
    if diffs:
        raise CacheError(
            f"{cache_dir} holds a cache written with other settings, so it cannot be extended: "
            + "; ".join(diffs)
            + ". Use another cache_dir, or call write_cache with the cache's settings"
        )


# ------------------------------------------------------------------------------------------- file I/O


def _sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _rows_sha256(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


@contextmanager
def _write_lock(cache_dir: Path):
    """One writer per cache: a second one would interleave shards and delete the first one's temp files."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the single-writer rule is the caller's
        yield
        return
    fh = open(cache_dir / LOCK_FILENAME, "a")
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


# ---------------------------------------------------------------------------------------------- writing


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _tensor_names(sites: Sequence[Site] | Sequence[SiteInfo], with_grad: bool) -> list[str]:
    names = []
    for s in sites:
        names.append(f"{s.label}.acts")
        if with_grad:
            names.append(f"{s.label}.grads")
    return names


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
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if model_batch_rows <= 0:
        raise ValueError(f"model_batch_rows must be positive, got {model_batch_rows}")
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"rows must be a non-empty [rows, pos] token tensor, got shape {tuple(rows.shape)}")
    if rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise ValueError(f"rows must hold integer token ids, got dtype {rows.dtype}")
    sites = list(sites)
    check_sites(model, sites)
    if len({s.label for s in sites}) != len(sites):
        raise ValueError(f"duplicate sites in {[s.label for s in sites]}")
    rows = rows.detach().cpu()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = cache_dir / MANIFEST_FILENAME

    with _write_lock(cache_dir):
        want = _new_manifest(model, sites, with_grad, drop_bos, int(rows.shape[1]))
        if manifest_path.exists():
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
        else:
            _remove_leftovers(cache_dir, None)
            manifest = want
            _commit_manifest(cache_dir, manifest, None)
        writer = _ShardWriter(cache_dir, manifest, rows, shard_tokens)
        # The cache's site order (which may differ from the caller's) decides the order tensors are stored.
        sites = manifest.site_objects()
        for start in range(manifest.rows_done, rows.shape[0], model_batch_rows):
            chunk = rows[start : start + model_batch_rows]
            writer.add(start, harvest(model, chunk, sites, with_grad, drop_bos), sites, with_grad)
        writer.flush()
        return manifest


def _commit_manifest(cache_dir: Path, manifest: Manifest, shard: str | None) -> None:
    text = manifest.to_json()
    try:
        atomic_write(cache_dir / MANIFEST_FILENAME, lambda tmp: Path(tmp).write_text(text))
    except OSError as err:
        raise _write_error(cache_dir, MANIFEST_FILENAME, err, manifest, shard) from err


def _write_error(
    cache_dir: Path, what: str, err: OSError, manifest: Manifest, shard: str | None
) -> CacheWriteError:
    n_shards = len(manifest.shards) - (1 if shard else 0)
    why = (
        "no space left on device (ENOSPC)"
        if err.errno == errno.ENOSPC
        else f"{err.__class__.__name__}: {err}"
    )
    if (cache_dir / MANIFEST_FILENAME).exists():
        state = f"manifest.json still lists the {n_shards} complete shard(s) written before"
    else:
        state = "no manifest.json was written yet"
    return CacheWriteError(
        f"writing {what} to cache {cache_dir} failed: {why}. Nothing already saved was damaged: the partial "
        f"file was removed and {state}. Free space (or fix the error) and call write_cache again with the "
        "same rows to continue"
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
            atomic_write(self.cache_dir / name, lambda tmp: save_file(tensors, tmp, metadata=meta))
        except OSError as err:
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


# ---------------------------------------------------------------------------------------------- reading


class TokenIndex(NamedTuple):
    """Where each cached vector came from, in the same order as the vectors."""

    token_ids: Int[torch.Tensor, " n"]
    row: Int[torch.Tensor, " n"]
    """Index into the row tensor passed to :func:`write_cache`."""
    pos: Int[torch.Tensor, " n"]


class IndexedBatch(NamedTuple):
    data: dict[Site, SiteBatch]
    index: TokenIndex


class CachedShard(NamedTuple):
    data: dict[Site, SiteBatch]
    index: TokenIndex
    info: ShardInfo


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host tensor to ``device``; to a GPU through pinned memory, so the copy is asynchronous (the host side
    of the next shard is read while this one is still on its way)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class CachedActivations:
    """A cache written by :func:`write_cache`, checked on open and read memory-mapped.

    ``sites``: read only these (Sites or labels; default all). ``verify``: also check each shard's sha256
    and tensor names, shapes and dtypes (the size is always checked); costs one read of every shard, which
    is the price of never training on a silently corrupted file.
    """

    def __init__(
        self, cache_dir: str | os.PathLike, sites: Sequence[Site | str] | None = None, verify: bool = True
    ):
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        m = self.manifest
        by_label = {s.label: s for s in m.sites}
        if sites is None:
            chosen = list(m.sites)
        else:
            chosen = []
            for s in sites:
                label = s.label if isinstance(s, Site) else Site.parse(s).label
                if label not in by_label:
                    raise CacheError(
                        f"site {label} is not in the cache {self.cache_dir} (it has {sorted(by_label)})"
                    )
                chosen.append(by_label[label])
        if not chosen:
            raise CacheError(f"no sites selected from the cache {self.cache_dir}")
        self._sites = [s.site for s in chosen]
        self._check_manifest()
        for sh in m.shards:
            self._check_shard(sh, verify)

    # --- checks

    def _check_manifest(self) -> None:
        m, where = self.manifest, self.cache_dir / MANIFEST_FILENAME
        expect = 0
        for sh in m.shards:
            if sh.row_start != expect or sh.row_end < sh.row_start:
                raise CacheError(
                    f"{where}: {sh.file} covers rows {sh.row_start}..{sh.row_end}, expected to start at {expect}"
                )
            expect = sh.row_end
        if expect != m.rows_done:
            raise CacheError(f"{where}: rows_done is {m.rows_done} but the shards cover rows 0..{expect}")
        if sum(sh.n_tokens for sh in m.shards) != m.n_tokens:
            raise CacheError(
                f"{where}: n_tokens is {m.n_tokens} but the shards hold {sum(sh.n_tokens for sh in m.shards)}"
            )

    def _check_shard(self, sh: ShardInfo, verify: bool) -> None:
        path = self.cache_dir / sh.file
        if not path.exists():
            raise CacheError(f"{path} is missing (listed in the manifest with {sh.n_tokens} tokens)")
        size = path.stat().st_size
        if size != sh.size:
            what = "truncated" if size < sh.size else "the wrong size"
            raise CacheError(f"{path} is {what}: {size} bytes on disk, the manifest records {sh.size}")
        if not verify:
            return
        digest = _sha256_file(path)
        if digest != sh.sha256:
            raise CacheError(
                f"{path} is corrupted: sha256 {digest[:16]}... differs from the manifest's {sh.sha256[:16]}..."
            )
        m = self.manifest
        dtype = _ST_DTYPE.get(getattr(torch, m.dtype))
        expected: dict[str, tuple[list[int], str | None]] = {
            k: ([sh.n_tokens], _ST_DTYPE[_INDEX_DTYPES[k]]) for k in _INDEX_KEYS
        }
        for s in m.sites:
            for kind in ("acts", "grads") if m.with_grad else ("acts",):
                expected[f"{s.label}.{kind}"] = ([sh.n_tokens, s.d_in], dtype)
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                meta = f.metadata() or {}
                shapes = {
                    k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                    for k in keys & set(expected)
                }
        except Exception as err:  # safetensors raises its own error type for unreadable headers
            raise CacheError(f"{path}: unreadable safetensors file ({err})") from err
        missing = sorted(set(expected) - keys)
        if missing:
            raise CacheError(f"{path} lacks tensors {missing} that the manifest's sites need")
        for k, (shape, dt) in expected.items():
            got_shape, got_dt = shapes[k]
            if got_shape != shape or (dt is not None and got_dt != dt):
                raise CacheError(f"{path}: tensor {k} is {got_dt}{got_shape}, the manifest needs {dt}{shape}")
        for k, v in (("row_start", sh.row_start), ("row_end", sh.row_end), ("n_tokens", sh.n_tokens)):
            if meta.get(k) != str(v):
                raise CacheError(
                    f"{path}: header says {k}={meta.get(k)!r}, the manifest says {v} (shard from another cache?)"
                )

    # --- properties

    @property
    def n_tokens(self) -> int:
        """Vectors per site in the cache."""
        return self.manifest.n_tokens

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def sites(self) -> list[Site]:
        """The sites this reader serves, in selection order."""
        return list(self._sites)

    @property
    def with_grad(self) -> bool:
        return self.manifest.with_grad

    @property
    def n_shards(self) -> int:
        return len(self.manifest.shards)

    # --- reading

    def _names(self) -> list[str]:
        return _tensor_names(self._sites, self.with_grad)

    def _read(self, sh: ShardInfo, names: Sequence[str]) -> dict[str, torch.Tensor]:
        path = self.cache_dir / sh.file
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in names}
        except FileNotFoundError as err:
            raise CacheError(f"{path} is missing (deleted after the cache was opened?)") from err
        except Exception as err:
            raise CacheError(
                f"{path}: unreadable safetensors file ({err}); it is truncated or corrupted"
            ) from err

    def _to_batches(self, t: dict[str, torch.Tensor], device) -> dict[Site, SiteBatch]:
        return {
            s: SiteBatch(
                _to_device(t[f"{s.label}.acts"], device),
                _to_device(t[f"{s.label}.grads"], device) if self.with_grad else None,
            )
            for s in self._sites
        }

    def iter_shards(self) -> Iterator[CachedShard]:
        """Each shard in cache order (rows ascending), with the (token, row, pos) of every vector."""
        names = self._names() + list(_INDEX_KEYS)
        for sh in self.manifest.shards:
            t = self._read(sh, names)
            yield CachedShard(self._to_batches(t, "cpu"), TokenIndex(*(t[k] for k in _INDEX_KEYS)), sh)

    def load_all(self) -> dict[Site, SiteBatch]:
        """Every vector in memory, in row-major (row, pos) order -- that of ``harvest_all`` on the same rows."""
        names = self._names()
        parts = [self._read(sh, names) for sh in self.manifest.shards]
        return self._to_batches(self._cat(parts, names), "cpu")

    def load_index(self) -> TokenIndex:
        """(token id, row, pos) of every vector, in the order of :meth:`load_all`."""
        parts = [self._read(sh, _INDEX_KEYS) for sh in self.manifest.shards]
        t = self._cat(parts, _INDEX_KEYS)
        return TokenIndex(*(t[k] for k in _INDEX_KEYS))

    def _cat(self, parts: list[dict[str, torch.Tensor]], names: Sequence[str]) -> dict[str, torch.Tensor]:
        if parts:
            return {k: torch.cat([p[k] for p in parts]) for k in names}
        widths = {f"{s.label}.{kind}": s.d_in for s in self.manifest.sites for kind in ("acts", "grads")}
        dtype = getattr(torch, self.manifest.dtype)
        return {
            k: torch.empty(0, widths[k], dtype=dtype)
            if k in widths
            else torch.empty(0, dtype=_INDEX_DTYPES[k])
            for k in names
        }

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        epochs: int | None = None,
        device: str | torch.device = "cpu",
        *,
        window_shards: int = 4,
        drop_last: bool = False,
    ) -> Iterator[dict[Site, SiteBatch]]:
        """Shuffled ``[batch_size, d_in]`` batches, the same tokens in the same order at every site.

        Scheme (see the module docstring): per epoch, a random shard order; ``window_shards`` shards at a
        time are loaded and their vectors permuted together; batches are consecutive slices of the stream,
        a remainder carried into the next window/epoch. Each epoch's stretch of ``n_tokens`` vectors holds
        every vector exactly once. ``epochs=None`` runs forever; with a finite count the last batch may be
        short, unless ``drop_last``. Memory: about two windows of shards.
        """
        names = self._names()
        for t in self._stream(names, batch_size, seed, epochs, window_shards, drop_last):
            yield self._to_batches(t, device)

    def indexed_batches(
        self,
        batch_size: int,
        seed: int = 0,
        epochs: int | None = None,
        device: str | torch.device = "cpu",
        *,
        window_shards: int = 4,
        drop_last: bool = False,
    ) -> Iterator[IndexedBatch]:
        """:meth:`batches` (the same batches for the same arguments) with each vector's (token, row, pos).

        For analysis that maps a batch back to text; the index stays on the CPU.
        """
        names = self._names() + list(_INDEX_KEYS)
        for t in self._stream(names, batch_size, seed, epochs, window_shards, drop_last):
            yield IndexedBatch(self._to_batches(t, device), TokenIndex(*(t[k] for k in _INDEX_KEYS)))

    def _stream(
        self,
        names: list[str],
        batch_size: int,
        seed: int,
        epochs: int | None,
        window_shards: int,
        drop_last: bool,
    ) -> Iterator[dict[str, torch.Tensor]]:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if window_shards <= 0:
            raise ValueError(f"window_shards must be positive, got {window_shards}")
        if self.n_tokens < batch_size:
            raise ValueError(
                f"the cache holds {self.n_tokens} vectors, fewer than one batch of {batch_size}; cache more rows"
            )
        shards = self.manifest.shards
        # The generator only draws shard orders and window permutations, never depends on ``names``, so
        # batches() and indexed_batches() give the same stream for the same seed.
        gen = torch.Generator().manual_seed(seed)
        carry: dict[str, torch.Tensor] | None = None
        epoch = 0
        while epochs is None or epoch < epochs:
            order = torch.randperm(len(shards), generator=gen).tolist()
            for w in range(0, len(order), window_shards):
                window = self._cat(
                    [self._read(shards[i], names) for i in order[w : w + window_shards]], names
                )
                perm = torch.randperm(window[names[0]].shape[0], generator=gen)
                stream = {k: v[perm] for k, v in window.items()}
                del window
                if carry is not None:
                    stream = {k: torch.cat([carry[k], v]) for k, v in stream.items()}
                n = stream[names[0]].shape[0]
                n_full = n // batch_size
                for b in range(n_full):
                    sl = slice(b * batch_size, (b + 1) * batch_size)
                    yield {k: v[sl] for k, v in stream.items()}
                carry = {k: v[n_full * batch_size :] for k, v in stream.items()}
            epoch += 1
        if carry is not None and carry[names[0]].shape[0] > 0 and not drop_last:
            yield carry
