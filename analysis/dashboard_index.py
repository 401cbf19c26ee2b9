"""The dashboards' index page: one row per feature, sortable by any column (click its header) and
filtered by a search box, in a few lines of plain JavaScript inside the page (nothing loaded from elsewhere)."""

from __future__ import annotations

import html
import math

from sae_lens_attn.models import model_name
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site

from ._common import sae_site
from .dashboard_html import document
from .features import FeatureStats
from .heads import head_shares

#: Sorting (numbers by ``data-v``, text otherwise; NaN always last) and filtering (rows whose text contains
#: every word of the search box).
SCRIPT = r"""
(function () {
  const t = document.getElementById("features"), q = document.getElementById("filter");
  const shown = document.getElementById("shown"), body = t.tBodies[0], rows = Array.from(body.rows);
  function filter() {
    const words = q.value.toLowerCase().split(/\s+/).filter(Boolean);
    let n = 0;
    for (const r of rows) {
      const text = r.textContent.toLowerCase(), ok = words.every((w) => text.includes(w));
      r.hidden = !ok; n += ok;
    }
    shown.textContent = n + " of " + rows.length + " features shown";
  }
  function value(r, i) {
    const c = r.cells[i];
    return c.dataset.v !== undefined ? parseFloat(c.dataset.v) : c.textContent.trim().toLowerCase();
  }
  Array.from(t.tHead.rows[0].cells).forEach((th, i) => th.addEventListener("click", () => {
    const dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    for (const h of t.tHead.rows[0].cells) h.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", dir);
    const sign = dir === "ascending" ? 1 : -1;
    rows.sort((a, b) => {
      const x = value(a, i), y = value(b, i);
      if (typeof x === "number" && typeof y === "number") {
        if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);
        return sign * (x - y);
      }
      return sign * String(x).localeCompare(String(y));
    });
    body.append(...rows);
  }));
  q.addEventListener("input", filter);
  filter();
})();
"""

CSS = """
#filter { width: 24em; padding: 3px 6px; margin: 10px 0; }
th { cursor: pointer; user-select: none; white-space: nowrap; }
th[aria-sort="ascending"]::after { content: " \\25b2"; } th[aria-sort="descending"]::after { content: " \\25bc"; }
tr[hidden] { display: none; }
"""


def _num(v: float, fmt: str) -> str:
    return f'<td data-v="{v!r}">{v:{fmt}}</td>'


def _evaluation(sae: SAE) -> str:
    """The SAE's evaluation at training, unreliable ratios marked with their reason (empty when unknown)."""
    from sae_lens_attn.evals import metrics_lines, saved_metrics

    saved = saved_metrics(sae)
    if saved is None:
        return ""
    return '<pre class="meta evaluation">' + html.escape("\n".join(metrics_lines(saved))) + "</pre>"


def index_page(model, sae: SAE, stats: FeatureStats, pages: dict[int, str], site: Site | None = None,
               extra: dict[str, dict[int, float]] | None = None) -> str:
    """The index: one row per feature with density, activations, top head share, extra columns and links."""
    site = sae_site(sae, site)
    shares = head_shares(sae, int(model.cfg.n_heads), site).cpu() if site.kind == "z" else None
    extra = extra or {}
    cols = ["feature", "density", "max act", "mean act"] + (["top head", "share"] if shares is not None else [])
    cols += list(extra) + ["top tokens"]
    head = "<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead>"
    rows = []
    for feature, href in pages.items():
        j = stats.index(feature)
        cells = [f'<td data-v="{feature}"><a href="{html.escape(href)}">{feature}</a></td>',
                 _num(float(stats.density[j]), ".3e"), _num(float(stats.max_act[j]), ".4g"),
                 _num(float(stats.mean_act[j]), ".4g")]
        if shares is not None:
            h = int(shares[feature].argmax())
            cells += [f"<td>H{h}</td>", _num(float(shares[feature, h]), ".2f")]
        for values in extra.values():
            cells.append(_num(float(values.get(feature, math.nan)), ".3g"))
        cells.append(f"<td>{html.escape(stats.describe(feature))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    body = (
        f"<style>{CSS}</style><h1>{html.escape(site.label)} features</h1>"
        f'<div class="meta">{html.escape(model_name(model))} &middot; {html.escape(site.hook_name)} &middot; '
        f"{stats.n_tokens:,} tokens &middot; {len(pages)} features &middot; click a column header to sort</div>"
        f"{_evaluation(sae)}"
        '<input id="filter" type="search" placeholder="filter: feature id, head, token ..." aria-label="filter">'
        ' <span id="shown" class="meta"></span>'
        f'<table id="features">{head}<tbody>{"".join(rows)}</tbody></table>'
    )
    return document(f"{site.label} features", body, None, SCRIPT)
