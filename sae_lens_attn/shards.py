"""Tokenize once, train many times: packed rows as memory-mapped ``.npy`` shards with a manifest.

``sae-lens-attn tokenize`` writes a folder::

    tokens.json          the manifest: tokenizer name and fingerprint, context size, start-token rule and
                         ids, row count, and each shard's file and row count (written last: a folder
                         without it is an interrupted write and is refused)
    rows-00000.npy ...   int32 (int64 for vocabularies past 2**31) arrays of shape [rows, context_size]

Any ``--dataset`` argument accepts the folder. Rows are read memory-mapped, a shard at a time, and only as
far as the run needs; under torchrun each rank takes its rows from the same read (``training/run.py``).
A folder made for another tokenizer (its fingerprint: a hash of the vocabulary), another context size or
another start-token rule is refused, naming what differs and the command that re-tokenizes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import AlreadyExistsError, InputError
from .files import ensure_dir, write_bytes, write_json
from .tokens import TokenPolicy

MANIFEST = "tokens.json"
FORMAT = "sae_lens_attn.token_shards"
VERSION = 1
#: Rows per shard file (32 MiB of int32 at a context of 128).
ROWS_PER_SHARD = 65536


class ShardMismatchError(InputError):
    """A token-shard folder was made for another tokenizer, context size or start-token rule."""


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token text -> id, sorted): equal for the same tokenizer wherever it was
    loaded from (a hub id, a local copy, a GGUF file), different when any id changes."""
    h = hashlib.sha256()
    for tok, tid in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{tid}\t{tok}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def framing(policy: TokenPolicy, n_ctx: int) -> dict:
    """What a row's framing depends on, as the manifest records it."""
    return {"context_size": int(n_ctx), "start_rule": policy.rule, "start_token": policy.start_token,
            "start": policy.start, "end": policy.end, "separator": policy.separator}


def is_shard_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / MANIFEST).exists() or any(p.glob("rows-*.npy")))


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        raise ShardMismatchError(f"{folder} holds token shards but no {MANIFEST}: the `sae-lens-attn tokenize` that "
                                 "wrote it did not finish; run it again into an empty folder")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardMismatchError(f"{path} is damaged ({err}); re-run `sae-lens-attn tokenize` into a new folder") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardMismatchError(f"{path} is not a version-{VERSION} token-shard manifest; re-run `sae-lens-attn tokenize`")
    return manifest


def check_manifest(manifest: dict, folder: Path, tokenizer, n_ctx: int, policy: TokenPolicy) -> None:
    """Refuse a folder whose rows were made for another tokenizer, context or framing."""
    fix = (f"re-tokenize with `sae-lens-attn tokenize --model <this model> --context-size {n_ctx} "
           f"--start-token {policy.start_token} --dataset <text> --out <new folder>`")
    if manifest["tokenizer"]["fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ShardMismatchError(
            f"{folder} was tokenized with another tokenizer ({manifest['tokenizer']['name']}, vocabulary fingerprint "
            f"{manifest['tokenizer']['fingerprint'][:12]}) than this model's ({tokenizer_fingerprint(tokenizer)[:12]}); {fix}")
    want = framing(policy, n_ctx)
    for key, value in want.items():
        if manifest.get(key) != value:
            raise ShardMismatchError(f"{folder} has {key} {manifest.get(key)!r} but this run needs {value!r}; {fix}")


def shard_row_blocks(folder: str | os.PathLike, tokenizer, n_ctx: int, policy: TokenPolicy) -> Iterator[np.ndarray]:
    """The folder's rows, a shard at a time (memory-mapped, copied to int64 as each is read)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_manifest(manifest, folder, tokenizer, n_ctx, policy)
    for shard in manifest["shards"]:
        arr = np.load(folder / shard["file"], mmap_mode="r")
        if arr.shape != (shard["rows"], n_ctx):
            raise ShardMismatchError(f"{folder / shard['file']} has shape {arr.shape}, the manifest says "
                                     f"({shard['rows']}, {n_ctx}); the folder is damaged: re-run `sae-lens-attn tokenize`")
        for lo in range(0, len(arr), 8192):
            yield np.asarray(arr[lo : lo + 8192], dtype=np.int64)


def _npy_bytes(rows: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


def write_shards(blocks: Iterator[np.ndarray], out: str | os.PathLike, tokenizer, tokenizer_name: str,
                 n_ctx: int, policy: TokenPolicy, max_rows: int | None = None, source: str = "",
                 rows_per_shard: int = ROWS_PER_SHARD) -> dict:
    """Write ``blocks`` (from :func:`~sae_lens_attn.data.text_row_blocks`) as shards, then the manifest."""
    out = ensure_dir(out)
    if (out / MANIFEST).exists() or any(out.glob("rows-*.npy")):
        raise AlreadyExistsError(f"{out} already holds token shards; pass an empty or new --out folder")
    dtype = np.int32 if len(tokenizer) < 2**31 else np.int64
    shards, pending, n_pending, total = [], [], 0, 0

    def flush() -> None:
        nonlocal pending, n_pending
        rows = np.concatenate(pending).astype(dtype)
        name = f"rows-{len(shards):05d}.npy"
        write_bytes(out / name, _npy_bytes(rows))
        shards.append({"file": name, "rows": int(len(rows))})
        pending, n_pending = [], 0

    for block in blocks:
        if max_rows is not None:
            block = block[: max_rows - total]
        pending.append(block)
        n_pending, total = n_pending + len(block), total + len(block)
        while n_pending >= rows_per_shard:
            joined = np.concatenate(pending)
            pending, n_pending = [joined[:rows_per_shard]], rows_per_shard
            rest = joined[rows_per_shard:]
            flush()
            if len(rest):
                pending, n_pending = [rest], len(rest)
        if max_rows is not None and total >= max_rows:
            break
    if n_pending:
        flush()
    manifest = {"format": FORMAT, "version": VERSION, "rows": total, "dtype": np.dtype(dtype).name,
                "tokenizer": {"name": tokenizer_name, "fingerprint": tokenizer_fingerprint(tokenizer)},
                **framing(policy, n_ctx), "source": source, "shards": shards}
    write_json(out / MANIFEST, manifest, indent=2)
    return manifest
