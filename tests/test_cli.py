import json

import pytest

from sae_lens_attn import SAE
from sae_lens_attn.frontends.cli import main
from sae_lens_attn.models import SAMPLE_TEXT
from sae_lens_attn.training.config import TrainConfig, field_docs


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "small.txt"
    f.write_text(SAMPLE_TEXT.read_text()[:60_000])
    return f


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, doc in field_docs(TrainConfig).items():
        assert "--" + name.replace("_", "-") in out
        assert " ".join(doc.split()[:4]) in out, name


def test_tiny_training_run_end_to_end(tmp_path, small_text, capsys):
    out_dir = tmp_path / "run"
    rc = main([
        "train", "--dataset", str(small_text), "--tokens", "16384", "--batch-size", "1024", "--eval-rows", "8",
        "--context-size", "64", "--out-dir", str(out_dir), "--progress", "false", "--checkpoint-every", "8",
        "--k", "8", "--expansion-factor", "2",
    ])
    assert rc == 0
    text = capsys.readouterr().out
    assert "CE rec (zero)" in text and str(out_dir.resolve()) in text
    sae = SAE.load(out_dir / "L1.z")
    assert sae.cfg.k == 8 and sae.cfg.d_in == 256 and sae.cfg.d_sae == 512
    assert sae.cfg.metadata["hook_name"] == "blocks.1.attn.hook_z"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics[0]["site"] == "L1.z" and 0 < metrics[0]["l0"] <= 8
    assert (out_dir / "checkpoints" / "step_00000016" / "L1.z" / "cfg.json").exists()
    logs = (out_dir / "log.jsonl").read_text().splitlines()
    assert len(logs) == 2  # steps 10 and 16


def test_unknown_layer_is_reported(small_text, tmp_path, capsys):
    rc = main(["train", "--dataset", str(small_text), "--layers", "5", "--out-dir", str(tmp_path), "--progress", "false"])
    assert rc == 2
    assert "layer 5 does not exist; the model has layers 0..1" in capsys.readouterr().err


def test_empty_dataset_is_reported(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = main(["train", "--dataset", str(empty), "--out-dir", str(tmp_path), "--progress", "false"])
    assert rc == 2
    assert "gave no rows" in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [(["--k", "0"], "--k must be a positive integer"),
                                      (["--site", "mlp"], "invalid choice"),
                                      (["--head", "1", "--site", "attn_out"], "--head needs site 'z'")])
def test_bad_flags(args, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *args])
    assert exc.value.code == 2
    assert msg in capsys.readouterr().err
