"""Dashboard pages: plotly.js once per folder (pages of tens of kB) or inlined when asked, escaped tokens, DFA
by source for the top example and averaged over the top examples (checked against dfa_by_source by hand),
log-axis ticks labelled with their values, the default feature choice (density spread + induction-like), and
a sortable, filterable index. Rendering and the index's sorting in a real browser: test_dashboard_browser.py."""

import json
import re
from html.parser import HTMLParser

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.analysis.dashboard import PLOTLY_FILE, DashboardConfig, write_dashboards
from sae_lens_attn.analysis.dashboard_figures import example_dfa, log_ticks, source_profile
from sae_lens_attn.analysis.dashboard_select import default_features, density_spread, most_induction_like
from sae_lens_attn.analysis.dfa import dfa_by_source
from sae_lens_attn.analysis.features import StatsConfig, feature_stats
from sae_lens_attn.analysis.induction import FeatureInductionScores

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


def _figures(page: str) -> list[tuple[list, dict]]:
    """(data, layout) of every Plotly.newPlot call on a page."""
    out = []
    for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', page):
        dec = json.JSONDecoder()
        data, end = dec.raw_decode(page, m.end())
        rest = page[end:].lstrip()[1:].lstrip()
        layout, _ = dec.raw_decode(rest)
        out.append((data, layout))
    return out


def _no_external(text: str) -> None:
    markup = re.sub(r"<script>.*?</script>", "", text, flags=re.S)  # (plotly.js itself mentions URLs)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", markup) and "<link rel=\"stylesheet" not in markup


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


def test_pages_share_one_plotly_file_and_are_small(made, tmp_path):
    model, sae, stats, firing, files = made
    folder = files.index.parent
    js = folder / PLOTLY_FILE
    assert js.stat().st_size > 1_000_000 and len(list(folder.glob("*.js"))) == 1
    for f in firing:
        text = files.pages[f].read_text()
        assert text.count(f'<script src="{PLOTLY_FILE}"></script>') == 1 and "* plotly.js v" not in text
        assert text.count("Plotly.newPlot(") == 5  # head shares, histogram, logits, DFA top example, DFA mean
        assert f"<h1>Feature {f} &middot; L1.z</h1>" in text
        assert len(text.encode()) < 100_000
        _no_external(text)
        _balanced(text)
    write_dashboards(model, sae, stats, tmp_path, firing[:1])
    mtime = (tmp_path / PLOTLY_FILE).stat().st_mtime_ns
    write_dashboards(model, sae, stats, tmp_path, firing[1:])  # a second run leaves the shared script alone
    assert (tmp_path / PLOTLY_FILE).stat().st_mtime_ns == mtime and len(list(tmp_path.glob("*.js"))) == 1


def test_inline_mode_is_self_contained(made, tmp_path):
    model, sae, stats, firing, _ = made
    files = write_dashboards(model, sae, stats, tmp_path, firing[:1], cfg=DashboardConfig(plotlyjs="inline"))
    text = files.pages[firing[0]].read_text()
    assert len(re.findall(r"\* plotly\.js v\d", text)) == 1 and "<script src=" not in text
    assert text.count("Plotly.newPlot(") == 5 and not (tmp_path / PLOTLY_FILE).exists()
    _balanced(text)
    with pytest.raises(ValueError, match="plotlyjs must be"):
        DashboardConfig(plotlyjs="cdn")


def test_tokens_are_escaped_and_coloured(made):
    _, _, stats, firing, files = made
    text = files.pages[firing[0]].read_text()
    assert "&lt;|endoftext|&gt;" in text and "<|endoftext|>" not in text.split("<script", 1)[0]
    top = stats.top_examples(firing[0])
    assert text.count('class="tok center"') == len(top) + sum(len(g) for _, g in stats.quantile_examples(firing[0], 4, 3))
    assert 'style="background:rgba(255,120,0,1.000)"' in text  # the top token has the full colour


