"""Nothing lost, nothing silent (issue 13): run directories, full disks, signals, wrong inputs, file modes.

Each case of the issue is reproduced here (or in the test file named in the README's reliability section)
and gets a clear one-line error or a safe outcome.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import sae_lens_attn.files as files
from sae_lens_attn.activations import SiteBatch
from sae_lens_attn.data import NotTextError, read_text_file, token_rows
from sae_lens_attn.devices import DeviceError, check_device
from sae_lens_attn.evals import evaluate_sae
from sae_lens_attn.files import WriteError, write_text
from sae_lens_attn.frontends.cli import main
from sae_lens_attn.interop import load_sae
from sae_lens_attn.models import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME
from sae_lens_attn.provenance import SiteMismatchError, same_model, transfer_allowed
from sae_lens_attn.sae import SAE, SAEConfig, SAEFileError
from sae_lens_attn.sites import Site
from sae_lens_attn.training.config import TrainConfig
from sae_lens_attn.training.preempt import TrainingInterrupted, resume_command
from sae_lens_attn.training.run import memory_batches, train
from sae_lens_attn.training.rundir import RunDirError
from sae_lens_attn.training.trainer import (
    CheckpointError,
    OptimConfig,
    Trainer,
    latest_checkpoint,
    load_trainer_state,
    verify_checkpoint,
)
from tests.conftest import TEXT
from tests.faults import WriteFault

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "text.txt"
    f.write_text(TEXT * 40)
    return f


def _cfg(model_dir, text_file, out_dir, steps=60, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), dataset=str(text_file), out_dir=str(out_dir), tokens=64 * steps, batch_size=64,
                context_size=32, eval_rows=4, k=4, expansion_factor=1, checkpoint_every=20, progress=False)
    return TrainConfig(**{**base, **kw})


def _weights(sae_dir: Path) -> dict[str, torch.Tensor]:
    return dict(SAE.load(sae_dir).named_parameters())


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- 1, 2: run directories


def test_resume_never_continues_an_older_run(tiny_neox_dir, text_file, tmp_path):
    """Issue case 1 (and 2): a 60-step run, then a fresh 20-step run with another lr into the same directory,
    then --resume. Today's code finished the fresh run over the old one and then resumed the *old* run's
    step_60. Now the fresh run is refused, nothing of the old run is touched, and after --overwrite the
    resume continues the new run only."""
    out = tmp_path / "x"
    train(_cfg(tiny_neox_dir, text_file, out, steps=60), **QUIET)
    old = _weights(out / "L1.z")
    assert latest_checkpoint(out).name == "step_00000060"
    run_id = json.loads((out / "train_config.json").read_text())["run_id"]
    assert len(run_id) == 32 and json.loads((latest_checkpoint(out) / "manifest.json").read_text())["run_id"] == run_id
    assert load_trainer_state(latest_checkpoint(out))["run_id"] == run_id

    fresh = _cfg(tiny_neox_dir, text_file, out, steps=20, lr=1e-3)
    with pytest.raises(RunDirError, match=r"already holds a training run \(L1\.z/, checkpoints/, log\.jsonl, "
                                          r"metrics\.json, train_config\.json\): pass --resume true.*--overwrite true"):
        train(fresh, **QUIET)
    assert _equal(_weights(out / "L1.z"), old)  # the refused run wrote nothing
    with pytest.raises(RunDirError, match=r"other settings \(--lr: checkpointed run 0\.002, now 0\.001; --tokens: "
                                          r"checkpointed run 3840, now 1280\)"):
        train(TrainConfig(**{**fresh.__dict__, "resume": True}), **QUIET)

    (out / "notes.txt").write_text("mine")  # not a run file: --overwrite leaves it alone
    train(TrainConfig(**{**fresh.__dict__, "overwrite": True}), **QUIET)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000020"]
    new = _weights(out / "L1.z")
    new_id = json.loads((out / "train_config.json").read_text())["run_id"]
    assert new_id != run_id and not _equal(new, old)
    logs = []
    train(TrainConfig(**{**fresh.__dict__, "resume": True}), log=logs.append)
    assert any("at step 20/20" in line for line in logs) and not any("step_00000060" in line for line in logs)
    assert _equal(_weights(out / "L1.z"), new)
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [10, 20]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, monkeypatch):
    """A directory whose checkpoints belong to another run than its train_config.json (as today's code left
    it after case 1) is refused, naming both run ids, before the model loads."""
    monkeypatch.setattr("sae_lens_attn.training.run.load_model", _no_model)
    out = tmp_path / "x"
    tr = Trainer({Site(0): _small_sae()}, OptimConfig(steps=2, warmup_steps=0, checkpoint_every=2), out, run_id="b" * 32)
    tr.fit(_stream())
    cfg = TrainConfig(out_dir=str(out), tokens=64 * 20, batch_size=64, progress=False, resume=True)
    config = {**cfg.__dict__, "run_id": "a" * 32}
    (out / "train_config.json").write_text(json.dumps(config))
    with pytest.raises(RunDirError, match=r"step_00000002 belongs to run b{32}, but .*train_config\.json is run a{32}: "
                                          r".* mixes two runs, and resuming would continue the wrong one.*--overwrite true"):
        train(cfg, **QUIET)
    # a directory from before run ids: a checkpoint beyond the configured steps cannot be this run's
    (out / "train_config.json").write_text(json.dumps({**config, "run_id": None, "tokens": 64}))
    manifest = latest_checkpoint(out) / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "run_id": None}))
    with pytest.raises(RunDirError, match=r"step_00000002 is at step 2, beyond the 1 steps of the run"):
        train(TrainConfig(**{**cfg.__dict__, "tokens": 64}), **QUIET)


def test_trainer_restore_checks_the_run_id(tmp_path):
    tr = Trainer({Site(0): _small_sae()}, OptimConfig(steps=2, warmup_steps=0, checkpoint_every=2), tmp_path,
                 run_id="a" * 32)
    tr.fit(_stream())
    other = Trainer({Site(0): _small_sae()}, OptimConfig(steps=2), tmp_path, run_id="b" * 32)
    with pytest.raises(CheckpointError, match=r"step_00000002 belongs to run 'a{32}', not to this run 'b{32}'"):
        other.restore(latest_checkpoint(tmp_path))


def test_out_dir_problems_name_the_fix_before_the_model_loads(tmp_path, monkeypatch):
    """Issue case 8: EEXIST (out dir is a file), EROFS and EACCES name the fix, and cost no model load."""
    monkeypatch.setattr("sae_lens_attn.training.run.load_model", _no_model)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WriteError, match=rf"could not write directory {blocker}: File exists \(EEXIST\); {blocker} "
                                         r"is a file, not a directory: move or delete it, or choose another"):
        train(TrainConfig(out_dir=str(blocker), progress=False), **QUIET)
    with pytest.raises(WriteError, match=rf"Not a directory \(ENOTDIR\); {blocker} is a file, not a directory"):
        train(TrainConfig(out_dir=str(blocker / "run"), progress=False), **QUIET)
    for code, fix in ((errno.EROFS, "that file system is mounted read-only: write to a directory on a writable"),
                      (errno.EACCES, "this user may not write in .*: fix its permissions")):
        def refuse(self, *a, code=code, **k):
            raise OSError(code, os.strerror(code), str(self))

        monkeypatch.setattr(Path, "mkdir", refuse)
        with pytest.raises(WriteError, match=rf"\({errno.errorcode[code]}\); {fix}"):
            train(TrainConfig(out_dir=str(tmp_path / "new" / "run"), progress=False), **QUIET)
        monkeypatch.undo()
        monkeypatch.setattr("sae_lens_attn.training.run.load_model", _no_model)


def _errors(capsys) -> list[str]:
    """The CLI's error lines on stderr (model loading also draws a progress bar there); never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("sae-lens-attn")]


