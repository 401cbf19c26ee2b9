"""Resume: a run killed after a checkpoint and resumed ends with the same SAE as an uninterrupted run."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae_lens_attn.activations import SiteBatch, epoch_batches
from sae_lens_attn.models import SAMPLE_TEXT
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.sites import Site
from sae_lens_attn.training.config import TrainConfig
from sae_lens_attn.training.run import memory_batches, train
from sae_lens_attn.training.trainer import OptimConfig, Trainer, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
# One thread per process: the reference and the interrupted run share the 2 cores, and all three runs use
# the same thread count (a GEMM's summation order may depend on it).
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _data(n: int, d: int = 8, seed: int = 0) -> dict[Site, SiteBatch]:
    g = torch.Generator().manual_seed(seed)
    return {Site(0): SiteBatch(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)),
            Site(1): SiteBatch(torch.randn(n, d, generator=g), None)}


@pytest.mark.parametrize("start", [0, 1, 6, 7, 20])
def test_memory_batches_skip_lands_where_epoch_batches_would(start):
    data = _data(100)  # 7 batches of 13 per epoch: start 7 and 20 cross epoch boundaries
    expect = itertools.islice(epoch_batches(data, 13, seed=3), start, start + 9)
    got = itertools.islice(memory_batches(data, 13, seed=3, start=start), 9)
    for a, b in zip(expect, got, strict=True):
        for s in data:
            assert torch.equal(a[s].acts, b[s].acts)
            assert (a[s].grads is None and b[s].grads is None) or torch.equal(a[s].grads, b[s].grads)


def _planted(n: int = 2048, d: int = 16, seed: int = 0) -> dict[Site, SiteBatch]:
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(48, d, generator=g)
    idx = torch.rand(n, 48, generator=g).topk(3, dim=-1).indices
    return {Site(0): SiteBatch(torch.einsum("bk,bkd->bd", torch.rand(n, 3, generator=g) + 0.5, D[idx]), None)}


def _sae(seed: int) -> SAE:
    sae = SAE(SAEConfig(d_in=16, d_sae=128, k=4), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def test_trainer_restore_continues_bit_for_bit(tmp_path):
    """Weights, Adam moments, schedule, dead-latent counters and data position all come back: the
    resumed run equals the uninterrupted one exactly (AuxK is active, so the counters matter)."""
    data = _planted()
    cfg = OptimConfig(lr=3e-3, steps=30, warmup_steps=4, dead_tokens=512, checkpoint_every=12, log_every=3)
    whole = Trainer({Site(0): _sae(1)}, cfg, tmp_path / "whole")
    whole.fit(memory_batches(data, 256, seed=5))
    first = Trainer({Site(0): _sae(1)}, cfg, tmp_path / "cut")
    batches = memory_batches(data, 256, seed=5)
    first.fit(itertools.islice(batches, 17))  # "killed" at step 17; the last checkpoint is step 12
    resumed = Trainer({Site(0): _sae(99)}, cfg, tmp_path / "cut")  # other init: everything must be restored
    resumed.restore(latest_checkpoint(tmp_path / "cut"))
    assert resumed.step_idx == 12 and resumed.batches_consumed == 12
    stats = resumed.fit(memory_batches(data, 256, seed=5, start=resumed.batches_consumed))
    assert stats[Site(0)].dead_fraction > 0 or any(
        json.loads(line)["auxk"] > 0 for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()
    ), "the test must exercise AuxK"
    a, b = whole.states[Site(0)], resumed.states[Site(0)]
    for name, p in a.sae.named_parameters():
        assert torch.equal(p, dict(b.sae.named_parameters())[name]), name
    assert torch.equal(a.tokens_since_fired, b.tokens_since_fired) and torch.equal(a.fire_counts, b.fire_counts)


def test_resume_refuses_a_run_with_other_settings(tmp_path):
    base = dict(out_dir=str(tmp_path), tokens=4096, batch_size=512, k=8, progress=False)
    (tmp_path / "train_config.json").write_text(json.dumps({**TrainConfig(**base).__dict__}))
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=r"--k: checkpointed run 8, now 16.*new --out-dir"):
        train(TrainConfig(**{**base, "k": 16, "resume": True}), log=lambda *a: None)


def _cli(out_dir: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "sae_lens_attn.training.cli", "train", "--dataset", str(data), "--tokens", "32768",
            "--batch-size", "1024", "--context-size", "64", "--eval-rows", "4", "--k", "8", "--expansion-factor", "2",
            "--checkpoint-every", "4", "--dead-tokens", "4096", "--progress", "false", "--deterministic", "true",
            "--resume", "true", "--out-dir", str(out_dir)]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data") / "small.txt"
    # ~7k tokens: the 32 steps of 1024 run several epochs, so the resumed data position crosses epochs
    data.write_text(SAMPLE_TEXT.read_text()[:20_000])
    return data


class _Reference:
    """The uninterrupted run, started once per module in the background; :meth:`dir` waits for it."""

    def __init__(self, out_dir: Path, data: Path):
        self.out_dir = out_dir
        self.proc = subprocess.Popen(_cli(out_dir, data), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=REPO, env=ENV)

    def dir(self) -> Path:
        _, err = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, err[-3000:]
        return self.out_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_data):
    ref = _Reference(tmp_path_factory.mktemp("ref") / "run", small_data)
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()


def test_sigterm_then_resume_equals_uninterrupted(tmp_path, small_data, reference):
    """SIGTERM (a cluster's preemption notice) mid-run: the step finishes, a checkpoint is written, the exact
    resume command is printed, exit 143; running that command ends bit for bit where the uninterrupted run
    ends (--deterministic true)."""
    cut_dir = tmp_path / "cut"
    argv = ["train", "--dataset", str(small_data), "--tokens", "32768", "--batch-size", "1024", "--context-size",
            "64", "--eval-rows", "4", "--k", "8", "--expansion-factor", "2", "--checkpoint-every", "1000",
            "--log-every", "1", "--dead-tokens", "4096", "--progress", "false", "--deterministic", "true",
            "--out-dir", str(cut_dir)]
    cut = subprocess.Popen([sys.executable, "-m", "sae_lens_attn.training.cli", *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    log = cut_dir / "log.jsonl"
    deadline = time.monotonic() + 300
    while cut.poll() is None and time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            cut.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    out, err = cut.communicate(timeout=300)
    assert cut.returncode == 143, err[-3000:]
    stopped_at = latest_checkpoint(cut_dir)
    step = int(stopped_at.name[5:])
    assert 3 <= step < 32 and [p.name for p in (cut_dir / "checkpoints").iterdir()] == [stopped_at.name]
    lines = err.strip().splitlines()
    assert lines[-2].startswith(f"sae-lens-attn: interrupted by SIGTERM: finished step {step} and wrote checkpoint "
                                f"{stopped_at}; resume with:")
    assert lines[-1] == shlex.join([sys.executable, "-m", "sae_lens_attn.training.cli", *argv, "--resume", "true"])
    resumed = subprocess.run(shlex.split(lines[-1]), capture_output=True, text=True, cwd=REPO, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {stopped_at} at step {step}/32" in resumed.stdout
    _assert_same_sae(reference.dir(), cut_dir, "SIGTERM + resume")
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 33))  # every step logged once


def _assert_same_sae(ref_dir, cut_dir, what: str) -> None:
    """The resumed run's final SAE and sparsity equal the uninterrupted run's, bit for bit."""
    a, b = SAE.load(ref_dir / "L1.z"), SAE.load(cut_dir / "L1.z")
    for name, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[name]), f"{name} differs after {what}"
    assert torch.equal(SAE.load_sparsity(ref_dir / "L1.z"), SAE.load_sparsity(cut_dir / "L1.z"))


def test_sigkill_after_a_checkpoint_then_resume_equals_uninterrupted(tmp_path, small_data, reference):
    data = small_data
    cut_dir = tmp_path / "cut"
    cut = subprocess.Popen(_cli(cut_dir, data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, env=ENV)
    ckpts = cut_dir / "checkpoints"
    deadline = time.monotonic() + 300
    while cut.poll() is None and time.monotonic() < deadline:
        if ckpts.exists() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
            cut.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    cut.wait()
    assert cut.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (cut_dir / "metrics.json").exists() and not (cut_dir / "L1.z").exists()
    killed_at = latest_checkpoint(cut_dir)
    assert killed_at is not None
    resumed = subprocess.run(_cli(cut_dir, data), capture_output=True, text=True, cwd=REPO, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed_at} at step {int(killed_at.name[5:])}/32" in resumed.stdout
    ref_dir = reference.dir()
    _assert_same_sae(ref_dir, cut_dir, "kill + resume")
    # the log reads as one run: every step once, records after the checkpoint written again
    steps = [json.loads(line)["step"] for line in (cut_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 32]
    ref_log = [json.loads(line) for line in (ref_dir / "log.jsonl").read_text().splitlines()]
    cut_log = [json.loads(line) for line in (cut_dir / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ref_log] == [r["loss"] for r in cut_log]
    assert any(r["auxk"] > 0 for r in ref_log), "dead latents (and their counters) must matter in this run"
    assert not list(ckpts.glob(".tmp_*"))  # a checkpoint half-built at the kill is cleared on resume
