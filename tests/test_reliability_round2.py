"""Nothing lost, round two (issue 21): one writer per run directory, damaged manifests named as damage, SAEs
that load where they are used, SAE files checked before anything is allocated, and the analysis CLI's
checks before the model loads. Through the CLI wherever a user meets the case; the explorer's cases are in
``tests/test_explorer_hostile.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_lens_attn.data import token_rows
from sae_lens_attn.devices import DeviceError
from sae_lens_attn.frontends.cli import main
from sae_lens_attn.models import token_policy
from sae_lens_attn.sae import SAE, NonFiniteOutputError, SAEConfig, SAEFileError
from sae_lens_attn.saes.pretrained import pretrained_saes
from sae_lens_attn.sites import Site
from sae_lens_attn.training.config import TrainConfig
from sae_lens_attn.training.distributed import Dist
from sae_lens_attn.training.run import _start_run
from sae_lens_attn.training.rundir import LOCK_FILENAME, lock_run_dir, release_run_dir
from sae_lens_attn.training.trainer import latest_checkpoint
from tests.conftest import TEXT
from tests.test_pretrained import KK, _weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "text.txt"
    f.write_text(TEXT * 40)
    return f


def _argv(model_dir, text_file, out_dir, steps: int, every: int = 20) -> list[str]:
    return ["train", "--model", str(model_dir), "--dataset", str(text_file), "--out-dir", str(out_dir), "--tokens",
            str(64 * steps), "--batch-size", "64", "--context-size", "32", "--eval-rows", "4", "--k", "4",
            "--expansion-factor", "1", "--checkpoint-every", str(every), "--log-every", "10", "--progress", "false"]


def _errors(text: str) -> list[str]:
    """The CLI's error lines (never a traceback)."""
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if line.startswith("sae-lens-attn: error")]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILENAME}


def _no_model(*a, **k):
    raise AssertionError("the model was loaded before the input was checked")


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ------------------------------------------------------------------------------- 1: one writer per folder


