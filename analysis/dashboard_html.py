"""The HTML frame every dashboard page shares: the style sheet and :func:`document` (a whole page).

Its own module so the feature pages (:mod:`.dashboard`) and the index (:mod:`.dashboard_index`) both build
on it without importing each other.
"""

from __future__ import annotations

import html
from typing import Literal

PlotlyJS = Literal["inline", "file"]
PLOTLY_FILE = "plotly.min.js"

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px 0; } h2 { font-size: 17px; margin: 22px 0 8px 0; }
.meta { color: #555; font-size: 14px; }
/* explicit grid tracks: a card's width is known before the figures after it exist, so plotly sizes it right */
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 12px; }
@media (max-width: 900px) { .grid { grid-template-columns: minmax(0, 1fr); } }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; overflow: hidden; }
.ex { font-family: ui-monospace, Menlo, monospace; font-size: 13px; padding: 3px 0; border-bottom: 1px solid #eee;
      white-space: pre-wrap; }
.ex .val { display: inline-block; width: 64px; color: #666; }
.ex span[title] { border-radius: 2px; } .tok.center { outline: 1.5px solid #c0392b; }
table { border-collapse: collapse; font-size: 14px; } td, th { padding: 4px 10px; border-bottom: 1px solid #eee; text-align: left; }
th { background: #f4f4f4; } a { color: #1f5fa8; }
"""


def document(title: str, body: str, plotlyjs: PlotlyJS | None, script: str = "") -> str:
    """A whole page: ``<script src=plotly.min.js>`` in the head for ``file`` mode, ``script`` at the end."""
    head_js = f'<script src="{PLOTLY_FILE}"></script>' if plotlyjs == "file" else ""
    tail = f"<script>{script}</script>" if script else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<link rel="icon" href="data:,"><style>{CSS}</style>{head_js}</head><body>\n{body}\n{tail}</body></html>\n'
    )