def _no_model(*a, **k):
    raise AssertionError("the model was loaded before the input was checked")


# ------------------------------------------------------------------------------------ 3: full disks


def test_full_disk_at_the_end_of_a_cli_run_is_one_line_and_keeps_the_saes(tiny_neox_dir, text_file, tmp_path,
                                                                           monkeypatch, capsys):
    """Issue case 3 through the CLI: ENOSPC at a chosen byte of the last file (metrics.json) is one line on
    stderr naming the file, the bytes needed and the free space; exit 2; the SAEs saved before load."""
    out = tmp_path / "run"
    WriteFault(monkeypatch, ".metrics.json.", at_byte=50, nth=2)  # 1st: the SAE folder's copy; 2nd: the run's list
    rc = main(["train", "--model", tiny_neox_dir, "--dataset", str(text_file), "--out-dir", str(out), "--tokens",
               "1280", "--batch-size", "64", "--context-size", "32", "--eval-rows", "4", "--k", "4",
               "--expansion-factor", "1", "--checkpoint-every", "10", "--progress", "false"])
    err = _errors(capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"sae-lens-attn: error: could not write {out / 'metrics.json'}: No space left on "
                             "device (ENOSPC; it needed ")
    assert "50 bytes written" in err[0] and "free there); free space on that file system" in err[0]
    assert not (out / "metrics.json").exists() and not list(out.glob(".*.tmp"))
    SAE.load(out / "L1.z")
    verify_checkpoint(latest_checkpoint(out))