def test_a_second_run_into_a_live_runs_folder_is_refused_by_pid(tiny_neox_dir, text_file, tmp_path, monkeypatch,
                                                                capsys):
    """Issue case 1 with two real processes: the first run (a subprocess) is frozen (SIGSTOP) right after its
    first checkpoint, holding the folder. A second run into it from this process -- fresh, --overwrite,
    --resume -- is refused naming the first's pid, before its model loads, and touches nothing; the first
    then finishes as one consistent run."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "sae_lens_attn.training.cli",
                              *_argv(tiny_neox_dir, text_file, out, steps=100)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    monkeypatch.setattr("sae_lens_attn.training.run.load_model", _no_model)
    try:
        _wait_for(lambda: latest_checkpoint(out) is not None, first, "its first checkpoint")
        os.kill(first.pid, signal.SIGSTOP)
        assert (out / LOCK_FILENAME).read_text() == f"{first.pid}\n"
        before = _snapshot(out)
        for extra, also in (([], ""), (["--overwrite", "true"], " --overwrite does not delete a folder a live run "
                                                                 "is writing."), (["--resume", "true"], "")):
            assert main([*_argv(tiny_neox_dir, text_file, out, steps=50), "--seed", "1", *extra]) == 2
            assert _errors(capsys.readouterr().err) == [
                f"sae-lens-attn: error: {out} is being written by another training run (pid {first.pid}, holding "
                f"{out / LOCK_FILENAME}); two runs in one folder would overwrite each other's checkpoints and "
                f"SAEs.{also} Wait for that run to end (or stop it), or train into a new --out-dir"]
            assert _snapshot(out) == before, extra  # nothing written, nothing deleted
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    run_id = json.loads((out / "train_config.json").read_text())["run_id"]
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == [f"step_{s:08d}" for s in range(20, 101, 20)]
    assert {json.loads((p / "manifest.json").read_text())["run_id"] for p in ckpts} == {run_id}
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 101, 10))  # one run's log, every record once
    SAE.load(out / "L1.z")


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    """SIGKILL gives no chance to clean up: the kernel drops the flock with the process, so the next run
    takes the folder at once (the pid left in the file is only a record)."""
    out = tmp_path / "run"
    out.mkdir()
    code = ("import sys, time; from pathlib import Path; from sae_lens_attn.training.rundir import lock_run_dir; "
            "lock_run_dir(Path(sys.argv[1])); print('LOCKED', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline() == "LOCKED\n"
        with pytest.raises(ValueError, match=rf"\(pid {holder.pid}, holding"):
            lock_run_dir(out)
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_FILENAME).read_text() == f"{holder.pid}\n"
    assert lock_run_dir(out) is True
    try:
        assert (out / LOCK_FILENAME).read_text() == f"{os.getpid()}\n"
        assert lock_run_dir(out) is False  # this thread holds it already
    finally:
        release_run_dir(out)


def test_only_rank_0_takes_the_lock(tmp_path):
    """Under torchrun only rank 0 prepares (and so locks) the folder; the others wait for its decision."""
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), progress=False)
    worker = Dist()
    worker.rank = 1
    assert _start_run(cfg, worker, log=lambda *a: None) is None
    assert not (tmp_path / "run").exists()
    try:
        assert _start_run(cfg, Dist(), log=lambda *a: None).checkpoint is None
        assert (tmp_path / "run" / LOCK_FILENAME).read_text() == f"{os.getpid()}\n"
    finally:
        release_run_dir(tmp_path / "run")


# ----------------------------------------------------------------------------- 2: damaged manifests


@pytest.fixture(scope="module")
def two_checkpoints(tiny_neox_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpts") / "run"
    assert main(_argv(tiny_neox_dir, text_file, out, steps=40)) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000020", "step_00000040"]
    return out


def _damage(manifest: Path, how: str) -> None:
    good = manifest.read_bytes()
    if how == "deleted":
        manifest.unlink()
    elif how == "emptied":
        manifest.write_bytes(b"")
    elif how == "truncated":
        manifest.write_bytes(good[:100])
    elif how == "garbage":
        manifest.write_bytes(b"\x00\xff" * 50)
    else:
        manifest.write_text(json.dumps({"run_id": "x"}))


@pytest.mark.parametrize("how,said", [
    ("deleted", "is missing"), ("emptied", r"is empty \(0 bytes\)"),
    ("truncated", r"is not valid JSON \(100 bytes, .*\): it is truncated or corrupted"),
    ("garbage", r"is not valid JSON \(100 bytes, .*\): it is truncated or corrupted"),
    ("not a manifest", r"is not a checkpoint manifest \(no 'files' table\)"),
])
def test_a_damaged_manifest_is_named_as_damage_not_a_second_run(two_checkpoints, tiny_neox_dir, text_file, how, said,
                                                                tmp_path, monkeypatch, capsys):
    """Issue case 2: today this said the folder "mixes two runs ... Pass --overwrite true", which deletes
    the good step_20. Now: the damaged step is named, with the one folder to delete; nothing is touched."""
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    last = out / "checkpoints" / "step_00000040"
    _damage(last / "manifest.json", how)
    before = _snapshot(out)
    monkeypatch.setattr("sae_lens_attn.training.run.load_model", _no_model)
    capsys.readouterr()
    assert main([*_argv(tiny_neox_dir, text_file, out, steps=40), "--resume", "true"]) == 2
    [err] = _errors(capsys.readouterr().err)
    assert re.fullmatch(
        rf"sae-lens-attn: error: --resume: {re.escape(str(last))}, the latest checkpoint of the run in "
        rf"{re.escape(str(out))}, is damaged: its manifest\.json {said}, so its files cannot be verified; delete "
        rf"{re.escape(str(last))} \(only that folder\) and rerun with --resume true to resume from the previous "
        r"checkpoint, step_00000020", err), err
    assert "two runs" not in err and "--overwrite" not in err
    assert _snapshot(out) == before
    if how != "emptied":
        return
    shutil.rmtree(last)  # the advice, followed: the run continues from step 20, nothing good lost
    monkeypatch.undo()
    assert main([*_argv(tiny_neox_dir, text_file, out, steps=40), "--resume", "true"]) == 0
    assert f"resumed from {out / 'checkpoints' / 'step_00000020'} at step 20/40" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000020", "step_00000040"]


def test_a_damaged_only_checkpoint_says_the_run_restarts(two_checkpoints, tiny_neox_dir, text_file, tmp_path,
                                                         monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    shutil.rmtree(out / "checkpoints" / "step_00000020")
    (out / "checkpoints" / "step_00000040" / "manifest.json").write_bytes(b"")
    monkeypatch.setattr("sae_lens_attn.training.run.load_model", _no_model)
    assert main([*_argv(tiny_neox_dir, text_file, out, steps=40), "--resume", "true"]) == 2
    [err] = _errors(capsys.readouterr().err)
    assert err.endswith("(only that folder) and rerun with --resume true: it is the run's only checkpoint, so the "
                        "run starts again from step 0 with the same settings"), err


# ---------------------------------------------------------------------- 3: SAEs load where they are used


def _small_sae(d_in: int = 8, d_sae: int = 32, k: int = 4, metadata: dict | None = None) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=metadata or {}), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return sae


def _edit_cfg(sae_dir: Path, **changes) -> None:
    f = sae_dir / "cfg.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def test_an_sae_trained_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """Issue case 3: cfg.json records the training device; loading used it (AssertionError: Torch not compiled
    with CUDA enabled). Now the CPU unless a device is given, and any dtype asked for."""
    sae = _small_sae()
    sae.save(tmp_path / "sae")
    _edit_cfg(tmp_path / "sae", device="cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a laptop, even on a GPU machine
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg.device == "cpu" and {p.device.type for p in loaded.parameters()} == {"cpu"}
    for name, p in sae.named_parameters():
        assert torch.equal(p, dict(loaded.named_parameters())[name]), name
    wide = SAE.load(tmp_path / "sae", dtype="float64")
    assert wide.cfg.dtype == "float64" and wide.W_dec.dtype == torch.float64
    assert torch.equal(wide.W_enc, sae.W_enc.double())
    assert SAE.load(tmp_path / "sae", dtype=torch.float16).W_dec.dtype == torch.float16
    with pytest.raises(DeviceError, match=r"^device 'cuda:3': .*use device 'cpu'"):
        SAE.load(tmp_path / "sae", device="cuda:3")
    with pytest.raises(ValueError, match=r"SAEConfig\.dtype must be a floating-point dtype .*got 'int8'"):
        SAE.load(tmp_path / "sae", dtype="int8")


def test_from_pretrained_loads_on_the_cpu_in_the_dtype_asked(tmp_path):
    path = pretrained_saes(KK)["blocks.5.hook_z"]
    t = _weights(32, 64, 0)
    torch.save(t, tmp_path / path)
    (tmp_path / path.replace(".pt", "_cfg.json")).write_text(json.dumps(
        {"act_size": 32, "dict_size": 64, "act_name": "blocks.5.attn.hook_z", "layer": 5, "device": "cuda:0"}))
    sae = SAE.from_pretrained(KK, "blocks.5.hook_z", local_dir=tmp_path, dtype="float64")
    assert sae.W_enc.device.type == "cpu" and sae.W_enc.dtype == torch.float64
    assert torch.equal(sae.W_enc, t["W_enc"].double()) and sae.source == str(tmp_path / path)


# --------------------------------------------------------------- 4: files checked before any allocation


@pytest.mark.parametrize("field,value,msg", [
    ("d_sae", 10**9, r"sae_weights\.safetensors: W_enc has shape \(8, 32\) but cfg\.json \(d_in=8, d_sae=1000000000\) "
                     r"needs \(8, 1000000000\); the config and the weights are of different SAEs"),
    ("d_sae", 2**20, r"W_enc has shape \(8, 32\) but cfg\.json \(d_in=8, d_sae=1048576\) needs \(8, 1048576\)"),
    ("d_sae", 10**12, r"cfg\.json: d_sae must be a positive integer of at most 1,073,741,824, got 1000000000000"),
    ("d_sae", 1e9, r"cfg\.json: d_sae must be a positive integer of at most 1,073,741,824, got 1000000000\.0"),
    ("d_in", True, r"cfg\.json: d_in must be a positive integer .*got True"),
    ("k", "4", r"cfg\.json: k must be a positive integer .*got '4'"),
    ("dtype", "int8", r"cfg\.json: SAEConfig\.dtype must be a floating-point dtype \(float32, float64, float16 or "
                      r"bfloat16\), got 'int8'"),
    ("dtype", "Tensor", r"SAEConfig\.dtype must be a floating-point dtype .*got 'Tensor'"),
    ("apply_b_dec_to_input", "no", r"cfg\.json: apply_b_dec_to_input must be true or false \(a JSON boolean\), "
                                   r"got 'no'"),
    ("apply_b_dec_to_input", 0, r"apply_b_dec_to_input must be true or false \(a JSON boolean\), got 0"),
    ("rescale_acts_by_decoder_norm", "false", r"rescale_acts_by_decoder_norm must be true or false"),
])
def test_hostile_config_values_are_refused_before_anything_is_allocated(field, value, msg, tmp_path, monkeypatch,
                                                                        capsys):
    """Issue case 4: d_sae 1e9 / 1e12 reached the allocator (a size that fits allocated gigabytes first),
    int8 failed inside autograd, "no" loaded as True. The safetensors header is checked against cfg.json
    before the data is read, and every parameter is built on the meta device until the shapes agree."""
    _small_sae().save(tmp_path / "sae")
    _edit_cfg(tmp_path / "sae", **{field: value})
    real_empty = SAE._empty

    def meta_only(self, *shape, **kw):
        assert self.cfg.device == "meta", f"allocated {shape} on {self.cfg.device} before the check"
        return real_empty(self, *shape, **kw)

    monkeypatch.setattr(SAE, "_empty", meta_only)
    monkeypatch.setattr("sae_lens_attn.saes.loading.read_tensors", _no_model)  # the data is never read
    with pytest.raises(SAEFileError, match=msg):
        SAE.load(tmp_path / "sae")
    monkeypatch.setattr("sae_lens_attn.models.load_model", _no_model)
    assert main(["analyze", "--sae", str(tmp_path / "sae"), "--tokens", "64"]) == 2  # one line, before the model
    [err] = _errors(capsys.readouterr().err)
    assert re.search(msg, err) and str(tmp_path / "sae") in err, err


def test_weights_that_are_not_floats_are_refused_from_the_header(tmp_path, monkeypatch):
    sae = _small_sae()
    sae.save(tmp_path / "sae")
    tensors = {n: t.detach().contiguous() for n, t in sae.state_dict().items()}
    tensors["W_enc"] = tensors["W_enc"].to(torch.int8)
    save_file(tensors, str(tmp_path / "sae" / "sae_weights.safetensors"))
    monkeypatch.setattr("sae_lens_attn.saes.loading.read_tensors", _no_model)
    with pytest.raises(SAEFileError, match=r"sae_weights\.safetensors: W_enc holds I8 values; SAE weights are floating "
                                           r"point, so the file is damaged or not an SAE"):
        SAE.load(tmp_path / "sae")


def test_finite_weights_that_overflow_are_named_when_they_first_appear(tiny_neox, tiny_neox_dir, tmp_path, capsys):
    """Issue case 4: weights up to 3e38 are finite float32, but x @ W_enc is not: encode, decode and sae(x)
    now name the SAE and the fix; the same file loaded in float64 computes what the test computes."""
    site = Site(1)
    sae = _small_sae(d_in=32, metadata={"hook_name": site.hook_name, "model_name": tiny_neox_dir})
    with torch.no_grad():  # columns of both signs and a large centring: every input overflows some latent
        sae.W_enc.copy_(torch.linspace(3e38, 1.5e38, 32) * torch.tensor([1.0, -1.0]).repeat(16))
        sae.b_dec.fill_(-10.0)
        sae.W_dec.abs_()  # so that large activations add up in decode
    where = tmp_path / "L1.z"
    sae.save(where)
    loaded = SAE.load(where)  # finite weights: they load
    x = torch.ones(3, 32)
    fix = re.escape(f"{where}: ") + r"{}" + re.escape(" gave inf/NaN from finite input: its weights (largest |w| 3e+38) "
                                                      "overflow float32. Compute in a wider dtype (SAE.load(path, "
                                                      "dtype='float64') or sae.to(torch.float64)), or check the weights")
    with pytest.raises(NonFiniteOutputError, match=fix.format("encode")):
        loaded.encode(x)
    with pytest.raises(NonFiniteOutputError, match=fix.format("forward")):
        loaded(x)
    with pytest.raises(NonFiniteOutputError, match=fix.format("decode")):
        loaded.decode(torch.full((3, 32), 3e38))
    assert not torch.isfinite(loaded.encode(torch.full((3, 32), float("nan")))).all()  # NaN in: not the SAE's doing
    wide = SAE.load(where, dtype="float64")
    pre = (x.double() - wide.b_dec) @ wide.W_enc + wide.b_enc
    vals, idx = pre.topk(4, dim=-1)
    want = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    assert torch.equal(wide.encode(x), want) and torch.isfinite(wide(x)).all()
    rc = main(["analyze", "--sae", str(where), "--model", tiny_neox_dir, "--tokens", "64", "--top", "1", "--n-seq", "2",
               "--induction-length", "4"])
    [err] = _errors(capsys.readouterr().err)
    assert rc == 2 and re.search(fix.format("encode"), err), err


# ------------------------------------------------------------------------------- 8: the analysis CLI


def test_analyze_checks_the_model_name_before_loading_anything(tiny_neox_dir, tmp_path, monkeypatch, capsys):
    """Issue case 8: `analyze --model gpt2` on an SAE of another model went to the network first."""
    _small_sae(d_in=32, metadata={"hook_name": "blocks.1.attn.hook_z", "model_name": tiny_neox_dir}).save(tmp_path / "s")
    monkeypatch.setattr("sae_lens_attn.models.load_model", _no_model)
    for cmd in ("analyze", "dashboard"):
        assert main([cmd, "--sae", str(tmp_path / "s"), "--model", "gpt2", "--tokens", "64"]) == 2
        [err] = _errors(capsys.readouterr().err)
        assert err == (f"sae-lens-attn: error: this SAE was trained elsewhere: model {tiny_neox_dir!r} (its metadata's "
                       "model_name), not --model 'gpt2'. Leave --model out to load its own model, or pass "
                       "--allow-transfer for a deliberate transfer experiment")


def test_dashboard_says_when_the_dataset_is_shorter_than_tokens(tiny_neox, tiny_neox_dir, tmp_path, capsys):
    _small_sae(d_in=32, metadata={"hook_name": "blocks.1.attn.hook_z", "model_name": tiny_neox_dir}).save(tmp_path / "s")
    short = tmp_path / "short.txt"
    short.write_text(TEXT * 2)
    rows = token_rows(str(short), tiny_neox.tokenizer, 32, token_policy(tiny_neox), max_rows=4096 // 32)
    assert 0 < rows.numel() < 4096
    rc = main(["dashboard", "--sae", str(tmp_path / "s"), "--dataset", str(short), "--tokens", "4096",
               "--context-size", "32", "--features", "0,1", "--n-induction", "0", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 0 and (
        f"sae-lens-attn: warning: the dataset {short} holds only {rows.numel():,} tokens ({rows.shape[0]} rows of "
        "32), fewer than --tokens 4,096; the statistics use those. Give a larger --dataset for the full budget"
    ) in err.splitlines(), err
    assert main(["dashboard", "--sae", str(tmp_path / "s"), "--dataset", str(short), "--tokens", str(rows.numel()),
                 "--context-size", "32", "--features", "0", "--n-induction", "0", "--out", str(tmp_path / "e")]) == 0
    assert "warning: the dataset" not in capsys.readouterr().err  # exactly enough: nothing to say