def test_dfa_by_source_for_the_top_example_and_averaged_over_the_top_examples(made):
    model, sae, stats, firing, files = made
    f = firing[0]
    top = stats.top_examples(f, 12)
    figs = _figures(files.pages[f].read_text())
    by_title = {lay["title"]["text"].split(",")[0]: (data, lay) for data, lay in figs}
    # the top example, by hand: dfa_by_source on its row's prefix
    ex = top[0]
    ref = dfa_by_source(model, sae, stats.rows[ex.row, : ex.pos + 1], [f], Site(1))
    heat = by_title["DFA by head and source position"][0][0]
    assert torch.allclose(torch.tensor(heat["z"]), ref.by_source[0, ex.pos, :, :, 0], rtol=1e-3, atol=1e-6)  # plotted to 4 significant digits
    # averaged by relative source position: start token, <=-17, -16 .. -1, self
    W = 16
    want = torch.zeros(4, W + 3, dtype=torch.float64)
    for e in top:
        src = dfa_by_source(model, sae, stats.rows[e.row, : e.pos + 1], [f], Site(1)).by_source[0, e.pos, :, :, 0]
        for s in range(e.pos + 1):
            off = s - e.pos
            col = 0 if s == 0 else (1 if off < -W else W + 2 + off)
            want[:, col] += src[:, s].double()
    want /= len(top)
    data, layout = by_title["DFA by relative source position"]
    assert data[0]["x"] == ["start", "\u2264-17"] + [str(o) for o in range(-16, 0)] + ["self"]
    assert torch.allclose(torch.tensor(data[0]["z"], dtype=torch.float64), want, rtol=1e-3, atol=1e-6)  # plotted to 4 significant digits
    assert f"mean over the top {len(top)} examples" in layout["title"]["text"]
    prof = source_profile(example_dfa(model, sae, Site(1), stats, f, top), 0, False, W)
    assert torch.allclose(prof.values.sum(1), prof.by_head, atol=1e-5)  # columns add up to the DFA by head


def test_log_axis_ticks_are_labelled_with_their_values(made):
    assert log_ticks(0.3, 9) == ([0.5, 1.0, 2.0, 5.0], ["0.5", "1", "2", "5"])
    assert log_ticks(0.002, 0.004)[1] == ["0.002", "0.003", "0.004"]
    assert log_ticks(2.1, 2.6)[0] == [2.1, 2.34, 2.6]  # within one integer step: the ends and the middle
    for lo, hi in ((1e-4, 1e3), (0.0126, 0.0158), (7.9, 12.6), (0.31, 0.5)):
        vals, labels = log_ticks(lo, hi)
        assert len(vals) >= 2 and vals == sorted(vals) and lo * 0.999 <= vals[0] and vals[-1] <= hi * 1.001
        assert [float(t) for t in labels] == pytest.approx(vals, rel=1e-6)  # a tick reads what it is
    with pytest.raises(ValueError, match="0 < lo <= hi"):
        log_ticks(0.0, 1.0)
    _, _, stats, firing, files = made
    (hist,) = [lay for _, lay in _figures(files.pages[firing[0]].read_text()) if "histogram" in lay["title"]["text"]]
    axis = hist["xaxis"]
    assert axis["type"] == "log" and [float(t) for t in axis["ticktext"]] == pytest.approx(axis["tickvals"], rel=1e-6)
    lo, hi = 10 ** axis["range"][0], 10 ** axis["range"][1]
    assert all(lo * 0.999 <= v <= hi * 1.001 for v in axis["tickvals"])


