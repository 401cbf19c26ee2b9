"""The explorer's JSON API over real HTTP (uvicorn on a free port in a thread): every endpoint returns the
numbers the session layer and the analysis API give; bad input gets 400/404/422 with a message; the page,
its script and plotly.js are served locally; dashboard pages are served when given. And ``sae-lens-attn
explore`` as a user runs it: a subprocess that prints its URL and answers on it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from sae_lens_attn import Site
from sae_lens_attn.analysis import dfa_by_source
from sae_lens_attn.analysis.dashboard import write_dashboards
from sae_lens_attn.analysis.features import StatsConfig, feature_stats
from sae_lens_attn.frontends.explorer import ExplorerSession
from sae_lens_attn.frontends.explorer.server import running

from .conftest import random_rows
from .test_explorer import TEXT, _by_hand, _close, random_sae

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("content-type", "")


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def served(tiny_neox, tmp_path_factory):
    model = tiny_neox
    saes = [random_sae(model, Site(0), 24, 1), random_sae(model, Site(1), 32, 2, arch="standard")]
    dash = tmp_path_factory.mktemp("dash")
    stats = feature_stats(model, saes[1], random_rows(model, 4, 16), cfg=StatsConfig(n_top=4, n_samples=8))
    firing = [int(f) for f in (stats.fire_count > 0).nonzero()[:, 0][:2]]
    write_dashboards(model, saes[1], stats, dash, firing)
    session = ExplorerSession(model, saes, dashboards=[dash])
    with running(session) as url:
        yield session, url, firing


def test_page_and_assets_are_served_locally(served):
    _, url, _ = served
    status, body, ctype = _get(url)
    page = body.decode()
    assert status == 200 and "text/html" in ctype
    assert '<script src="/static/app.js"' in page and '<script src="/static/plotly.min.js"' in page
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)  # nothing from the network
    status, js, _ = _get(url + "static/app.js")
    assert status == 200 and b"/api/analyze" in js
    status, plotly, ctype = _get(url + "static/plotly.min.js")
    assert status == 200 and len(plotly) > 1_000_000 and b"plotly.js" in plotly[:2000] and "javascript" in ctype
    assert _get(url + "static/style.css")[0] == 200
    assert _get(url + "static/nothing.js")[0] == 404


def test_api_numbers_equal_the_python_api(served, tiny_neox):
    session, url, _ = served
    info = json.loads(_get(url + "api/info")[1])
    assert [s["id"] for s in info["saes"]] == ["L0.z", "L1.z"] and info["saes"][1]["dashboard"]
    code, res = _post(url + "api/analyze", {"text": TEXT, "top_k": 6})
    assert code == 200
    local = session.analyze(TEXT, top_k=6)
    for k in ("tokens", "saes", "n_tokens"):
        assert res[k] == local[k]  # JSON carries the session's numbers exactly
    ids = torch.tensor([[t["id"] for t in res["tokens"]]])
    sae = session.saes["L1.z"].sae
    _, acts = _by_hand(tiny_neox, sae, Site(1), ids)
    got = res["saes"][1]
    for pos in range(1, ids.shape[1]):
        vals, idx = acts[pos].topk(6)
        n = int((vals > 0).sum())
        assert got["features"][pos] == idx[:n].tolist() and _close(got["acts"][pos], vals[:n])
    pos, f = 7, got["features"][7][0]
    code, col = _post(url + "api/activations", {"text": TEXT, "sae": "L1.z", "feature": f})
    assert code == 200 and _close(col["acts"][1:], acts[1:, f])
    code, d = _post(url + "api/feature", {"text": TEXT, "sae": "L1.z", "feature": f, "pos": pos})
    assert code == 200
    ref = dfa_by_source(tiny_neox, sae, TEXT, [f], Site(1))
    assert _close(d["dfa_by_source"], ref.by_source[0, pos, :, : pos + 1, 0])
    assert _close(d["act"], acts[pos, f]) and d["upstream_features"][0]["sae"] == "L0.z"
    code, st = _post(url + "api/steer", {"text": TEXT, "sae": "L1.z", "feature": f, "coefficient": 5.0, "n_tokens": 3})
    assert code == 200 and st == session.steer(TEXT, "L1.z", f, 5.0, 3)
    assert len(st["continuation"]["steered_ids"]) == 3


def test_dashboard_pages_are_linked_and_served(served):
    session, url, firing = served
    code, d = _post(url + "api/feature", {"text": TEXT, "sae": "L1.z", "feature": firing[0], "pos": 3})
    assert d["dashboard"] == f"/dashboards/L1.z/feature_{firing[0]}.html"
    status, body, _ = _get(url + d["dashboard"].lstrip("/"))
    assert status == 200 and f"Feature {firing[0]}".encode() in body
    assert _get(url + "dashboards/L1.z/plotly.min.js")[0] == 200  # the shared script beside the pages
    not_paged = next(i for i in range(32) if i not in firing)
    assert _post(url + "api/activations", {"text": TEXT, "sae": "L1.z", "feature": not_paged})[1]["dashboard"] is None


def test_errors_are_json_with_a_message(served):
    _, url, _ = served
    code, body = _post(url + "api/analyze", {"text": "word " * 100})
    assert code == 400 and "shorten it" in body["detail"]
    code, body = _post(url + "api/activations", {"text": TEXT, "sae": "L9.z", "feature": 0})
    assert code == 404 and "loaded: L0.z, L1.z" in body["detail"]
    code, body = _post(url + "api/feature", {"text": TEXT, "sae": "L1.z", "feature": 99, "pos": 1})
    assert code == 400 and "outside L1.z's features" in body["detail"]
    code, body = _post(url + "api/analyze", {"txt": TEXT})
    assert code == 422 and body["detail"][0]["loc"][-1] == "text"
    code, body = _post(url + "api/analyze", {"text": TEXT, "top_k": 1000})
    assert code == 422


def test_cli_prints_its_url_and_serves(tiny_neox, tiny_neox_dir, tmp_path, capsys):
    sae_dir = random_sae(tiny_neox, Site(1), 16, 5).save(tmp_path / "L1.z")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "sae_lens_attn.frontends.cli", "explore", "--sae", str(sae_dir), "--model",
           tiny_neox_dir, "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = m.group(1)
        for _ in range(100):  # the socket listens before uvicorn's loop runs: wait for the first answer
            try:
                info = json.loads(_get(url + "api/info")[1])
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        assert info["saes"][0]["id"] == "L1.z" and info["saes"][0]["path"] == str(sae_dir)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0
    from sae_lens_attn.frontends.cli import main

    assert main(["explore", "--sae", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sae-lens-attn: error:") and "missing" in err
