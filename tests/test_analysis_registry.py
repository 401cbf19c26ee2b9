"""Adding an analysis takes one module and one registration (``tests/toy_analysis.py``): it becomes a
subcommand with the common flags, prints its parts and writes them as ``--out`` JSON."""

import importlib
import json
import sys

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.activations import harvest
from sae_lens_attn.analysis.registry import ANALYSES, Analysis, register
from sae_lens_attn.errors import InputError
from sae_lens_attn.frontends.cli import main
from sae_lens_attn.frontends.explorer import ExplorerSession
from sae_lens_attn.spec import model_spec
from tests.conftest import TEXT
from tests.test_explorer import random_sae
from tests.test_explorer_http import _post


@pytest.fixture
def toy():
    """The toy module imported (so registered) for one test, and the registry as it was afterwards."""
    before = dict(ANALYSES)
    sys.modules.pop("tests.toy_analysis", None)
    yield importlib.import_module("tests.toy_analysis").TOY
    ANALYSES.clear()
    ANALYSES.update(before)


@pytest.fixture(scope="module")
def saved(tiny_neox_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    site = Site(1)
    sae = SAE(SAEConfig(d_in=32, d_sae=24, k=4, metadata={"hook_name": site.hook_name, "model_name": tiny_neox_dir,
                                                          "context_size": 32}), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    sae.save(root / "sae")
    (root / "text.txt").write_text(TEXT * 4)
    return root


def test_a_registered_analysis_is_a_subcommand_with_json(toy, saved, capsys):
    out = saved / "toy.json"
    rc = main(["toy-densest", "--sae", str(saved / "sae"), "--dataset", str(saved / "text.txt"), "--tokens", "256",
               "--n", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert len(report["densest"]) == 2 and report["n_tokens"] > 0
    assert f"densest features: {report['densest']}" in printed


def test_it_is_listed_with_its_flags(toy, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "toy-densest" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["toy-densest", "--help"])
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--sae", "--dataset", "--tokens", "--n ", "--out"))


def test_its_bad_input_is_a_user_error(toy, saved, capsys):
    rc = main(["toy-densest", "--sae", str(saved / "nowhere"), "--tokens", "256"])
    assert rc == 2 and capsys.readouterr().err.startswith("sae-lens-attn: error: ")


def test_a_taken_name_is_refused(toy):
    with pytest.raises(ValueError, match="already registered"):
        register(Analysis("toy-densest", lambda ctx: iter(())))
    assert ANALYSES["toy-densest"] is toy


def _densest_by_hand(model, sae, site, text: str, n: int) -> list[int]:
    """The toy's answer computed here: encode the prompt's non-BOS activations, count firing tokens."""
    ids = model_spec(model).tokens.encode(model.tokenizer, text)
    x = harvest(model, torch.tensor([ids]), [site], drop_bos=False).acts[site][0]
    keep = model_spec(model).tokens.keep(torch.tensor(ids))
    fires = (sae.encode(x[keep]) > 0).sum(0)
    return fires.topk(n).indices.tolist()


def test_an_explorer_analysis_is_a_panel_with_its_options(toy, tiny_neox):
    sae = random_sae(tiny_neox, Site(1), 24, 5)
    session = ExplorerSession(tiny_neox, [sae])
    listed = {a["name"]: a for a in session.info()["analyses"]}
    assert listed["toy-densest"]["options"] == [{"name": "n", "flag": "--n", "type": "int", "default": 3,
                                                 "help": "features listed"}]
    assert "analyze" in listed  # the main analysis is a panel too
    r = session.run_analysis("toy-densest", TEXT[:120], "L1.z", {"n": 4})
    want = _densest_by_hand(tiny_neox, sae, Site(1), TEXT[:120], 4)
    assert r["parts"] == [{"text": f"densest features: {want}", "data": {"densest": want, "n_tokens": r["parts"][0]["data"]["n_tokens"]}}]
    assert r["parts"][0]["data"]["n_tokens"] == len(model_spec(tiny_neox).tokens.encode(tiny_neox.tokenizer, TEXT[:120])) - 1
    assert session.run_analysis("toy-densest", TEXT[:120], "L1.z")["parts"][0]["data"]["densest"] == want[:3]  # default --n


def test_explorer_analysis_bad_input_names_the_problem(toy, tiny_neox):
    session = ExplorerSession(tiny_neox, [random_sae(tiny_neox, Site(1), 24, 5)])
    with pytest.raises(InputError, match="no option 'm'; its options: n"):
        session.run_analysis("toy-densest", TEXT[:100], "L1.z", {"m": 2})
    with pytest.raises(InputError, match="option 'n' must be int, got 2.5"):
        session.run_analysis("toy-densest", TEXT[:100], "L1.z", {"n": 2.5})
    with pytest.raises(InputError, match="no explorer analysis 'nope'"):
        session.run_analysis("nope", TEXT[:100], "L1.z")


def test_explorer_analysis_over_http(toy, tiny_neox):
    pytest.importorskip("fastapi")
    from sae_lens_attn.frontends.explorer.server import running

    sae = random_sae(tiny_neox, Site(1), 24, 5)
    session = ExplorerSession(tiny_neox, [sae])
    with running(session) as url:
        code, body = _post(url + "api/run", {"text": TEXT[:120], "sae": "L1.z", "analysis": "toy-densest", "options": {"n": 2}})
        assert code == 200 and body["parts"][0]["data"]["densest"] == _densest_by_hand(tiny_neox, sae, Site(1), TEXT[:120], 2)
        code, body = _post(url + "api/run", {"text": TEXT[:120], "sae": "L1.z", "analysis": "toy-densest", "options": {"n": "x"}})
        assert code == 400 and "option 'n' must be int" in body["detail"]
        code, body = _post(url + "api/run", {"text": TEXT[:120], "sae": "L9.z", "analysis": "toy-densest"})
        assert code == 404 and "no SAE 'L9.z'" in body["detail"]


def test_an_option_under_its_minimum_is_refused_naming_it(saved, capsys, tiny_neox):
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", "--sae", str(saved / "sae"), "--n-seq", "0"])
    assert exit_.value.code == 2 and "--n-seq must be >= 1, got 0" in capsys.readouterr().err
    session = ExplorerSession(tiny_neox, [random_sae(tiny_neox, Site(1), 24, 5)])
    with pytest.raises(InputError, match="option 'induction_length': --induction-length must be >= 2, got 1"):
        session.run_analysis("analyze", TEXT[:100], "L1.z", {"induction_length": 1})
