"""Is an SAE being applied where it was trained? Its metadata's site and model against the ones at hand.

:meth:`SAE.check_site <sae_lens_attn.sae.SAE.check_site>` refuses an SAE applied to another layer, hook,
head or model than its metadata records (``hook_layer``, ``hook_name``, ``hook_head_index``,
``model_name``). A field the metadata lacks is not compared. Deliberate transfer experiments opt out with
``check_site(..., allow_transfer=True)``, or for a whole block of analysis calls with
``with transfer_allowed(): ...`` (what the CLI's ``--allow-transfer`` does).

Model names are compared by identity, not spelling (:func:`same_model`). A name is a hub id
(``gpt2``, ``EleutherAI/pythia-70m``), a local directory, or the embedded model's alias
``sae-lens-attn/shakespeare-2l``. Two names are the same model when any of these holds:

* they are equal ignoring case, or resolve to the same local directory;
* TransformerLens' alias table maps them to the same official name (``gpt2-small`` = ``gpt2``);
* a local directory is the embedded model's (= its alias), lies in the Hugging Face cache of a hub id
  (``.../models--EleutherAI--pythia-70m/snapshots/...``), or its ``config.json`` records the hub id as
  ``_name_or_path``;
* one is a bare name without an organisation (``pythia-70m``, or a directory's last component) equal to
  the other's name part (``EleutherAI/pythia-70m``).

Otherwise they differ (two copies of a model in differently named directories, with nothing recording
where they came from, count as different: pass ``allow_transfer=True`` for them).
"""

from __future__ import annotations

import contextvars
import json
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InputError

_ALLOW = contextvars.ContextVar("sae_lens_attn_allow_transfer", default=False)
_HF_CACHE_RE = re.compile(r"^models--(.+)$")


class SiteMismatchError(InputError):
    """An SAE applied to another site or model than the one its metadata records."""


@contextmanager
def transfer_allowed(allow: bool = True) -> Iterator[None]:
    """Within the block, :meth:`SAE.check_site` accepts an SAE on another site or model than its own
    (for deliberate transfer experiments); widths must still match."""
    token = _ALLOW.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW.reset(token)


def transfer_is_allowed() -> bool:
    return _ALLOW.get()


# ------------------------------------------------------------------------------------------ model names


def _official(name: str) -> str | None:
    """TransformerLens' official name for an alias (``gpt2-small`` -> ``gpt2``), when its table is loaded."""
    if "transformer_lens" not in sys.modules:  # only consulted once the model was booted through it
        return None
    try:
        from transformer_lens.supported_models import get_official_model_name

        return get_official_model_name(name)
    except Exception:  # unknown name, or a TransformerLens without the table
        return None


class _Identity:
    """What a model name tells about the model: full hub ids, bare names, and a resolved local directory."""

    def __init__(self, name: str):
        self.ids: set[str] = set()  # "org/name" hub ids, case-folded
        self.bare: set[str] = set()  # names without an organisation, case-folded
        self.parts: set[str] = set()  # the name part of each hub id
        self.path: Path | None = None
        self._add(str(name).strip(), depth=0)

    def _add_hub(self, name: str) -> None:
        for n in {name, _official(name) or name}:
            n = n.casefold()
            if "/" in n:
                self.ids.add(n)
                self.parts.add(n.rsplit("/", 1)[1])
            elif n:
                self.bare.add(n)

    def _add(self, name: str, depth: int) -> None:
        from .models import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME

        if not name or name.casefold() in ("unknown", "none"):
            return
        if name == "default":
            name = DEFAULT_MODEL_NAME
        p = Path(name).expanduser()
        is_path = name.startswith(("/", ".", "~")) or p.is_dir()
        if not is_path:
            self._add_hub(name)
            return
        try:
            resolved = p.resolve()
        except OSError:
            resolved = p.absolute()
        if depth == 0:
            self.path = resolved
        if resolved == DEFAULT_MODEL_DIR.resolve():
            self._add_hub(DEFAULT_MODEL_NAME)
        for part in resolved.parts:
            m = _HF_CACHE_RE.match(part)
            if m:
                self._add_hub(m.group(1).replace("--", "/"))
        if resolved.name and resolved.parent.name != "snapshots" and not _HF_CACHE_RE.match(resolved.name):
            self.bare.add(resolved.name.casefold())
        origin = _name_or_path(resolved)
        if origin and depth == 0 and origin != name:
            self._add(origin, depth + 1)

    def matches(self, other: _Identity) -> bool:
        if self.path is not None and self.path == other.path:
            return True
        if self.ids & other.ids:
            return True
        return bool(self.bare & (other.bare | other.parts) or other.bare & (self.bare | self.parts))

    @property
    def empty(self) -> bool:
        return not (self.ids or self.bare or self.path)


def _name_or_path(directory: Path) -> str | None:
    """``_name_or_path`` in a local model directory's config.json (where save_pretrained records its origin)."""
    try:
        value = json.loads((directory / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value.strip() else None


def same_model(a: str | None, b: str | None) -> bool | None:
    """Whether model names ``a`` and ``b`` name the same model (the rule in the module docstring); None
    when either tells nothing (missing, ``unknown``)."""
    if a is None or b is None:
        return None
    ia, ib = _Identity(a), _Identity(b)
    if ia.empty or ib.empty:
        return None
    return ia.matches(ib)


# ------------------------------------------------------------------------------------------------ sites


def site_mismatches(metadata: Mapping[str, Any], site, model_name: str | None) -> list[str]:
    """What differs between an SAE's ``metadata`` and the ``site`` (and model) it is applied to; fields the
    metadata lacks are not compared."""
    from .sites import Site

    out = []
    hook = metadata.get("hook_name")
    if hook:
        try:
            trained = Site.parse(str(hook))
            same_hook = (trained.layer, trained.kind) == (site.layer, site.kind)
        except ValueError:  # not an attention hook (e.g. the residual stream): compare the names
            same_hook = str(hook) == site.hook_name
        if not same_hook:
            out.append(f"hook {hook} (trained) vs {site.hook_name}")
    layer = metadata.get("hook_layer")
    if layer is not None and not (hook and out) and int(layer) != site.layer:
        out.append(f"layer {layer} (trained) vs {site.layer}")
    if "hook_head_index" in metadata and site.kind == "z":
        head = metadata["hook_head_index"]
        if (None if head is None else int(head)) != site.head:
            def show(h):
                return "all heads" if h is None else f"head {h}"
            out.append(f"{show(head)} (trained) vs {show(site.head)}")
    trained_model = metadata.get("model_name")
    if trained_model and model_name and same_model(str(trained_model), model_name) is False:
        out.append(f"model {trained_model!r} (trained) vs {model_name!r}")
    return out
