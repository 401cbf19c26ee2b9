"""Text -> packed token rows of ``n_ctx`` tokens, framed by the model's tokenization policy.

Rows follow :mod:`sae_lens_attn.tokens`: ``[BOS] body`` for causal LMs (EOS standing in where the tokenizer
has no BOS), ``[CLS] body [SEP]`` for encoders, the bare body where the tokenizer has neither. Documents are
joined with the policy's separator (BOS, or SEP for encoders) before the stream is cut into bodies.

Sources: a local text file, a ``.jsonl`` file (a ``text`` field per line), a folder of those, a Hugging
Face ``datasets`` directory saved with ``save_to_disk``, a hub dataset id (``datasets.load_dataset``, where
the network allows it), or token arrays already made (``.npy`` / ``.pt`` / ``.safetensors``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int

from .tokens import TokenPolicy, causal_policy

TEXT_SUFFIXES = (".txt", ".md")
TOKEN_SUFFIXES = (".npy", ".pt", ".safetensors")


class EmptyDatasetError(ValueError):
    """The data source held no text (or too few tokens for one row)."""


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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


def iter_texts(source: str | os.PathLike, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Yield documents from a file, a folder, a saved HF dataset, or a hub dataset id."""
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix == ".jsonl":
            yield from _iter_jsonl(p, text_field)
        else:
            yield p.read_text(encoding="utf-8", errors="replace")
        return
    if p.is_dir():
        if _is_hf_dataset_dir(p):
            yield from _iter_hf(str(p), text_field, split, local=True)
            return
        files = sorted(f for f in p.rglob("*") if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.suffix == ".jsonl"))
        if not files:
            raise EmptyDatasetError(f"dataset folder {p} holds no .txt, .md or .jsonl files")
        for f in files:
            yield from iter_texts(f, text_field)
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
        arr = torch.load(p, weights_only=True)
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
) -> Int[torch.Tensor, "rows n_ctx"]:
    """All rows of a source, as one tensor (or the first ``max_rows``). Raises on an empty source.

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
        for row in iter_token_rows(iter_texts(source, text_field, split), tokenizer, n_ctx, bos_id):
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
