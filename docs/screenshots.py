"""Make the README's screenshots: the explorer (docs/img/explorer.png, with the QK panel of the clicked
feature's top head at its top source, also alone as docs/img/qk_panel.png) and a dashboard page
(docs/img/feature_page.png), in Debian's headless chromium driven by Playwright (``pip install playwright``;
no ``playwright install``), made smaller with ``pngquant`` when it is installed.

    python docs/screenshots.py --sae runs/latest/L0.z --sae runs/latest/L1.z

The last SAE's top feature at the clicked token is opened in the explorer; its dashboard pages (of the top
features at that token) are written to a temporary folder unless --dashboards is given.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

LAUNCH = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
          "ROMEO: But soft, what light through yonder window breaks?")


def shrink(path: Path) -> None:
    if shutil.which("pngquant"):
        subprocess.run(["pngquant", "--force", "--skip-if-larger", "--quality", "60-90", "--output", str(path), str(path)],
                       check=False)


def click_top_cell(page, detail: dict) -> None:
    """Click the DFA-by-source heatmap at the top head's largest source: the QK panel opens for that cell."""
    head = detail["top_head"]
    row = detail["dfa_by_source"][head]
    source = max(range(len(row)), key=row.__getitem__)
    page.locator("#plot-dfa-source").scroll_into_view_if_needed()  # mouse clicks land inside the viewport only
    box = page.locator("#plot-dfa-source").bounding_box()
    x, y = page.evaluate("([h, s]) => { const gd = document.getElementById('plot-dfa-source'); "
                         "const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis; "
                         "return [xa._offset + xa.l2p(s), ya._offset + ya.l2p(h)]; }", [head, source])
    page.mouse.click(box["x"] + x, box["y"] + y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", action="append", required=True)
    p.add_argument("--dashboards", default=None, help="dashboard folder of the last SAE (default: write one)")
    p.add_argument("--out", default=str(Path(__file__).parent / "img"))
    p.add_argument("--token", type=int, default=34, help="token position clicked in the explorer")
    p.add_argument("--feature", type=int, default=None,
                   help="dashboard page to show (default: the feature opened in the explorer, if it has one)")
    args = p.parse_args()

    from playwright.sync_api import sync_playwright

    from sae_lens_attn.frontends.explorer import ExplorerSession
    from sae_lens_attn.frontends.explorer.server import running

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dash = args.dashboards
    if dash is None:  # pages for the last SAE's top features at the clicked token, so the link shows
        from sae_lens_attn.frontends.cli import main as cli

        probe = ExplorerSession.from_paths(args.sae[-1:], device="cpu")
        top = probe.analyze(PROMPT)["saes"][0]["features"][args.token]
        dash = tempfile.mkdtemp(prefix="dash-")
        cli(["dashboard", "--sae", args.sae[-1], "--out", dash, "--features", ",".join(map(str, top))])
    session = ExplorerSession.from_paths(args.sae, device="cpu", dashboards=[dash])
    last = list(session.saes)[-1]
    with running(session) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=LAUNCH, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 860})
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#prompt", PROMPT)
        page.click("#analyze")
        page.wait_for_selector(f".sae-panel[data-sae='{last}'] .tok")
        page.click(f".sae-panel[data-sae='{last}'] .tok[data-pos='{args.token}']")
        paged = session.saes[last].dashboard_features
        rows = page.locator(f".sae-panel[data-sae='{last}'] tr.feat-row")
        feats = [int(rows.nth(i).get_attribute("data-feature")) for i in range(rows.count())]
        clicked = next((f for f in feats if f in paged), feats[0])  # one with a dashboard page, if any
        rows.nth(feats.index(clicked)).click()
        page.wait_for_selector("#plot-dfa-source .main-svg")
        click_top_cell(page, session.feature(PROMPT, last, clicked, args.token))
        page.wait_for_selector("#qk-summary")
        page.locator("#qk").screenshot(path=str(out / "qk_panel.png"))
        page.click("#steer-go")
        page.wait_for_selector("#cont-steered", timeout=120_000)
        page.screenshot(path=str(out / "explorer.png"), full_page=True, clip={"x": 0, "y": 0, "width": 1200, "height": 1500})
        feature = args.feature if args.feature is not None else (clicked if clicked in paged else min(paged))
        page.goto((Path(dash).resolve() / f"feature_{feature}.html").as_uri())
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "feature_page.png"), full_page=True, clip={"x": 0, "y": 0, "width": 1200, "height": 1500})
        browser.close()
    for name in ("explorer.png", "feature_page.png", "qk_panel.png"):
        shrink(out / name)
        print(out / name, (out / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
