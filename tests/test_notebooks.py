"""Every notebook in notebooks/ runs top to bottom on the embedded model (nbclient, a real kernel).

One small SAE is trained once here and handed to the notebooks through ``SAE_LENS_ATTN_SAE``; the quickstart
also runs once without it, training its own, so that path is covered too.
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
#: A line each notebook must print: evidence it did its job, not only that it did not crash.
EXPECTED = {
    "quickstart": "= heads + bias",
    "head-attribution-and-induction-features": "largest second step: L0H",
    "circuit": "attribution patching predicted",
}


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    from sae_lens_attn.models import SAMPLE_TEXT
    from sae_lens_attn.training import TrainConfig, train

    work = tmp_path_factory.mktemp("nb_sae")
    (work / "text.txt").write_text(SAMPLE_TEXT.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    train(TrainConfig(dataset=str(work / "text.txt"), layers="1", k=16, expansion_factor=2, tokens=40_000,
                      batch_size=1024, eval_rows=4, out_dir=str(work / "run"), progress=False, checkpoint_every=0,
                      device="cpu"), log=lambda *a: None)
    return work / "run" / "L1.z"


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
def test_notebook_runs(path, sae_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_LENS_ATTN_SAE", str(sae_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = _run(path, tmp_path)
    assert EXPECTED[path.stem] in text


@pytest.mark.slow
def test_quickstart_trains_its_own_sae(tmp_path, monkeypatch):
    monkeypatch.delenv("SAE_LENS_ATTN_SAE", raising=False)
    text = _run(next(p for p in NOTEBOOKS if p.stem == "quickstart"), tmp_path)
    assert "256 512 16 blocks.1.attn.hook_z" in text