def test_full_disk_while_saving_an_sae_keeps_the_earlier_files(tmp_path, monkeypatch):
    sae = _small_sae()
    sae.save(tmp_path / "sae")
    before = (tmp_path / "sae" / "cfg.json").read_bytes(), (tmp_path / "sae" / "sae_weights.safetensors").read_bytes()
    trained = _small_sae(seed=5)
    WriteFault(monkeypatch, ".sae_weights.safetensors.", at_byte=1000)
    with pytest.raises(WriteError, match=r"sae_weights\.safetensors: No space left on device \(ENOSPC; it needed "
                                         r"[0-9.]+ kB, 1000 bytes written, .* free there\)"):
        trained.save(tmp_path / "sae")
    assert ((tmp_path / "sae" / "cfg.json").read_bytes(), (tmp_path / "sae" / "sae_weights.safetensors").read_bytes()) \
        == before
    assert _equal(dict(SAE.load(tmp_path / "sae").named_parameters()), dict(sae.named_parameters()))


def test_serialiser_errors_become_one_write_error(tmp_path):
    """safetensors' SafetensorError and torch.save's "unexpected pos" RuntimeError, raised by writers that get
    a file name (files.atomic_write), are reported as the disk's error; a bug in the writer is not."""
    class SafetensorError(Exception):
        pass

    def st_full(tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(WriteError, match=r"could not write .*a\.st: No space left on device \(SafetensorError: Error "
                                         r"while serializing.*\) \(ENOSPC; it needed 1\.0 GB"):
        files.atomic_write(tmp_path / "a.st", st_full, needed=1 << 30)

    def torch_full(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    free = files.free_bytes(tmp_path)
    with pytest.raises(WriteError, match=r"No space left on device \(RuntimeError: \[enforce fail.*unexpected pos"):
        files.atomic_write(tmp_path / "b.pt", torch_full, needed=free + (1 << 30))

    def bug(tmp):
        raise TypeError("not a disk problem")

    with pytest.raises(TypeError):
        files.atomic_write(tmp_path / "c.pt", bug)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_every_write_goes_through_files_py():
    """No module writes a file except through sae_lens_attn/files.py (atomic, umask mode, one error)."""
    direct = re.compile(r"\.write_(text|bytes)\(|\bsave_file\(|torch\.save\(|mkstemp\(|mkdtemp\(|\.mkdir\(|"
                        r"\bopen\([^)]*['\"][wax]")
    exempt = {"sae_lens_attn/files.py", "sae_lens_attn/ckernels.py",
              "training/build_default_model.py"}  # the compiler cache; the model build writes its own
    offenders = []
    for folder in ("sae_lens_attn", "training", "analysis"):
        for f in sorted((REPO / folder).rglob("*.py")):
            rel = str(f.relative_to(REPO))
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if rel not in exempt and direct.search(line.split("#")[0]) and "write-ok" not in line:
                    offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# --------------------------------------------------------------------------------------- 4: devices


@pytest.mark.parametrize("device,setup,msg", [
    ("cuda", dict(cuda_build=None), r"this torch build \(.*\) has no CUDA support; use device 'cpu' \(--device cpu\)"),
    ("cuda", dict(cuda_build="12.4", available=False), r"no CUDA GPU is visible to this process; use device 'cpu'"),
    ("cuda:7", dict(cuda_build="12.4", available=True, count=1),
     r"'cuda:7' does not exist: this machine has 1 CUDA device\(s\) \(cuda:0\); pass one of those"),
    ("mps", dict(mps=False), r"MPS is not available here .*use device 'cpu' \(--device cpu\)"),
])
def test_a_missing_device_is_refused_before_the_model_loads(device, setup, msg, tmp_path, monkeypatch, capsys):
    """Issue case 4: today `--device cuda` without CUDA was an AssertionError from inside load_model."""
    if "cuda_build" in setup:
        monkeypatch.setattr(torch.version, "cuda", setup["cuda_build"])
    if "available" in setup:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: setup["available"])
    if "count" in setup:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: setup["count"])
    if "mps" in setup:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: setup["mps"])
    monkeypatch.setattr("sae_lens_attn.training.run.load_model", _no_model)
    with pytest.raises(DeviceError, match=msg):
        train(TrainConfig(device=device, out_dir=str(tmp_path / "a"), progress=False), **QUIET)
    with pytest.raises(DeviceError, match=msg):
        check_device(device)
    with pytest.raises(SystemExit) as exc:  # the CLI: a usage error naming the flag, exit 2
        main(["train", "--device", device, "--out-dir", str(tmp_path / "b")])
    assert exc.value.code == 2 and re.search(msg, capsys.readouterr().err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------ 5: signals


def _small_sae(seed: int = 0, d_in: int = 8, d_sae: int = 32) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=2), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def _stream():
    g = torch.Generator().manual_seed(0)
    while True:
        yield {Site(0): SiteBatch(torch.randn(64, 8, generator=g), None)}


