"""Documents from a data source, read lazily and cut into bounded pieces before tokenization.

A run reads only as much text as it needs: files are read in ``BLOCK_BYTES`` blocks through an incremental
decoder, jsonl files line by line, hub datasets with ``streaming=True``. Long documents are cut into
pieces of about ``PIECE_CHARS`` characters so no tokenizer call sees a 100 MB line, and so a batch of
pieces spreads over the fast tokenizer's threads.

Where a piece is cut: just before a single space or newline that sits between two non-space characters
(``"word\\nWord"`` or ``"word word"``). Byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2, Qwen, the
embedded model) split their input there anyway (their pre-tokenizer regex starts a new word at that
space), so the token ids of a document are the same whole or in pieces (``tests/test_texts.py`` checks
it). A tokenizer that adds a prefix space to every call (SentencePiece's "dummy prefix") may tokenize
the first word of a piece differently; one token per ``PIECE_CHARS`` characters at most. Text with no
such space in a whole piece (minified data) is cut at the limit.
"""

from __future__ import annotations

import codecs
import json
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from .errors import InputError, MissingExtraError, MissingFileError, UnavailableError

#: Characters per tokenizer input (documents longer than this are cut; see the module docstring).
PIECE_CHARS = 1 << 16
#: Bytes read from a file at a time.
BLOCK_BYTES = 1 << 20
#: Bytes of each file checked before any work (NUL bytes, undecodable share): binary files are named early.
SNIFF_BYTES = 1 << 16
TEXT_SUFFIXES = (".txt", ".md", ".rst")
#: A text file with a larger share of bytes that do not decode is refused as not text (in that encoding).
MAX_UNDECODABLE_SHARE = 0.01
_WIDE = ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be")  # codecs whose text has NULs


class EmptyDatasetError(InputError):
    """The data source held no text (or too few tokens for one row)."""


class NotTextError(InputError):
    """A file read as text is not text in the given encoding (binary, or another encoding), or a record's
    text field is not a string."""


class Piece(NamedTuple):
    """A bounded stretch of one document."""

    text: str
    last: bool
    """True on the document's last piece (the packer adds the separator after it)."""


_undecodable = threading.local()


def _count_undecodable(err: UnicodeDecodeError) -> tuple[str, int]:
    _undecodable.n += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("sae_lens_attn.count", _count_undecodable)


# ----------------------------------------------------------------------------------------------- cutting


def cut_point(text: str, limit: int) -> int:
    """Where to end the first piece of ``text`` (``len(text) > limit``): the last index ``i <= limit`` with
    ``text[i]`` a space or newline between two non-space characters, searched back to ``limit // 2``; else
    ``limit``."""
    lo = limit // 2
    for sep in ("\n", " "):
        i = text.rfind(sep, lo, limit + 1)
        while i > lo:
            if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
                return i
            i = text.rfind(sep, lo, i)
    return limit


def cut_pieces(text: str, size: int | None = None) -> Iterator[str]:
    """``text`` in pieces of at most ``size`` characters (default ``PIECE_CHARS``; see :func:`cut_point`);
    they join back to it."""
    size = size or PIECE_CHARS
    start = 0
    while len(text) - start > size:
        end = start + cut_point(text[start : start + size + 2], size)
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


def document_pieces(text: str, size: int | None = None) -> Iterator[Piece]:
    """One in-memory document as pieces, the last marked."""
    pieces = list(cut_pieces(text, size)) if text else []
    for i, p in enumerate(pieces):
        yield Piece(p, i == len(pieces) - 1)


# -------------------------------------------------------------------------------------------- text files


def _nul_refusal(path: Path, block: bytes, offset: int) -> NotTextError:
    return NotTextError(
        f"{path} is not a text file: it holds {block.count(0):,} NUL byte(s) in bytes {offset:,}-{offset + len(block):,}, "
        f"the first at byte {offset + block.index(0):,}, as binary files do. Pass a text or jsonl file (or token ids "
        "as .npy/.pt/.safetensors, or a folder written by `sae-lens-attn tokenize`); if it is UTF-16/32 text, pass "
        "its --encoding"
    )


