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
than the 64k-token buffer of :func:`sae_lens_attn.stream.activation_batches`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Int
from safetensors import safe_open

from .activations import SiteBatch

# Re-exported: ``from sae_lens_attn.cache import ...`` keeps working for the writer and the manifest too.
from .cache_manifest import (  # noqa: F401
    _INDEX_DTYPES,
    _INDEX_KEYS,
    _ST_DTYPE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILENAME,
    CacheError,
    CacheWriteError,
    Manifest,
    ShardInfo,
    SiteInfo,
    _sha256_file,
    _tensor_names,
    read_manifest,
)
from .cache_write import LOCK_FILENAME, write_cache  # noqa: F401
from .errors import InputError
from .sites import Site


@contextmanager
def _open_shard(path: Path):
    """``safe_open`` of a shard, its failures (deleted, truncated, not safetensors) as a CacheError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except FileNotFoundError as err:
        raise CacheError(f"{path} is missing (deleted after the cache was opened?)") from err
    except Exception as err:  # safetensors raises its own error type for unreadable headers and data
        raise CacheError(f"{path}: unreadable safetensors file ({err}); it is truncated or corrupted") from err


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
        with _open_shard(path) as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
            shapes = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in keys & set(expected)}
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

    def _read(self, shards: Sequence[ShardInfo], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tensors ``names`` of ``shards``, concatenated in that order (memory-mapped reads)."""
        parts = []
        for sh in shards:
            with _open_shard(self.cache_dir / sh.file) as f:
                parts.append({k: f.get_tensor(k) for k in names})
        return self._cat(parts, names)

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
            t = self._read([sh], names)
            yield CachedShard(self._to_batches(t, "cpu"), TokenIndex(*(t[k] for k in _INDEX_KEYS)), sh)

    def load_all(self) -> dict[Site, SiteBatch]:
        """Every vector in memory, in row-major (row, pos) order -- that of ``harvest_all`` on the same rows."""
        names = self._names()
        return self._to_batches(self._read(self.manifest.shards, names), "cpu")

    def load_index(self) -> TokenIndex:
        """(token id, row, pos) of every vector, in the order of :meth:`load_all`."""
        t = self._read(self.manifest.shards, _INDEX_KEYS)
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
            raise InputError(f"batch_size must be positive, got {batch_size}")
        if window_shards <= 0:
            raise InputError(f"window_shards must be positive, got {window_shards}")
        if self.n_tokens < batch_size:
            raise InputError(
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
                window = self._read([shards[i] for i in order[w : w + window_shards]], names)
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