def _signal_at(batches, at: int, signum: int):
    for i, b in enumerate(batches):
        if i == at:
            os.kill(os.getpid(), signum)
        yield b


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_checkpoints_and_resumes_bit_for_bit(tmp_path, signum, code):
    """Issue case 5 in process: the step in flight completes, a checkpoint of it is written, the handlers
    are restored, and (SIGTERM) resuming from it ends exactly where an uninterrupted run ends."""
    g = torch.Generator().manual_seed(0)
    data = {Site(0): SiteBatch(torch.randn(1000, 8, generator=g), None)}
    cfg = OptimConfig(lr=3e-3, steps=14, warmup_steps=3, dead_tokens=300, checkpoint_every=0)
    previous = signal.getsignal(signum)
    cut = Trainer({Site(0): _small_sae()}, cfg, tmp_path)
    with pytest.raises(TrainingInterrupted) as e:
        cut.fit(_signal_at(memory_batches(data, 100, seed=2), 7, signum))
    assert signal.getsignal(signum) is previous and signal.getsignal(signal.SIGTERM) is not None
    assert e.value.exit_code == code and e.value.step == 8 and isinstance(e.value, KeyboardInterrupt)
    assert e.value.checkpoint == latest_checkpoint(tmp_path) and e.value.checkpoint.name == "step_00000008"
    assert f"interrupted by {signal.Signals(signum).name}: finished step 8 and wrote checkpoint" in str(e.value)
    if signum != signal.SIGTERM:
        return
    whole = Trainer({Site(0): _small_sae()}, cfg)
    whole.fit(memory_batches(data, 100, seed=2))
    resumed = Trainer({Site(0): _small_sae(seed=9)}, cfg, tmp_path)
    resumed.restore(e.value.checkpoint)
    resumed.fit(memory_batches(data, 100, seed=2, start=resumed.batches_consumed))
    assert _equal(dict(whole.saes[Site(0)].named_parameters()), dict(resumed.saes[Site(0)].named_parameters()))


