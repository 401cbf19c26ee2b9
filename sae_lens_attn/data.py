"""Text -> packed token rows of ``n_ctx`` tokens, framed by the model's tokenization policy.

Rows follow :mod:`sae_lens_attn.tokens`: ``[BOS] body`` for causal LMs (EOS standing in where the tokenizer
has no BOS), ``[CLS] body [SEP]`` for encoders, the bare body where the tokenizer has neither. Documents are
joined with the policy's separator (BOS, or SEP for encoders) before the stream is cut into bodies.

Sources: a local text file, a ``.jsonl`` file (a ``text`` field per line), a folder of those, a Hugging
Face ``datasets`` directory saved with ``save_to_disk``, a hub dataset id (``datasets.load_dataset``, where
the network allows it), or token arrays already made (``.npy`` / ``.pt`` / ``.safetensors``).
"""

from __future__ import annotations

import codecs
import json
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int

from .tokens import TokenPolicy, causal_policy

TEXT_SUFFIXES = (".txt", ".md")
TOKEN_SUFFIXES = (".npy", ".pt", ".safetensors")
#: A text file with a larger share of bytes that do not decode is refused as not text (in that encoding).
MAX_UNDECODABLE_SHARE = 0.01
_WIDE = ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be")  # codecs whose text has NULs


class EmptyDatasetError(ValueError):
    """The data source held no text (or too few tokens for one row)."""


class NotTextError(ValueError):
    """A file read as text is not text in the given encoding (binary, or another encoding)."""


_undecodable = threading.local()


def _count_undecodable(err: UnicodeDecodeError) -> tuple[str, int]:
    _undecodable.n += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("sae_lens_attn.count", _count_undecodable)