def test_dead_feature_and_a_sortable_filterable_index(made):
    _, _, _, firing, files = made
    dead = files.pages[23].read_text()
    assert "This feature never fired." in dead
    assert dead.count("Plotly.newPlot(") == 2  # head shares and logits only
    index = files.index.read_text()
    for f in [*firing, 23]:
        assert f'href="feature_{f}.html"' in index and f'<td data-v="{f}">' in index
    assert "<th>induction</th>" in index and '<td data-v="0.5">0.5</td>' in index and '<td data-v="nan">nan</td>' in index
    assert '<table id="features"><thead>' in index and "<tbody>" in index and 'id="filter"' in index
    assert "addEventListener(\"click\"" in index and "aria-sort" in index  # sorting and filtering, inline JS
    assert "<script src=" not in index
    _no_external(index)
    _balanced(index)
    meta = json.loads((files.index.parent / "features.json").read_text())
    assert meta == {"site": "L1.z", "features": sorted([*firing, 23])}


def test_attn_out_sae_page(tiny_neox, tmp_path):
    sae = _sae(Site(1, "attn_out"), tiny_neox.cfg)
    rows = random_rows(tiny_neox, 3, 12, seed=1)
    stats = feature_stats(tiny_neox, sae, rows)
    f = int(stats.fire_count.argmax())
    files = write_dashboards(tiny_neox, sae, stats, tmp_path, [f])
    page = files.pages[f].read_text()
    assert page.count("Plotly.newPlot(") == 4  # no head-share figure for hook_attn_out
    assert len(page.encode()) < 100_000


def test_default_features_spread_over_density_and_add_induction(tiny_neox, tmp_path, monkeypatch):
    site = Site(1)
    sae = SAE(SAEConfig(d_in=32, d_sae=24, architecture="standard", metadata={"hook_name": site.hook_name}), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(3))
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.6, 0.3, 24))  # densities from rare to common
        sae.b_enc[23] = -1e4  # never fires
    stats = feature_stats(tiny_neox, sae, random_rows(tiny_neox, 6, 16), cfg=StatsConfig(n_top=2, n_samples=2))
    alive = [int(stats.features[i]) for i in (stats.fire_count > 0).nonzero()[:, 0]]
    dens = {f: float(stats.density[stats.index(f)]) for f in alive}
    order = sorted(alive, key=lambda f: dens[f])
    n = 4
    spread = density_spread(stats, n)
    assert spread == [order[int((i + 0.5) * len(order) / n)] for i in range(n)]
    assert dens[spread[0]] <= sorted(dens.values())[len(order) // 4] and dens[spread[-1]] >= sorted(dens.values())[-len(order) // 4]
    assert density_spread(stats, 100) == order and 23 not in density_spread(stats, 100)  # dead: never chosen
    d = sae.cfg.d_sae
    a, b, c = [f for f in alive if f not in spread][:3]
    mass, fire, mean = torch.zeros(d), torch.zeros(d), torch.zeros(d)
    mass[[a, b, c, 23]] = torch.tensor([0.95, 0.99, 0.99, 1.0])
    fire[[a, b, c, 23]] = torch.tensor([0.5, 0.5, 0.05, 0.9])  # c fires too rarely on the second copy
    mean[[a, b, 23]] = torch.tensor([1.0, 2.0, 3.0])
    scores = FeatureInductionScores(torch.arange(d), mass, mean, mean, fire, 8)
    assert most_induction_like(scores, 3) == [23, b, a]
    got = default_features(stats, n, scores, n_induction=2)
    assert got == spread + [b, a]  # 23 never fired in the statistics: no page for it
    assert default_features(stats, n, scores, n_induction=1) == spread + [b]
    assert default_features(stats, n) == spread
    # write_dashboards' own default: 20 by density plus the 5 most induction-like, scored here
    from sae_lens_attn.analysis.induction import feature_induction_scores, max_repeat_length

    real = feature_induction_scores(tiny_neox, sae, length=max_repeat_length(tiny_neox))
    monkeypatch.setattr("sae_lens_attn.analysis.dashboard.feature_page", lambda *a, **k: "page")  # only the choice
    files = write_dashboards(tiny_neox, sae, stats, tmp_path)
    want = density_spread(stats, 20)
    want += [f for f in most_induction_like(real, d, exclude=set(want)) if stats.fire_count[f] > 0][:5]
    assert sorted(files.pages) == sorted(want) and len(files.pages) > 5
