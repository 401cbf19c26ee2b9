"""Dashboard pages: self-contained HTML (plotly.js inlined once), escaped tokens, an index linking every page.
Rendering in a real browser is checked in test_dashboard_browser.py (slow)."""

import re
from html.parser import HTMLParser

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.analysis.dashboard import PLOTLY_FILE, DashboardConfig, write_dashboards
from sae_lens_attn.analysis.features import StatsConfig, feature_stats

from .conftest import random_rows

VOID = {"meta", "br", "img", "input", "link", "hr"}


class _Balance(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.errors = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else None}")
        else:
            self.stack.pop()


def _balanced(text: str) -> None:
    p = _Balance()
    p.feed(text)
    assert not p.errors and not p.stack, (p.errors[:3], p.stack[:3])


def _sae(site: Site, cfg, seed=0) -> SAE:
    sae = SAE(SAEConfig(d_in=site.d_in(cfg), d_sae=24, k=4, metadata={"hook_name": site.hook_name}), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def made(tiny_neox, tmp_path_factory):
    model = tiny_neox
    sae = _sae(Site(1), model.cfg)
    rows = random_rows(model, 6, 16)
    with torch.no_grad():
        sae.b_enc[23] = -1e4  # never fires
    stats = feature_stats(model, sae, rows, cfg=StatsConfig(n_top=4, n_samples=8, ctx_left=5, ctx_right=2))
    firing = [int(f) for f in (stats.fire_count > 0).nonzero()[:, 0][:2]]
    out = tmp_path_factory.mktemp("dash")
    files = write_dashboards(model, sae, stats, out, firing + [23], extra={"induction": {firing[0]: 0.5}})
    return model, sae, stats, firing, files


def test_pages_are_self_contained_with_four_figures(made):
    _, _, _, firing, files = made
    for f in firing:
        text = files.pages[f].read_text()
        assert len(re.findall(r"\* plotly\.js v\d", text)) == 1  # the library, inlined exactly once
        assert text.count("Plotly.newPlot(") == 4  # head shares, histogram, logits, DFA by source
        assert f"<h1>Feature {f} &middot; L1.z</h1>" in text
        assert "<script src=" not in text  # no script loaded from elsewhere
        markup = re.sub(r"<script.*?</script>", "", text, flags=re.S)  # (plotly.js itself mentions URLs)
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", markup) and "<link" not in markup
        _balanced(text)


def test_tokens_are_escaped_and_coloured(made):
    _, _, stats, firing, files = made
    text = files.pages[firing[0]].read_text()
    assert "&lt;|endoftext|&gt;" in text and "<|endoftext|>" not in text.split("<script", 1)[0]
    top = stats.top_examples(firing[0])
    assert text.count('class="tok center"') == len(top) + sum(len(g) for _, g in stats.quantile_examples(firing[0], 4, 3))
    assert 'style="background: rgba(255,120,0,1.000)"' in text  # the top token has the full colour


def test_dead_feature_and_index(made):
    _, _, _, firing, files = made
    dead = files.pages[23].read_text()
    assert "This feature never fired." in dead
    assert dead.count("Plotly.newPlot(") == 2  # head shares and logits only
    index = files.index.read_text()
    for f in [*firing, 23]:
        assert f'href="feature_{f}.html"' in index
    assert "<th>induction</th>" in index and "<td>0.5</td>" in index and "<td>nan</td>" in index
    _balanced(index)


def test_shared_plotly_file_mode_and_attn_out_sae(tiny_neox, tmp_path):
    sae = _sae(Site(1, "attn_out"), tiny_neox.cfg)
    rows = random_rows(tiny_neox, 3, 12, seed=1)
    stats = feature_stats(tiny_neox, sae, rows)
    f = int(stats.fire_count.argmax())
    files = write_dashboards(tiny_neox, sae, stats, tmp_path, [f], cfg=DashboardConfig(plotlyjs="file"))
    page = files.pages[f].read_text()
    assert (tmp_path / PLOTLY_FILE).stat().st_size > 1_000_000
    assert f'<script src="{PLOTLY_FILE}"></script>' in page and "* plotly.js v" not in page
    assert len(page) < 300_000
    assert page.count("Plotly.newPlot(") == 3  # no head-share figure for hook_attn_out
    with pytest.raises(ValueError, match="plotlyjs must be"):
        DashboardConfig(plotlyjs="cdn")