def read_text_file(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """A text file's contents; :class:`NotTextError` naming the file when it holds NUL bytes (a binary
    file) or more than ``MAX_UNDECODABLE_SHARE`` of bytes that do not decode in ``encoding``. A few such
    bytes are replaced by U+FFFD, with a warning naming the file and the count."""
    path = Path(path)
    data = path.read_bytes()
    wide = codecs.lookup(encoding).name in _WIDE
    if not wide and b"\x00" in data:
        raise NotTextError(
            f"{path} is not a text file: it holds {data.count(0):,} NUL byte(s), the first at byte {data.index(0):,}, "
            "as binary files do. Pass a text or jsonl file (or token ids as .npy/.pt/.safetensors); if it is "
            "UTF-16/32 text, pass its --encoding"
        )
    _undecodable.n = 0
    text = data.decode(encoding, errors="sae_lens_attn.count")
    bad = _undecodable.n
    if bad and bad > MAX_UNDECODABLE_SHARE * len(data):
        raise NotTextError(
            f"{path} is not {encoding} text: {bad:,} of its {len(data):,} bytes ({bad / len(data):.1%}) do not "
            f"decode. If it is text in another encoding, pass it with --encoding (e.g. latin-1, cp1252); if it "
            "is not text, pass a text or jsonl file instead"
        )
    if bad:
        warnings.warn(f"{path}: {bad:,} byte(s) do not decode as {encoding} and were replaced by U+FFFD; pass "
                      "--encoding if the file is in another encoding", stacklevel=2)
    return text


def _iter_jsonl(path: Path, text_field: str, encoding: str = "utf-8") -> Iterator[str]:
    for lineno, line in enumerate(read_text_file(path, encoding).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if text_field not in rec:
            raise ValueError(f"{path}:{lineno}: no {text_field!r} field; pass text_field= the field holding text")
        yield str(rec[text_field])


def _is_hf_dataset_dir(p: Path) -> bool:
    return (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()


def iter_texts(
    source: str | os.PathLike, text_field: str = "text", split: str = "train", encoding: str = "utf-8"
) -> Iterator[str]:
    """Yield documents from a file, a folder, a saved HF dataset, or a hub dataset id. Local text and jsonl
    files are read in ``encoding`` and must be text (:func:`read_text_file`)."""
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix == ".jsonl":
            yield from _iter_jsonl(p, text_field, encoding)
        else:
            yield read_text_file(p, encoding)
        return
    if p.is_dir():
        if _is_hf_dataset_dir(p):
            yield from _iter_hf(str(p), text_field, split, local=True)
            return
        files = sorted(f for f in p.rglob("*") if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.suffix == ".jsonl"))
        if not files:
            raise EmptyDatasetError(f"dataset folder {p} holds no .txt, .md or .jsonl files")
        for f in files:
            yield from iter_texts(f, text_field, encoding=encoding)
        return
    if str(source).startswith((".", "/", "~")) or os.sep in str(source) and not _looks_like_hub_id(str(source)):
        raise FileNotFoundError(f"dataset {source!r} does not exist")
    yield from _iter_hf(str(source), text_field, split, local=False)


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/"))


def _iter_hf(source: str, text_field: str, split: str, local: bool) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("reading Hugging Face datasets needs `pip install sae-lens-attn[datasets]`") from err
    if local:
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {source} has splits {list(ds)}, not {split!r}; pass split=")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source, split=split, streaming=True)
        except Exception as err:
            raise OSError(
                f"could not open dataset {source!r}: not a local path, and the hub could not serve it ({err}). "
                "Pass a local text/jsonl file or folder, or a directory saved with Dataset.save_to_disk"
            ) from err
    for rec in ds:
        if text_field not in rec:
            raise ValueError(f"dataset {source} has no {text_field!r} column; pass text_field= (columns: {list(rec)})")
        yield str(rec[text_field])


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

            raise ValueError(weights_only_refusal(p, err) or f"{p}: unreadable token array ({type(err).__name__}); "
                             "the file is truncated or corrupted") from err
        if not isinstance(arr, torch.Tensor):
            raise ValueError(f"{p}: expected a tensor of token ids, got {type(arr).__name__}")
    else:
        from safetensors.torch import load_file

        arr = load_file(str(p))["tokens"]
    if arr.dtype.is_floating_point:
        raise ValueError(f"{p}: token arrays must hold integers, got {arr.dtype}")
    return arr.long()


def as_policy(start: TokenPolicy | int | None) -> TokenPolicy:
    """A :class:`TokenPolicy`; an int (or None) is the legacy BOS id, as start token and separator."""
    return start if isinstance(start, TokenPolicy) else causal_policy(start)


def iter_token_rows(
    texts: Iterable[str],
    tokenizer,
    n_ctx: int,
    policy: TokenPolicy | int | None,
    batch_docs: int = 64,
) -> Iterator[torch.Tensor]:
    """Pack documents into rows of ``n_ctx`` tokens framed by ``policy`` (a TokenPolicy, or a BOS id).

    Documents are joined with the policy's separator (the usual packing of GPT-2 and Pythia), then cut.
    """
    policy = as_policy(policy)
    body = n_ctx - policy.n_structural
    if body <= 0:
        raise ValueError(f"n_ctx must leave room for text after the {policy.n_structural} structural token(s), got {n_ctx}")
    sep = [policy.separator] if policy.separator is not None else []
    buf: list[int] = []
    pending: list[str] = []

    def flush() -> Iterator[torch.Tensor]:
        nonlocal buf
        for ids in tokenizer(pending, add_special_tokens=False)["input_ids"]:
            buf.extend(ids)
            buf.extend(sep)
        pending.clear()
        while len(buf) >= body:
            row, buf = buf[:body], buf[body:]
            yield torch.tensor(policy.wrap(row), dtype=torch.long)

    for text in texts:
        if text:
            pending.append(text)
        if len(pending) >= batch_docs:
            yield from flush()
    if pending:
        yield from flush()


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
    """All rows of a source, as one tensor (or the first ``max_rows``). Raises on an empty source, and on a
    local file that is not text in ``encoding``.

    ``bos_id``: the model's :class:`TokenPolicy` (``token_policy(model)``), or a BOS id (legacy)."""
    p = Path(source).expanduser()
    if p.is_file() and p.suffix in TOKEN_SUFFIXES:
        arr = load_token_array(p)
        if arr.ndim == 1:
            rows = list(iter_token_rows_from_ids(arr, n_ctx, bos_id))
            out = torch.stack(rows) if rows else torch.empty(0, n_ctx, dtype=torch.long)
        else:
            out = arr
    else:
        rows = []
        for row in iter_token_rows(iter_texts(source, text_field, split, encoding), tokenizer, n_ctx, bos_id):
            rows.append(row)
            if max_rows is not None and len(rows) >= max_rows:
                break
        out = torch.stack(rows) if rows else torch.empty(0, n_ctx, dtype=torch.long)
    if max_rows is not None:
        out = out[:max_rows]
    if out.shape[0] == 0:
        raise EmptyDatasetError(
            f"dataset {source} gave no rows of {n_ctx} tokens: it is empty or shorter than one row; "
            "pass more text or a smaller context size"
        )
    return out


def iter_token_rows_from_ids(ids: torch.Tensor, n_ctx: int, policy: TokenPolicy | int | None) -> Iterator[torch.Tensor]:
    """Rows from a 1-D token stream, framed by ``policy`` (no separators added: the stream has its own)."""
    policy = as_policy(policy)
    body = n_ctx - policy.n_structural
    for start in range(0, len(ids) - body + 1, body):
        yield torch.tensor(policy.wrap(ids[start : start + body].tolist()), dtype=torch.long)
