"""Adding an analysis takes one module and one registration (``tests/toy_analysis.py``): it becomes a
subcommand with the common flags, prints its parts and writes them as ``--out`` JSON."""

import importlib
import json
import sys

import pytest
import torch

from sae_lens_attn import SAE, SAEConfig, Site
from sae_lens_attn.analysis.registry import ANALYSES, Analysis, register
from sae_lens_attn.frontends.cli import main
from tests.conftest import TEXT


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