def _decode_refusal(path: Path, bad: int, total: int, encoding: str) -> NotTextError:
    return NotTextError(
        f"{path} is not {encoding} text: {bad:,} of its first {total:,} bytes ({bad / total:.1%}) do not decode. "
        "If it is text in another encoding, pass it with --encoding (e.g. latin-1, cp1252); if it is not text, "
        "pass a text or jsonl file instead"
    )


def check_text_file(path: str | os.PathLike, encoding: str = "utf-8", n_bytes: int = SNIFF_BYTES) -> None:
    """Refuse (:class:`NotTextError`) a file whose first ``n_bytes`` hold a NUL byte (in a one-byte
    encoding) or more than ``MAX_UNDECODABLE_SHARE`` undecodable bytes. Cheap: run on every file of a
    source before the model loads, so a binary file is named before any work."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(n_bytes)
    if codecs.lookup(encoding).name not in _WIDE and b"\x00" in head:
        raise _nul_refusal(path, head, 0)
    _undecodable.n = 0
    codecs.getincrementaldecoder(encoding)(errors="sae_lens_attn.count").decode(head, final=False)
    if _undecodable.n > MAX_UNDECODABLE_SHARE * max(len(head), 1):
        raise _decode_refusal(path, _undecodable.n, len(head), encoding)


def _decoded_blocks(path: Path, encoding: str) -> Iterator[str]:
    """The file's text, a block at a time; refuses NUL bytes and a share of undecodable bytes above
    ``MAX_UNDECODABLE_SHARE`` (counted over what was read so far); warns once for a few."""
    wide = codecs.lookup(encoding).name in _WIDE
    decoder = codecs.getincrementaldecoder(encoding)(errors="sae_lens_attn.count")
    bad = total = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(BLOCK_BYTES)
            if not wide and b"\x00" in block:
                raise _nul_refusal(path, block, total)
            _undecodable.n = 0
            text = decoder.decode(block, final=not block)
            bad, total = bad + _undecodable.n, total + len(block)
            if bad > MAX_UNDECODABLE_SHARE * max(total, 1):
                raise _decode_refusal(path, bad, total, encoding)
            if text:
                yield text
            if not block:
                break
    if bad:
        warnings.warn(f"{path}: {bad:,} byte(s) do not decode as {encoding} and were replaced by U+FFFD; pass "
                      "--encoding if the file is in another encoding", stacklevel=3)


def file_pieces(path: str | os.PathLike, encoding: str = "utf-8", size: int | None = None) -> Iterator[Piece]:
    """A text file as one document, read lazily in pieces of at most ``size`` characters."""
    size = size or PIECE_CHARS
    carry = ""
    for text in _decoded_blocks(Path(path), encoding):
        carry += text
        start = 0  # an offset, not re-slicing: each character is copied a bounded number of times
        while len(carry) - start > size + 1:
            end = start + cut_point(carry[start : start + size + 2], size)
            yield Piece(carry[start:end], False)
            start = end
        carry = carry[start:]
    pieces = list(cut_pieces(carry, size))
    for i, p in enumerate(pieces):
        yield Piece(p, i == len(pieces) - 1)


def read_text_file(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """A text file's whole contents, checked as :func:`file_pieces` checks it."""
    return "".join(p.text for p in file_pieces(path, encoding))


# ------------------------------------------------------------------------------------------------- jsonl


def record_text(rec, text_field: str, where: str) -> str:
    """``rec[text_field]``, which must be a string: a number, null or a list is refused naming ``where``
    (training on ``str(5)`` or ``"None"`` would be silent garbage)."""
    if not isinstance(rec, dict):
        raise NotTextError(f"{where}: a record must be a JSON object with a {text_field!r} field, got "
                           f"{type(rec).__name__}")
    if text_field not in rec:
        raise InputError(f"{where}: no {text_field!r} field; pass text_field= (--text-field) the field holding "
                         f"text (fields: {list(rec)[:10]})")
    value = rec[text_field]
    if not isinstance(value, str):
        shown = json.dumps(value)[:60] if not hasattr(value, "shape") else type(value).__name__
        raise NotTextError(f"{where}: the {text_field!r} field is {type(value).__name__} ({shown}), not a string; "
                           "fix the record, or pass --text-field naming a field that holds text")
    return value