def test_a_second_signal_exits_at_once_and_keeps_the_last_checkpoint(tmp_path):
    """The second SIGTERM arrives while the stop checkpoint is being written (slowly): the process exits at
    once with 143; the complete checkpoint written before verifies, the half-written one is not a step_N."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.workers", "slow", str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.stdout.readline().strip() == "READY"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # the stop checkpoint is being written: each write call takes 0.3 s
    assert proc.poll() is None
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.monotonic() - t0 < 2.0, err
    assert "SIGTERM received: finishing this step" in err and "SIGTERM received again: exiting now" in err
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000003"]
    assert list((tmp_path / "checkpoints").glob(".tmp_*"))  # the one cut short, removed by the next resume
    verify_checkpoint(tmp_path / "checkpoints" / "step_00000003")


def test_resume_command_is_the_users_argv_with_resume_true():
    prog = ["sae-lens-attn"]
    assert resume_command(["train", "--k", "8", "--out-dir", "runs/a b"], prog) == \
        "sae-lens-attn train --k 8 --out-dir 'runs/a b' --resume true"
    assert resume_command(["train", "--resume", "false", "--overwrite=true", "--k", "8", "--resu", "0"], prog) == \
        "sae-lens-attn train --k 8 --resume true"


# ------------------------------------------------------------------------------------- 6: text files


def test_binary_files_and_other_encodings_are_refused_naming_the_file(tiny_neox, tmp_path, capsys):
    """Issue case 6: today /bin/ls trained on decoded garbage, and non-UTF-8 text was silently replaced."""
    binary = tmp_path / "ls"
    binary.write_bytes(Path("/bin/ls").read_bytes() if Path("/bin/ls").exists() else bytes(range(256)) * 200)
    with pytest.raises(NotTextError, match=rf"{binary} is not a text file: it holds [0-9,]+ NUL byte\(s\) in bytes "
                                           r"0-[0-9,]+, the first at byte [0-9,]+, as binary files do"):
        token_rows(binary, tiny_neox.tokenizer, 32, 0)
    rc = main(["train", "--dataset", str(binary), "--out-dir", str(tmp_path / "run"), "--progress", "false"])
    err = _errors(capsys)
    assert rc == 2 and len(err) == 1 and "is not a text file" in err[0]

    latin = "Ça, c'est très élégant: « déjà vu » à Noël. " * 50
    f = tmp_path / "latin.txt"
    f.write_bytes(latin.encode("latin-1"))
    with pytest.raises(NotTextError, match=rf"{f} is not utf-8 text: [0-9,]+ of its first [0-9,]+ bytes \([0-9.]+%\) do not "
                                           r"decode\. If it is text in another encoding, pass it with --encoding"):
        token_rows(f, tiny_neox.tokenizer, 32, 0)
    rows = token_rows(f, tiny_neox.tokenizer, 32, 0, encoding="latin-1")
    ids = tiny_neox.tokenizer(latin, add_special_tokens=False)["input_ids"]
    assert rows[0, 1:].tolist() == ids[:31]

    few = tmp_path / "few.txt"
    few.write_bytes(("plain text " * 100).encode() + b"\xff")  # one stray byte in 1101: replaced, with a warning
    with pytest.warns(UserWarning, match=rf"{few}: 1 byte\(s\) do not decode as utf-8 and were replaced"):
        assert read_text_file(few).endswith("text \ufffd")
    wide = tmp_path / "wide.txt"
    wide.write_bytes("UTF-16 has NUL bytes".encode("utf-16"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_text_file(wide, "utf-16") == "UTF-16 has NUL bytes"


# ---------------------------------------------------------------------------------- 7: SAE provenance


def _sae_for(site: Site, model_name, d_in: int) -> SAE:
    meta = {"hook_name": site.hook_name, "hook_layer": site.layer, "hook_head_index": site.head,
            "model_name": model_name}
    sae = SAE(SAEConfig(d_in=d_in, d_sae=16, k=2, metadata=meta), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    return sae


def test_an_sae_is_refused_on_another_site_or_model(tiny_neox, tiny_neox_dir, tiny_gpt2, tiny_gpt2_dir):
    """Issue case 7: an SAE trained on layer 1 was accepted on layer 0 (FVU 1.1) and model, hook and head in
    its metadata were never compared."""
    sae = _sae_for(Site(1), tiny_neox_dir, 32)
    sae.check_site(Site(1), tiny_neox)
    with pytest.raises(SiteMismatchError, match=r"applied to L0\.z \(blocks\.0\.attn\.hook_z\) but its metadata says "
                                                r"it was trained elsewhere: hook blocks\.1\.attn\.hook_z \(trained\) vs "
                                                r"blocks\.0\.attn\.hook_z\. .*allow_transfer=True \(--allow-transfer\)"):
        sae.check_site(Site(0), tiny_neox)
    rows = torch.randint(1, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = tiny_neox.tokenizer.bos_token_id
    with pytest.raises(SiteMismatchError):
        evaluate_sae(tiny_neox, sae, Site(0), rows)
    m, _ = evaluate_sae(tiny_neox, sae, Site(0), rows, allow_transfer=True)  # a deliberate transfer
    assert m.site == "L0.z" and m.fvu > 0
    with pytest.raises(SiteMismatchError, match=r"model '.*tiny_neox.*' \(trained\) vs '.*tiny_gpt2.*'"):
        sae.check_site(Site(1), tiny_gpt2)
    with transfer_allowed():
        sae.check_site(Site(0), tiny_gpt2)
    one_head = _sae_for(Site(1, head=2), tiny_neox_dir, 8)
    with pytest.raises(SiteMismatchError, match=r"head 2 \(trained\) vs head 3"):
        one_head.check_site(Site(1, head=3), tiny_neox)
    sae.check_site(Site(1), tiny_neox.cfg)  # a bare cfg: the model name cannot be compared, the rest is
    with pytest.raises(SiteMismatchError):
        sae.check_site(Site(0), tiny_neox.cfg)
    bare = SAE(SAEConfig(d_in=32, d_sae=16, k=2), init=False)  # no metadata: nothing to compare, nothing refused
    bare.check_site(Site(0), tiny_gpt2)
    with pytest.raises(ValueError, match="d_in mismatch"):  # widths are checked even when transfer is allowed
        sae.check_site(Site(1, head=0), tiny_neox, allow_transfer=True)


@pytest.mark.parametrize("a,b,same", [
    (DEFAULT_MODEL_NAME, str(DEFAULT_MODEL_DIR), True),
    ("default", DEFAULT_MODEL_NAME, True),
    ("gpt2-small", "gpt2", True),  # TransformerLens' alias table
    ("EleutherAI/pythia-70m", "pythia-70m", True),
    ("eleutherai/Pythia-70M", "EleutherAI/pythia-70m", True),
    ("EleutherAI/pythia-70m", "EleutherAI/pythia-160m", False),
    ("orgA/model", "orgB/model", False),
    ("/data/models/gpt2", "gpt2", True),
    ("/hf/hub/models--EleutherAI--pythia-70m/snapshots/abc123", "EleutherAI/pythia-70m", True),
    ("/data/a/finetune", "gpt2", False),
    ("unknown", "gpt2", None),
    (None, "gpt2", None),
])
def test_model_names_are_compared_by_identity(a, b, same):
    import transformer_lens.supported_models  # noqa: F401  (the alias table is consulted once loaded)

    assert same_model(a, b) is same and same_model(b, a) is same


def test_a_local_copy_records_its_hub_id(tmp_path):
    (tmp_path / "my-copy").mkdir()
    (tmp_path / "my-copy" / "config.json").write_text(json.dumps({"_name_or_path": "EleutherAI/pythia-70m"}))
    assert same_model(str(tmp_path / "my-copy"), "EleutherAI/pythia-70m") is True
    assert same_model(str(tmp_path / "my-copy"), str(tmp_path / "my-copy" / ".")) is True
    assert same_model(str(tmp_path / "my-copy"), "gpt2") is False


def test_analyze_refuses_another_model_unless_allowed(tiny_neox_dir, tiny_gpt2_dir, tmp_path, capsys):
    sae = _sae_for(Site(1), tiny_neox_dir, 32)
    sae.save(tmp_path / "sae")
    args = ["analyze", "--sae", str(tmp_path / "sae"), "--model", tiny_gpt2_dir, "--tokens", "64", "--top", "1",
            "--n-seq", "2", "--induction-length", "4"]
    assert main(args) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "trained elsewhere: model" in err[0] and "--allow-transfer" in err[0]
    assert main([*args, "--allow-transfer"]) == 0
    assert "Head survey" in capsys.readouterr().out


# ------------------------------------------------------------------------------- 8: pickles, file modes


def test_a_pickle_renamed_pt_is_refused_as_not_weights_only(tmp_path):
    """Issue case 8: the message said "truncated or corrupted"; the file is neither."""
    pt = tmp_path / "sae.pt"
    pt.write_bytes(pickle.dumps({"W_enc": {1, 2}, "note": Path("x")}))
    (tmp_path / "sae_cfg.json").write_text(json.dumps({"act_size": 8, "dict_size": 16, "act_name": "blocks.0.attn.hook_z"}))
    with pytest.raises(SAEFileError) as e:
        load_sae(pt)
    msg = str(e.value)
    assert msg.startswith(f"{pt} is not a weights-only file: it pickles Python objects (")
    assert "unpickling such a file can run arbitrary code, so it is not loaded" in msg
    assert "truncated" not in msg and "corrupted" not in msg and len(msg) < 400 and "\n" not in msg
    torch.save({"x": torch.ones(2), "cfg": argparse_namespace()}, pt)  # torch.save of a non-tensor object
    with pytest.raises(SAEFileError, match=r"not a weights-only file: it pickles Python objects \(argparse\.Namespace"):
        load_sae(pt)
    pt.write_bytes(b"\x80\x02garbage")  # damaged: still "truncated or corrupted"
    with pytest.raises(SAEFileError, match="truncated or corrupted"):
        load_sae(pt)


def argparse_namespace():
    import argparse

    return argparse.Namespace(k=1)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_umask_mode(tmp_path, umask):
    """Issue case 8: saved files were 0600 whatever the umask (tempfile.mkstemp)."""
    old = os.umask(umask)
    try:
        _small_sae().save(tmp_path / "sae")
        write_text(tmp_path / "a.txt", "x")
        tr = Trainer({Site(0): _small_sae()}, OptimConfig(steps=1, warmup_steps=0, checkpoint_every=1), tmp_path / "run")
        tr.fit(_stream())
    finally:
        os.umask(old)
    ckpt = latest_checkpoint(tmp_path / "run")
    for f in [tmp_path / "a.txt", *(tmp_path / "sae").iterdir(), *(p for p in ckpt.rglob("*") if p.is_file())]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    for d in (tmp_path / "sae", ckpt, ckpt / "L0.z"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, d


# ------------------------------------------------------------------ slow: real file systems, SIGKILL loop


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs mounted at ``path`` (skips the test where mounting is not permitted)."""
    path.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here, so no small real file system to fill")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): it needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_a_real_full_file_system(tiny_neox_dir, text_file, tmp_path, capsys):
    """Issue case 3 on a real 5 MB tmpfs: the second 3 MB checkpoint does not fit. The kernel's ENOSPC (from
    whichever file fills the disk, torch.save's included) is one WriteError naming the file, the bytes
    needed and the free space; the first checkpoint verifies and restores; the partial one is gone. Then the
    CLI on a 48 kB disk, and a read-only mount (EROFS). EACCES stays injected only
    (test_out_dir_problems_name_the_fix_before_the_model_loads): as root, the kernel lets us write anywhere."""
    from tests.workers import data, trainer

    with _tmpfs(tmp_path / "small", "5m") as mnt:
        tr = trainer(mnt / "run", steps=2, every=1)
        with pytest.raises(WriteError) as e:
            tr.fit(memory_batches(data(), 128, seed=3))
        msg = str(e.value)
        assert e.value.errno == errno.ENOSPC and "\n" not in msg, msg
        assert re.search(r"could not write checkpoint .*step_00000002: No space left on device \(ENOSPC; at "
                         r".*step_00000002/\S+, it needed [0-9.]+ (MB|kB)(, [0-9.]+ (MB|kB|bytes) written)?, "
                         r"[0-9.]+ (MB|kB|bytes) free there\); the last complete checkpoint .*step_00000001 is intact",
                         msg), msg
        assert e.value.free is not None and e.value.free < e.value.needed
        first = latest_checkpoint(mnt / "run")
        assert first.name == "step_00000001" and not list((mnt / "run" / "checkpoints").glob(".tmp_*"))
        verify_checkpoint(first)
        trainer(mnt / "run", steps=2, every=1).restore(first)

    with _tmpfs(tmp_path / "tiny", "48k") as mnt:  # the CLI on a disk too small for its checkpoints
        rc = main(["train", "--model", tiny_neox_dir, "--dataset", str(text_file), "--out-dir", str(mnt / "run"),
                   "--tokens", "1280", "--batch-size", "64", "--context-size", "32", "--eval-rows", "4", "--k", "4",
                   "--expansion-factor", "1", "--checkpoint-every", "1", "--progress", "false"])
        err = _errors(capsys)
        assert rc == 2 and len(err) == 1 and "No space left on device (ENOSPC;" in err[0] and "free there" in err[0]
        for ckpt in (mnt / "run" / "checkpoints").glob("step_*"):
            verify_checkpoint(ckpt)

    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as mnt:
        with pytest.raises(WriteError, match=r"Read-only file system \(EROFS\); that file system is mounted read-only"):
            train(TrainConfig(out_dir=str(mnt / "run"), progress=False), **QUIET)


