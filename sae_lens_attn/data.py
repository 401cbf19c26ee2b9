"""Text -> packed token rows of ``n_ctx`` tokens, framed by the model's tokenization policy.

Rows follow :mod:`sae_lens_attn.tokens`: ``[BOS] body`` for causal LMs (EOS standing in where the tokenizer
has no BOS), ``[CLS] body [SEP]`` for encoders, the bare body where the tokenizer has neither. Documents are
joined with the policy's separator (BOS, or SEP for encoders) before the stream is cut into bodies.

Sources (read lazily by :mod:`sae_lens_attn.texts`): a local text file, a ``.jsonl`` file (a ``text``
field per line), a folder of those, a Hugging Face ``datasets`` directory saved with ``save_to_disk``, a
hub dataset id (streamed), token arrays already made (``.npy`` / ``.pt`` / ``.safetensors``), or a folder of
token shards written by ``sae-lens-attn tokenize`` (:mod:`sae_lens_attn.shards`).

Packing is linear in the tokens: each batch of pieces is tokenized in one call (the fast tokenizer spreads
it over its threads), its ids are appended to a carry of fewer than one row's tokens, and whole rows are
cut from the front with one reshape; nothing re-slices a growing buffer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int

from .errors import InputError
from .texts import (  # noqa: F401  (re-exported: the data API's names)
    MAX_UNDECODABLE_SHARE,
    TEXT_SUFFIXES,
    EmptyDatasetError,
    NotTextError,
    Piece,
    check_text_source,
    iter_pieces,
    iter_texts,
    read_text_file,
)
from .tokens import TokenPolicy, causal_policy

TOKEN_SUFFIXES = (".npy", ".pt", ".safetensors")

def load_token_array(path: str | os.PathLike) -> torch.Tensor:
    """Token ids saved as .npy / .pt / .safetensors (key ``tokens``): 1-D stream or 2-D rows."""
    p = Path(path)
    if p.suffix == ".npy":
        arr = torch.from_numpy(np.load(p))
    elif p.suffix == ".pt":
        try:
            arr = torch.load(p, weights_only=True)
        except Exception as err:  # zipfile/pickle errors
            from .weights_only import weights_only_refusal

            raise InputError(weights_only_refusal(p, err) or f"{p}: unreadable token array ({type(err).__name__}); "
                             "the file is truncated or corrupted") from err
        if not isinstance(arr, torch.Tensor):
            raise InputError(f"{p}: expected a tensor of token ids, got {type(arr).__name__}")
    else:
        from safetensors.torch import load_file

        arr = load_file(str(p))["tokens"]
    if arr.dtype.is_floating_point:
        raise InputError(f"{p}: token arrays must hold integers, got {arr.dtype}")
    return arr.long()


def as_policy(start: TokenPolicy | int | None) -> TokenPolicy:
    """A :class:`TokenPolicy`; an int (or None) is the legacy BOS id, as start token and separator."""
    return start if isinstance(start, TokenPolicy) else causal_policy(start)


#: Characters of text tokenized per tokenizer call (a batch of pieces).
BATCH_CHARS = 1 << 20
#: Pieces per tokenizer call at most.
BATCH_PIECES = 256


def _as_pieces(texts: Iterable[str] | Iterable[Piece]) -> Iterator[Piece]:
    for t in texts:
        if isinstance(t, Piece):
            yield t
        elif t:
            yield Piece(t, True)


def _piece_batches(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    chars = 0
    for piece in pieces:
        if not piece.text and not piece.last:
            continue
        batch.append(piece)
        chars += len(piece.text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_PIECES:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _stream_ids(batch: list[Piece], tokenizer, sep: np.ndarray) -> np.ndarray:
    """The batch's token ids as one int64 stream, the separator after each document's last piece."""
    texts = [p.text for p in batch]
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    parts = []
    for piece, one in zip(batch, ids, strict=True):
        parts.append(np.asarray(one, dtype=np.int64))
        if piece.last and sep.size:
            parts.append(sep)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _frame(bodies: np.ndarray, policy: TokenPolicy) -> np.ndarray:
    """``[start] body [end]`` on every row of ``bodies`` ([rows, body])."""
    cols = []
    if policy.start is not None:
        cols.append(np.full((bodies.shape[0], 1), policy.start, dtype=np.int64))
    cols.append(bodies)
    if policy.end is not None:
        cols.append(np.full((bodies.shape[0], 1), policy.end, dtype=np.int64))
    return np.concatenate(cols, axis=1) if len(cols) > 1 else bodies


def iter_row_blocks(
    texts: Iterable[str] | Iterable[Piece], tokenizer, n_ctx: int, policy: TokenPolicy | int | None
) -> Iterator[np.ndarray]:
    """Packed rows as int64 ``[rows, n_ctx]`` blocks, one per tokenizer call that completes a row.

    Documents (or :class:`Piece` s of them) are joined with the policy's separator (the usual packing of
    GPT-2 and Pythia), then cut into bodies of ``n_ctx`` minus the structural tokens, each framed by the
    policy. Time and memory are linear in the tokens: the carry between calls is shorter than one body.
    """
    policy = as_policy(policy)
    body = n_ctx - policy.n_structural
    if body <= 0:
        raise InputError(f"n_ctx must leave room for text after the {policy.n_structural} structural token(s), got {n_ctx}")
    sep = np.asarray([policy.separator] if policy.separator is not None else [], dtype=np.int64)
    carry = np.empty(0, dtype=np.int64)
    for batch in _piece_batches(_as_pieces(texts)):
        stream = np.concatenate([carry, _stream_ids(batch, tokenizer, sep)])
        n_rows = len(stream) // body
        carry = stream[n_rows * body :].copy()
        if n_rows:
            yield _frame(stream[: n_rows * body].reshape(n_rows, body), policy)


def iter_token_rows(
    texts: Iterable[str] | Iterable[Piece], tokenizer, n_ctx: int, policy: TokenPolicy | int | None
) -> Iterator[torch.Tensor]:
    """The rows of :func:`iter_row_blocks` one at a time (``[n_ctx]`` int64 tensors)."""
    for block in iter_row_blocks(texts, tokenizer, n_ctx, policy):
        yield from torch.from_numpy(block)


def text_row_blocks(
    source: str | os.PathLike, tokenizer, n_ctx: int, policy: TokenPolicy | int | None, text_field: str = "text",
    split: str = "train", encoding: str = "utf-8",
) -> Iterator[np.ndarray]:
    """A source's packed rows as int64 ``[rows, n_ctx]`` blocks, read lazily: text (any source
    :func:`~sae_lens_attn.texts.iter_pieces` reads), a token array, or a token-shard folder (checked against
    ``tokenizer``, ``n_ctx`` and ``policy``)."""
    from .shards import is_shard_folder, shard_row_blocks

    p = Path(source).expanduser()
    if p.is_dir() and is_shard_folder(p):
        yield from shard_row_blocks(p, tokenizer, n_ctx, as_policy(policy))
    elif p.is_file() and p.suffix in TOKEN_SUFFIXES:
        arr = load_token_array(p)
        if arr.ndim == 1:
            rows = list(iter_token_rows_from_ids(arr, n_ctx, policy))
            yield torch.stack(rows).numpy() if rows else np.empty((0, n_ctx), dtype=np.int64)
        else:
            yield arr.numpy()
    else:
        yield from iter_row_blocks(iter_pieces(source, text_field, split, encoding), tokenizer, n_ctx, policy)


def token_rows(
    source: str | os.PathLike,
    tokenizer,
    n_ctx: int,
    bos_id: TokenPolicy | int | None,
    max_rows: int | None = None,
    text_field: str = "text",
    split: str = "train",
    encoding: str = "utf-8",
) -> Int[torch.Tensor, "rows n_ctx"]:
    """The first ``max_rows`` rows of a source (all when None), as one tensor. Only as much of the source
    is read and tokenized as those rows need. Raises on an empty source, and on a local file that is not
    text in ``encoding``.

    ``bos_id``: the model's :class:`TokenPolicy` (``token_policy(model)``), or a BOS id (legacy)."""
    blocks, have = [], 0
    for block in text_row_blocks(source, tokenizer, n_ctx, bos_id, text_field, split, encoding):
        blocks.append(block if max_rows is None else block[: max_rows - have])
        have += len(blocks[-1])
        if max_rows is not None and have >= max_rows:
            break
    out = torch.from_numpy(np.concatenate(blocks)) if blocks else torch.empty(0, n_ctx, dtype=torch.long)
    if out.shape[0] == 0:
        raise EmptyDatasetError(
            f"dataset {source} gave no rows of {n_ctx} tokens: it is empty or shorter than one row; "
            "pass more text or a smaller context size"
        )
    return out.long()


def iter_token_rows_from_ids(ids: torch.Tensor, n_ctx: int, policy: TokenPolicy | int | None) -> Iterator[torch.Tensor]:
    """Rows from a 1-D token stream, framed by ``policy`` (no separators added: the stream has its own)."""
    policy = as_policy(policy)
    body = n_ctx - policy.n_structural
    for start in range(0, len(ids) - body + 1, body):
        yield torch.tensor(policy.wrap(ids[start : start + body].tolist()), dtype=torch.long)
