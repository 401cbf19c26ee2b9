"""Dashboards in a real headless Chromium: pages load from file:// without console errors, plotly draws every
figure, and the screenshot is not blank. Slow; skipped when Chromium is not installed
(Debian: ``apt-get install -y chromium``)."""

import re
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.analysis.dashboard import write_dashboards
from sae_lens_attn.analysis.features import StatsConfig, feature_stats

from .conftest import random_rows

pytestmark = pytest.mark.slow

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


def _chromium(url: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console(stderr: str) -> list[str]:
    """Chromium's console messages (errors, uncaught exceptions, console.* calls) from its log."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def _png_pixels(data: bytes) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) to [h, w, channels] uint8."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    w, h, depth, color = ihdr[:4]
    assert depth == 8 and color in (2, 6), (depth, color)
    ch = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * ch)
    out = np.zeros((h, w * ch), dtype=np.uint8)
    prev = np.zeros(w * ch, dtype=np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) % 256
        else:  # Sub, Average, Paeth depend on the pixel to the left: go pixel by pixel
            cur = np.zeros_like(line)
            for i in range(len(line)):
                a = cur[i - ch] if i >= ch else 0
                b, c = prev[i], prev[i - ch] if i >= ch else 0
                if f == 1:
                    pred = a
                elif f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (line[i] + pred) % 256
        out[y] = cur
        prev = cur
    return out.reshape(h, w, ch)


@pytest.fixture(scope="module")
def pages(tiny_neox, tmp_path_factory):
    model = tiny_neox
    sae = SAE(SAEConfig(d_in=32, d_sae=16, k=4, metadata={"hook_name": Site(1).hook_name}), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    rows = random_rows(model, 8, 24)
    stats = feature_stats(model, sae, rows, cfg=StatsConfig(n_top=6))
    feature = int(stats.fire_count.argmax())
    others = [int(f) for f in (stats.fire_count > 0).nonzero()[:, 0] if int(f) != feature][:4]
    out = tmp_path_factory.mktemp("browser")
    return write_dashboards(model, sae, stats, out, [feature, *others]), feature


@needs_chromium
def test_console_errors_are_detected(tmp_path):
    # the check below can fail: a page with an error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    msgs = _console(_chromium(bad.as_uri(), tmp_path, "--dump-dom").stderr)
    assert any("undefinedFunction is not defined" in m for m in msgs)


@needs_chromium
def test_feature_page_renders_without_errors(pages, tmp_path):
    files, feature = pages
    url = files.pages[feature].as_uri()
    dom = _chromium(url, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console(dom.stderr) == []
    # plotly ran (from the folder's one plotly.min.js): every figure div got its SVG
    assert len(re.findall(r'class="plot-container plotly"', dom.stdout)) == 5
    assert dom.stdout.count('class="main-svg"') >= 5
    shot = tmp_path / "shot.png"
    res = _chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=1000,900", "--hide-scrollbars")
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    assert _console(res.stderr) == []
    px = _png_pixels(shot.read_bytes())[..., :3].astype(np.float64)
    assert px.shape[:2] == (900, 1000)
    assert px.std() > 20  # not a blank page
    non_white = (px.min(-1) < 235).mean()
    assert non_white > 0.05
    coloured = ((px.max(-1) - px.min(-1)) > 60).mean()  # bars, heatmap and token highlights are coloured
    assert coloured > 0.01


@needs_chromium
def test_index_page_renders(pages, tmp_path):
    files, feature = pages
    dom = _chromium(files.index.as_uri(), tmp_path, "--dump-dom")
    assert dom.returncode == 0 and _console(dom.stderr) == []
    assert f'href="feature_{feature}.html"' in dom.stdout
    assert "features shown" in dom.stdout  # the index's script ran


@needs_chromium
def test_index_sorts_and_filters(pages):
    """Click a header: rows sort by its numbers (again: the other way); type in the box: rows filter."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    files, _ = pages
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(files.index.as_uri())

        def column(i):
            return page.locator("#features tbody tr:not([hidden])").evaluate_all(
                f"rows => rows.map(r => parseFloat(r.cells[{i}].dataset.v))")

        n = page.locator("#features tbody tr").count()
        assert n == len(files.pages) >= 3
        page.click("#features th >> text=density")
        dens = column(1)
        assert dens == sorted(dens) and page.get_attribute("#features th >> text=density", "aria-sort") == "ascending"
        page.click("#features th >> text=density")
        assert column(1) == sorted(dens, reverse=True)
        page.click("#features th >> text=feature")
        assert column(0) == sorted(column(0))
        rows = page.locator("#features tbody tr")
        word = rows.nth(0).locator("td").nth(1).inner_text()  # the first row's density, as printed
        page.fill("#filter", word)
        texts = rows.evaluate_all("rs => rs.map(r => [r.hidden, r.textContent])")
        assert all((word.lower() in t.lower()) != hidden for hidden, t in texts)  # shown exactly when it matches
        visible = sum(not h for h, _ in texts)
        assert 1 <= visible < n and f"{visible} of {n} features shown" == page.inner_text("#shown")
        page.fill("#filter", "")
        assert len(column(0)) == n and errors == []
        browser.close()