def jsonl_pieces(path: Path, text_field: str, encoding: str = "utf-8") -> Iterator[Piece]:
    """Each line's ``text_field`` as a document, read line by line."""
    check_text_file(path, encoding)
    with open(path, encoding=encoding, errors="replace", newline="") as fh:  # sniffed above
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            yield from document_pieces(record_text(rec, text_field, f"{path}:{lineno}"))


# ------------------------------------------------------------------------------------------------ sources


def _is_hf_dataset_dir(p: Path) -> bool:
    return (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/"))


def _is_local_path(source: str | os.PathLike) -> bool:
    """Written as a local path (not a hub id): a missing one is an error, not a hub lookup."""
    s = str(source)
    return s.startswith((".", "/", "~")) or os.sep in s and not _looks_like_hub_id(s)


def source_files(folder: Path) -> list[Path]:
    """A folder's text and jsonl files, in sorted order (the order documents are read in)."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.suffix == ".jsonl"))
    if not files:
        raise EmptyDatasetError(f"dataset folder {folder} holds no {', '.join(TEXT_SUFFIXES)} or .jsonl files")
    return files


def _local_file_pieces(f: Path, text_field: str, encoding: str) -> Iterator[Piece]:
    return jsonl_pieces(f, text_field, encoding) if f.suffix == ".jsonl" else file_pieces(f, encoding)


def iter_pieces(
    source: str | os.PathLike, text_field: str = "text", split: str = "train", encoding: str = "utf-8"
) -> Iterator[Piece]:
    """Documents of a file, a folder, a saved HF dataset or a hub dataset id, lazily, as bounded pieces."""
    p = Path(source).expanduser()
    if p.is_file():
        yield from _local_file_pieces(p, text_field, encoding)
        return
    if p.is_dir():
        if _is_hf_dataset_dir(p):
            for text in _iter_hf(str(p), text_field, split, local=True):
                yield from document_pieces(text)
            return
        for f in source_files(p):
            yield from _local_file_pieces(f, text_field, encoding)
        return
    if _is_local_path(source):
        raise MissingFileError(f"dataset {source!r} does not exist")
    for text in _iter_hf(str(source), text_field, split, local=False):
        yield from document_pieces(text)


def iter_texts(
    source: str | os.PathLike, text_field: str = "text", split: str = "train", encoding: str = "utf-8"
) -> Iterator[str]:
    """Whole documents of a source (:func:`iter_pieces` joined back)."""
    parts: list[str] = []
    for piece in iter_pieces(source, text_field, split, encoding):
        parts.append(piece.text)
        if piece.last:
            yield "".join(parts)
            parts.clear()


def check_text_source(source: str | os.PathLike, encoding: str = "utf-8") -> None:
    """Before any work: every local text/jsonl file of ``source`` sniffed (:func:`check_text_file`), a
    missing path named. Hub ids and saved HF datasets are checked as they are read."""
    from .shards import is_shard_folder  # token shards are checked against their manifest as they are read

    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix not in (".npy", ".pt", ".safetensors"):  # token arrays are not text
            check_text_file(p, encoding)
    elif p.is_dir() and not _is_hf_dataset_dir(p) and not is_shard_folder(p):
        for f in source_files(p):
            check_text_file(f, encoding)
    elif not p.exists() and _is_local_path(source):
        raise MissingFileError(f"dataset {source!r} does not exist")


def _iter_hf(source: str, text_field: str, split: str, local: bool) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError("reading Hugging Face datasets needs `pip install sae-lens-attn[datasets]`") from err
    if local:
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f"dataset {source} has splits {list(ds)}, not {split!r}; pass split=")
            ds = ds[split]
    else:
        try:  # streamed: records arrive as the run reads them, nothing is downloaded whole
            ds = datasets.load_dataset(source, split=split, streaming=True)
        except Exception as err:
            raise UnavailableError(
                f"could not open dataset {source!r}: not a local path, and the hub could not serve it ({err}). "
                "Pass a local text/jsonl file or folder, or a directory saved with Dataset.save_to_disk"
            ) from err
    for i, rec in enumerate(ds):
        yield record_text(rec, text_field, f"dataset {source}, record {i}")
