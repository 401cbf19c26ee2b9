"""Named hook sites on an attention layer, and the one place where head reshapes happen.

A :class:`Site` names *what* is read from the model (``hook_z`` with all heads concatenated, one head of
``hook_z``, or ``hook_attn_out``) and *where* (the layer). Everything else in the package asks a Site for
its hook name, its width and how to flatten the hook's tensor, so no other module reshapes heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float

from .errors import InputError

SiteKind = Literal["z", "attn_out"]
SITE_KINDS: tuple[str, ...] = ("z", "attn_out")

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(attn\.hook_z|hook_attn_out)$")


@dataclass(frozen=True, order=True)
class Site:
    """One hook site: ``hook_z`` (all heads, or one head) or ``hook_attn_out`` of one layer."""

    layer: int
    """Transformer block index, 0-based."""
    kind: SiteKind = "z"
    """``z``: the heads' outputs before W_O (d_in = n_heads*d_head); ``attn_out``: after W_O (d_model)."""
    head: int | None = None
    """For ``z`` only: keep this one head (d_in = d_head). None keeps all heads, concatenated in head order."""

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise InputError(f"Site.kind must be one of {SITE_KINDS}, got {self.kind!r}")
        if self.layer < 0:
            raise InputError(f"Site.layer must be >= 0, got {self.layer}")
        if self.head is not None and self.kind != "z":
            raise InputError("Site.head selects one head of hook_z; hook_attn_out has no head axis")

    @property
    def hook_name(self) -> str:
        """TransformerLens hook name (also SAELens' ``metadata.hook_name``)."""
        if self.kind == "z":
            return f"blocks.{self.layer}.attn.hook_z"
        return f"blocks.{self.layer}.hook_attn_out"

    @property
    def label(self) -> str:
        """Short, file-name-safe label, e.g. ``L1.z``, ``L1.z.h3``, ``L0.attn_out``."""
        base = f"L{self.layer}.{self.kind}"
        return base if self.head is None else f"{base}.h{self.head}"

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, spec: str, head: int | None = None) -> Site:
        """Read a site from ``blocks.1.attn.hook_z``, ``blocks.0.hook_attn_out`` or a label ``L1.z.h3``."""
        spec = spec.strip()
        m = _HOOK_RE.match(spec)
        if m:
            kind = "z" if m.group(2) == "attn.hook_z" else "attn_out"
            return cls(int(m.group(1)), kind, head)
        m = re.match(r"^L(\d+)\.(z|attn_out)(?:\.h(\d+))?$", spec)
        if m:
            return cls(int(m.group(1)), m.group(2), int(m.group(3)) if m.group(3) else head)  # type: ignore[arg-type]
        raise InputError(
            f"unknown site {spec!r}: use 'blocks.L.attn.hook_z', 'blocks.L.hook_attn_out' or a label like 'L1.z', "
            "'L1.z.h3', 'L0.attn_out'"
        )

    def d_in(self, cfg: Any) -> int:
        """Width of this site's activation vectors for a model config (TransformerLens ``cfg``)."""
        if self.kind == "attn_out":
            return int(cfg.d_model)
        return int(cfg.d_head) if self.head is not None else int(cfg.n_heads * cfg.d_head)

    def validate(self, cfg: Any) -> None:
        """Raise a ValueError naming the problem if this site does not exist in a model with ``cfg``."""
        if self.layer >= cfg.n_layers:
            raise InputError(
                f"site {self.label}: layer {self.layer} does not exist; the model has layers 0..{cfg.n_layers - 1}"
            )
        if self.head is not None and not 0 <= self.head < cfg.n_heads:
            raise InputError(
                f"site {self.label}: head {self.head} does not exist; the model has heads 0..{cfg.n_heads - 1}"
            )

    def flatten(self, act: torch.Tensor) -> Float[torch.Tensor, "batch pos d_in"]:
        """The hook's tensor as [batch, pos, d_in]: heads concatenated in head order, or one head."""
        if self.kind == "attn_out":
            return act
        if act.ndim == 3:  # some adapters already hand z as [batch, pos, n_heads*d_head]
            return act
        if self.head is not None:
            return act[:, :, self.head, :]
        return einops.rearrange(act, "batch pos head d_head -> batch pos (head d_head)")

    def unflatten(self, flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`flatten`: write ``flat`` back in the hook's layout (``like`` gives it).

        For a one-head site the other heads keep ``like``'s values.
        """
        if self.kind == "attn_out" or like.ndim == 3:
            return flat.to(like.dtype)
        if self.head is not None:
            out = like.clone()
            out[:, :, self.head, :] = flat.to(like.dtype)
            return out
        return einops.rearrange(flat, "batch pos (head d_head) -> batch pos head d_head", head=like.shape[2]).to(
            like.dtype
        )


def split_heads(vec: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., n_heads*d_head] -> [..., n_heads, d_head], in the same head order as :meth:`Site.flatten`."""
    return einops.rearrange(vec, "... (head d_head) -> ... head d_head", head=n_heads)


def parse_sites(layers: str | list[int], kind: SiteKind = "z", head: int | None = None, n_layers: int | None = None) -> list[Site]:
    """Sites for a layer list: ``"1"``, ``"0,1"``, ``"all"`` (needs ``n_layers``) or a list of ints."""
    if isinstance(layers, str):
        if layers.strip() == "all":
            if n_layers is None:
                raise InputError("layers='all' needs the model's n_layers")
            idx = list(range(n_layers))
        else:
            try:
                idx = [int(x) for x in layers.split(",") if x.strip()]
            except ValueError:
                raise InputError(f"layers must be 'all' or comma-separated integers, got {layers!r}") from None
    else:
        idx = list(layers)
    if not idx:
        raise InputError("no layers given")
    return [Site(i, kind, head) for i in idx]
