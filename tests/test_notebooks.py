"""Every notebook in notebooks/ runs top to bottom on the embedded model (nbclient, a real kernel).

SAEs for both layers are trained once here as the main job trains them (``sae-lens-attn train --layers all``:
3M tokens; the circuit notebook's known-circuit assertion needs an SAE of that quality) and handed to the
notebooks through ``SAE_LENS_ATTN_RUN`` / ``SAE_LENS_ATTN_SAE``; the quickstart also runs once without them,
training its own small ones, so that path is covered too.
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
#: A line each notebook must print: evidence it did its job, not only that it did not crash.
EXPECTED = {
    "quickstart": "steered (+6 x feature",
    "head-attribution-and-induction-features": "writes",
    "circuit": "features removes",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from sae_lens_attn.training import TrainConfig, train

    work = tmp_path_factory.mktemp("nb_run")
    train(TrainConfig(layers="0,1", out_dir=str(work / "run"), progress=False, device="cpu"), log=lambda *a: None)
    return work / "run"


def _run(path: Path, cwd: Path) -> str:
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    texts = []
    for cell in book.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            texts.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    return "".join(texts)


def test_every_notebook_is_covered():
    assert {p.stem for p in NOTEBOOKS} == set(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_LENS_ATTN_RUN", str(run_dir))
    monkeypatch.setenv("SAE_LENS_ATTN_SAE", str(run_dir / "L1.z"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = _run(path, tmp_path)
    assert EXPECTED[path.stem] in text


@pytest.mark.slow
def test_quickstart_trains_its_own_sae(tmp_path, monkeypatch):
    monkeypatch.delenv("SAE_LENS_ATTN_SAE", raising=False)
    monkeypatch.delenv("SAE_LENS_ATTN_RUN", raising=False)
    text = _run(next(p for p in NOTEBOOKS if p.stem == "quickstart"), tmp_path)
    assert "256 2048 16 blocks.1.attn.hook_z" in text
