"""Registered analyses (``explorer=True``, :mod:`sae_lens_attn.analysis.registry`) as an explorer panel.

The analysis runs on the explorer's model and the chosen SAE with the prompt's tokens as its one row and
every flag at its command-line default except the options the page sends; the reply is each part's text
and data, the same parts the command line prints and writes with ``--out``.
"""

from __future__ import annotations

import json
import time

from sae_lens_attn.analysis.commands import default_args
from sae_lens_attn.analysis.registry import ANALYSES, Analysis, Context
from sae_lens_attn.errors import InputError


def panel_analyses() -> list[Analysis]:
    """The registered analyses that offer an explorer panel, in registration order."""
    return [a for a in ANALYSES.values() if a.explorer]


def describe() -> list[dict]:
    """Each panel analysis with its options, for the page's form."""
    return [{"name": a.name, "help": a.help, "options": [
        {"name": o.dest, "flag": o.flag, "type": getattr(o.type, "__name__", "str"),
         "default": o.default, "help": o.help} for o in a.options]} for a in panel_analyses()]


def _analysis(name: str) -> Analysis:
    found = {a.name: a for a in panel_analyses()}
    if name not in found:
        raise InputError(f"no explorer analysis {name!r}; registered with explorer=True: {', '.join(found) or 'none'}")
    return found[name]


def run_registered(session, name: str, text: str, sae_id: str, options: dict | None = None) -> dict:
    """Run the analysis ``name`` on ``text`` with the session's SAE ``sae_id``: ``{"parts": [{"text", "data"}]}``."""
    analysis = _analysis(name)
    e = session.entry(sae_id)
    args = default_args(analysis, e.path or e.id, options)
    t0 = time.perf_counter()
    with session.lock:
        tokens = session.prompt(text).tokens
        parts = [{"text": p.text, "data": p.data} for p in analysis.run(Context(session.model, e.sae, e.site, tokens, args))]
    try:
        json.dumps(parts, allow_nan=False)
    except (TypeError, ValueError) as err:  # the analysis returned data the JSON report could not hold either
        raise TypeError(f"analysis {name!r} returned data that is not plain JSON: {err}") from err
    return {"analysis": name, "sae": e.id, "parts": parts, "elapsed_ms": (time.perf_counter() - t0) * 1e3}