@pytest.mark.slow
def test_sigkill_at_random_moments_during_checkpoint_writes(tmp_path):
    """A run killed with SIGKILL at random moments (mostly inside a checkpoint write: they dominate its
    time) and resumed, again and again: every surviving checkpoint verifies each time, and the final SAE
    equals the uninterrupted run's exactly."""
    import random

    def worker(out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tests.workers", "run", str(out), "60"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))

    ref = worker(tmp_path / "ref")
    rng = random.Random(13)
    cut, kills, starts, mid_write = tmp_path / "cut", 0, [], 0
    for _ in range(40):
        proc = worker(cut)
        line = proc.stdout.readline().split()
        assert line[:1] == ["STARTED"], proc.stderr.read()[-2000:]
        starts.append(int(line[1]))
        time.sleep(rng.uniform(0.02, 0.3))  # short lives: a quiet machine does 10-20 steps a second
        proc.kill()
        proc.wait()
        done = (cut / "final" / "cfg.json").exists()
        kills += not done
        mid_write += bool(list((cut / "checkpoints").glob(".tmp_*")))  # killed while writing one
        for ckpt in sorted((cut / "checkpoints").glob("step_*")):
            verify_checkpoint(ckpt)
        if done:
            break
    assert kills >= 4 and mid_write >= 1 and starts == sorted(starts), (kills, mid_write, starts)
    if not (cut / "final" / "cfg.json").exists():
        last = worker(cut)
        assert last.wait(timeout=300) == 0, last.stderr.read()[-2000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    a, b = SAE.load(tmp_path / "ref" / "final"), SAE.load(cut / "final")
    assert _equal(dict(a.named_parameters()), dict(b.named_parameters()))
