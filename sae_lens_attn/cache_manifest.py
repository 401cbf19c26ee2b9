"""The activation cache's manifest: what a cache holds, how to read it back, and when it may be extended.

``manifest.json`` lists the settings a cache was written under (model, sites, dtype, gradients, BOS
handling, row length) and every committed shard (rows covered, size, sha256 of the file and of its token
rows). The layout and the reasons for it are in :mod:`sae_lens_attn.cache`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .files import WriteError
from .models import model_name
from .sites import Site

FORMAT = "sae_lens_attn.activation_cache"
FORMAT_VERSION = 1
MANIFEST_FILENAME = "manifest.json"
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


class CacheError(InputError):
    """A cache directory that cannot be used as asked: the message names the file/field and what is wrong."""


class CacheWriteError(WriteError, CacheError):
    """Writing a shard or the manifest failed (e.g. ENOSPC); what was already committed is intact."""

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



def _sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _rows_sha256(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()



def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _tensor_names(sites: Sequence[Site] | Sequence[SiteInfo], with_grad: bool) -> list[str]:
    names = []
    for s in sites:
        names.append(f"{s.label}.acts")
        if with_grad:
            names.append(f"{s.label}.grads")
    return names
