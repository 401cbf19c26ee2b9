"""The explorer in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python package
with ``executable_path``; no browser is downloaded): type a prompt, click a token and a feature, read the
activations off the page and compare them with the Python API; click a cell of the DFA heatmap and read the
QK attribution panel; colour by a chosen feature; steer; no
console errors; screenshots are not blank. Slow; skipped without Chromium or Playwright."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from sae_lens_attn import Site
from sae_lens_attn.activations import harvest
from sae_lens_attn.analysis import dfa_by_source, qk_attribution
from sae_lens_attn.frontends.explorer import ExplorerSession
from sae_lens_attn.frontends.explorer.server import running
from sae_lens_attn.spec import model_spec

from .test_dashboard_browser import _png_pixels
from .test_explorer import random_sae

pytestmark = pytest.mark.slow

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
LAUNCH = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "ROMEO: But soft, what light through yonder window breaks?\nROMEO: But soft, what light through yonder window"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright; "
                                   "no `playwright install`: the system chromium is used)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(default_model):
    model = default_model
    saes = [random_sae(model, Site(0), 256, 11, k=8), random_sae(model, Site(1), 256, 12, k=8)]
    session = ExplorerSession(model, saes)
    with running(session) as url:
        yield session, url


def _not_blank(png: bytes, shape: tuple[int, int]) -> None:
    px = _png_pixels(png)[..., :3].astype(np.float64)
    assert px.shape[:2] == shape
    assert px.std() > 20 and (px.min(-1) < 235).mean() > 0.05  # text, tables and figures, not an empty page
    assert ((px.max(-1) - px.min(-1)) > 60).mean() > 0.01  # coloured tokens, bars, heatmap


def _reference(model, sae, site: Site, text: str) -> tuple[list[int], torch.Tensor]:
    ids = model_spec(model).tokens.encode(model.tokenizer, text)
    x = harvest(model, torch.tensor([ids]), [site], drop_bos=False).acts[site][0]
    acts = sae.encode(x)
    acts[0] = 0  # BOS: not an SAE input
    return ids, acts


def test_explorer_end_to_end(browser, served, tmp_path):
    session, url = served
    model = session.model
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    assert "sae-lens-attn/shakespeare-2l" in page.inner_text("#model-info")
    page.fill("#prompt", PROMPT)
    page.click("#analyze")
    page.wait_for_selector(".sae-panel[data-sae='L1.z'] .tok")
    sae = session.saes["L1.z"].sae
    ids, acts = _reference(model, sae, Site(1), PROMPT)
    toks = page.locator(".sae-panel[data-sae='L1.z'] .tok")
    assert toks.count() == len(ids)
    # tokens coloured by the strongest feature: each token carries its strongest activation
    shown = [float(v) for v in toks.evaluate_all("els => els.map(e => e.dataset.value)")]
    assert np.allclose(shown, acts.max(-1).values.tolist(), rtol=1e-5, atol=1e-6)
    pos = 14
    page.click(f".sae-panel[data-sae='L1.z'] .tok[data-pos='{pos}']")
    rows = page.locator(".sae-panel[data-sae='L1.z'] tr.feat-row")
    vals, idx = acts[pos].topk(8)
    n = int((vals > 0).sum())
    assert rows.count() == n
    feats = [int(r) for r in rows.evaluate_all("els => els.map(e => e.dataset.feature)")]
    assert feats == idx[:n].tolist()
    texts = page.locator(".sae-panel[data-sae='L1.z'] tr.feat-row td.act").all_inner_texts()
    assert np.allclose([float(t) for t in texts], vals[:n].tolist(), rtol=5e-4)  # as displayed, 4 digits
    # a token and a feature: the detail panel's numbers are the analysis API's
    rows.nth(0).click()
    page.wait_for_selector("#detail-summary")
    page.wait_for_selector("#plot-dfa-source .main-svg")
    f = feats[0]
    ref = dfa_by_source(model, sae, PROMPT, [f], Site(1))
    cells = page.locator("#detail-summary td.num").evaluate_all("els => els.map(e => parseFloat(e.dataset.value))")
    assert cells[0] == pytest.approx(float(ref.acts[0, pos, 0]), rel=1e-5)  # activation
    assert cells[1] == pytest.approx(float(ref.pre[0, pos, 0]), rel=1e-5)  # pre-activation
    assert cells[3] == pytest.approx(float(ref.pre[0, pos, 0]), rel=1e-5)  # DFA by head + bias
    assert page.locator("#plot-dfa-head .main-svg").count() >= 1
    assert "L0" in page.inner_text("#rdfa") and "Upstream features of L0.z" in page.inner_text("#upstream")
    assert "top token" in page.inner_text("#logits")
    # a DFA cell (the top head, its top source) opens that head's QK attribution from this token to that source
    src_dfa = ref.by_source[0, pos, :, : pos + 1, 0]
    head = int(ref.by_head[0, pos, :, 0].argmax())
    source = int(src_dfa[head].argmax())
    page.locator("#plot-dfa-source").scroll_into_view_if_needed()  # mouse clicks land inside the viewport only
    box = page.locator("#plot-dfa-source").bounding_box()
    x, y = page.evaluate("([h, s]) => { const gd = document.getElementById('plot-dfa-source'); "
                         "const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis; "
                         "return [xa._offset + xa.l2p(s), ya._offset + ya.l2p(h)]; }", [head, source])
    page.mouse.click(box["x"] + x, box["y"] + y)
    page.wait_for_selector("#qk-summary")
    qk = qk_attribution(model, PROMPT, 1, head, pos, source, saes=[session.saes["L0.z"].sae])
    assert f"L1H{head} attends from {pos}" in page.inner_text("#qk-title") and f"to {source}" in page.inner_text("#qk-title")
    cells = page.locator("#qk-summary td.num").evaluate_all("els => els.map(e => parseFloat(e.dataset.value))")
    assert cells[0] == pytest.approx(qk.pattern[0], rel=1e-5)  # attention probability
    assert cells[1] == pytest.approx(qk.score, rel=1e-6) and cells[2] == pytest.approx(qk.model_score, rel=1e-5)
    shown_pairs = page.locator("#qk-pairs tr td:first-child").all_inner_texts()
    assert shown_pairs == [q for q, _, _ in qk.top_pairs(12)]
    contrast = float(page.get_attribute("#qk-contrast", "data-value"))
    assert contrast == pytest.approx(qk.contrast.score, rel=1e-6)
    assert "Through L0.z: features on both sides" in page.inner_text("#qk")
    page.screenshot(path=str(tmp_path / "detail.png"))
    _not_blank((tmp_path / "detail.png").read_bytes(), (1000, 1280))
    # colour the tokens by a chosen feature
    panel = ".sae-panel[data-sae='L1.z']"
    page.fill(f"{panel} input.colour-feature", str(f))
    page.click(f"{panel} .colour-by button >> text=colour")
    page.wait_for_function(f"document.querySelector(\"{panel} .colour-label\").textContent === 'feature {f}'")
    shown = [float(v) for v in toks.evaluate_all("els => els.map(e => e.dataset.value)")]
    assert np.allclose(shown, acts[:, f].tolist(), rtol=1e-5, atol=1e-6)
    # steering: the continuation shown is the API's
    page.fill("#steer-coef", "12")
    page.fill("#steer-n", "6")
    page.click("#steer-go")
    page.wait_for_selector("#cont-steered", timeout=60_000)
    want = session.steer(PROMPT, "L1.z", f, 12.0, 6)
    assert page.eval_on_selector("#cont-steered", "e => e.textContent") == want["continuation"]["steered"]
    assert page.eval_on_selector("#cont-clean", "e => e.textContent") == want["continuation"]["clean"]
    page.screenshot(path=str(tmp_path / "full.png"), full_page=True)
    assert (tmp_path / "full.png").stat().st_size > 20_000
    assert problems == []
    # bad input: the server's message on the page; the only console line is Chromium's note of the 400
    page.fill("#prompt", "word " * 400)
    page.click("#analyze")
    page.wait_for_selector("#status.error")
    assert "shorten it" in page.inner_text("#status")
    assert all("status of 400" in p for p in problems), problems
    page.close()


def test_registered_analysis_panel(browser, served):
    """The analyses registered with explorer=True (``analyze`` here) run on the prompt from the page; what the
    page shows is each part's text as the Python API gives it, with the option typed in the form."""
    session, url = served
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    assert "analyze" in page.locator("#analysis-name option").all_inner_texts()
    page.fill("#prompt", PROMPT)
    page.select_option("#analysis-name", "analyze")
    page.select_option("#analysis-sae", "L1.z")
    page.fill("#analysis-options input[data-option='top']", "2")
    page.click("#analysis-run")
    page.wait_for_selector("#analysis-out pre.analysis-part", timeout=120_000)
    shown = page.locator("#analysis-out pre.analysis-part").all_inner_texts()
    want = [p["text"] for p in session.run_analysis("analyze", PROMPT, "L1.z", {"top": 2})["parts"]]
    assert [s.strip() for s in shown] == [w.strip() for w in want]
    page.fill("#analysis-options input[data-option='top']", "2.5")
    page.click("#analysis-run")
    page.wait_for_selector("#analysis-out p.error")
    assert "option 'top' must be int" in page.inner_text("#analysis-out")
    assert not problems, problems
