"""The explorer's QK view (``ExplorerSession.qk``, ``POST /api/qk``): the numbers are the analysis API's, every
loaded SAE at an earlier layer gets its feature split, and bad requests get 400 / 422 with a message."""

from __future__ import annotations

import json

import pytest

from sae_lens_attn import Site
from sae_lens_attn.analysis import qk_attribution
from sae_lens_attn.frontends.explorer import ExplorerSession

from .test_explorer import TEXT, random_sae
from .test_explorer_http import _post


@pytest.fixture(scope="module")
def session(tiny_neox):
    saes = [random_sae(tiny_neox, Site(0), 24, 1), random_sae(tiny_neox, Site(0, "attn_out"), 20, 3, k=3),
            random_sae(tiny_neox, Site(1), 32, 2, arch="standard")]
    return ExplorerSession(tiny_neox, saes)


def test_qk_view_is_the_analysis_api(session):
    p = session.prompt(TEXT)
    t, s = p.tokens.shape[1] - 1, 4
    out = session.qk(TEXT, 1, 2, t, s, n_pairs=5)
    ups = [session.saes["L0.z"].sae, session.saes["L0.attn_out"].sae]
    ref = qk_attribution(session.model, p.tokens, 1, 2, t, s, saes=ups)
    assert out["score"] == pytest.approx(ref.score, rel=1e-9) and out["model_score"] == pytest.approx(ref.model_score)
    assert [(r["query"], r["key"]) for r in out["pairs"]] == [(q, k) for q, k, _ in ref.top_pairs(5)]
    assert [r["name"] for r in out["key_totals"]] == [n for n, _ in ref.top("key", 5)]
    assert out["contrast"]["contrast_pos"] == ref.contrast.contrast_pos
    assert out["contrast"]["score"] == pytest.approx(ref.contrast.score, rel=1e-9)
    assert [f["sae"] for f in out["features"]] == ["L0.z", "L0.attn_out"]  # L1.z is not upstream of layer 1
    for got, view in zip(out["features"], ref.features):
        assert got["score"] == pytest.approx(view.score, rel=1e-9)
        assert [r["name"] for r in got["query_totals"]] == [n for n, _ in view.top("query", 5)]
    assert out["query_token"] == session.token_texts([int(p.tokens[0, t])])[0]
    # a chosen contrast position; a layer-0 head has no upstream SAE
    assert session.qk(TEXT, 1, 2, t, s, contrast=1)["contrast"]["contrast_pos"] == 1
    assert session.qk(TEXT, 0, 0, t, s)["features"] == []


def test_qk_route(session):
    from sae_lens_attn.frontends.explorer.server import running

    t = session.prompt(TEXT).tokens.shape[1] - 1
    with running(session) as url:
        code, body = _post(url + "api/qk", {"text": TEXT, "layer": 1, "head": 0, "pos": t, "source": 2})
        assert code == 200 and body["score"] == pytest.approx(session.qk(TEXT, 1, 0, t, 2)["score"], rel=1e-9)
        code, body = _post(url + "api/qk", {"text": TEXT, "layer": 1, "head": 0, "pos": 2, "source": t})
        assert code == 400 and "masked for query position 2" in body["detail"]
        code, body = _post(url + "api/qk", {"text": TEXT, "layer": 1, "head": 9, "pos": t, "source": 2})
        assert code == 400 and "head 9 does not exist" in body["detail"]
        code, body = _post(url + "api/qk", {"text": TEXT, "layer": 1, "head": -1, "pos": t, "source": 2})
        assert code == 422 and "head" in json.dumps(body)
