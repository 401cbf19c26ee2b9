"""Multi-process training: data-parallel steps equal the single-process step on the global batch, and
site-sharded training equals single-process training site for site. Two CPU processes over gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sae_lens_attn.activations import SiteBatch
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.sites import Site
from sae_lens_attn.training.distributed import Dist, TorchDist, resolve_mode, shard_sites
from sae_lens_attn.training.trainer import OptimConfig, Trainer, latest_checkpoint, load_trainer_state

WORLD = 2
BATCH = 512
CFG = dict(lr=2e-3, steps=24, warmup_steps=3, decay_fraction=0.25, dead_tokens=512, auxk_alpha=1 / 32,
           checkpoint_every=10, log_every=4)


def planted(seed: int, sites=(Site(0),), d: int = 24, n: int = 64, batch: int = BATCH):
    """Sparse sums of a fixed dictionary (per site), batch after batch: enough structure for latents to
    specialise and (with dead_tokens small) for some to die, so AuxK runs."""
    g = torch.Generator().manual_seed(seed)
    dicts = {s: torch.randn(n, d, generator=g) for s in sites}
    while True:
        out = {}
        for s, D in dicts.items():
            idx = torch.rand(batch, n, generator=g).topk(3, dim=-1).indices
            mags = torch.rand(batch, 3, generator=g) + 0.5
            x = torch.einsum("bk,bkd->bd", mags, D[idx]) + 0.05 * torch.randn(batch, d, generator=g) + 1.0
            out[s] = SiteBatch(x, None)
        yield out


def make_sae(seed: int, d: int = 24, d_sae: int = 192, k: int = 4) -> SAE:
    sae = SAE(SAEConfig(d_in=d, d_sae=d_sae, k=k), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, mode: str, out: str) -> None:
    import torch.distributed as td

    torch.set_num_threads(1)
    # a file rendezvous: no port to race for with other processes on the machine
    td.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    dist = TorchDist(mode, "gloo")
    finished = False
    try:
        sites = [Site(0), Site(1)] if mode == "sites" else [Site(0)]
        mine = shard_sites(sites, dist)
        saes = {s: make_sae(10 + i) for i, s in enumerate(sites) if s in mine}
        trainer = Trainer(saes, OptimConfig(**CFG), Path(out) / "run", dist)
        stream = planted(7, sites)
        if mode == "dp":  # rank r trains on its half of each global batch
            lo, hi = rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD
            stream = ({s: SiteBatch(b.acts[lo:hi], None) for s, b in batch.items()} for batch in stream)
        else:
            stream = ({s: b for s, b in batch.items() if s in mine} for batch in stream)
        stats = trainer.fit(stream)
        gathered = trainer.gather_saes()
        torch.save(
            {
                "params": {s.label: {n: p.detach().clone() for n, p in sae.named_parameters()} for s, sae in gathered.items()},
                "stats": {s.label: st._asdict() for s, st in stats.items()},
                "tokens_since_fired": {s.label: st.tokens_since_fired for s, st in trainer.states.items()},
            },
            Path(out) / f"rank{rank}.pt",
        )
        finished = True
    finally:
        dist.close(wait=finished)  # as the CLI does: ranks that leave gloo apart can abort in C++


def _spawn(mode: str, tmp_path: Path) -> list[dict]:
    mp.spawn(_worker, args=(mode, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single(sites, tmp_path: Path | None = None):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels, so site-sharded results can be compared exactly
    try:
        saes = {s: make_sae(10 + i) for i, s in enumerate(sites)}
        trainer = Trainer(saes, OptimConfig(**CFG), tmp_path)
        stats = trainer.fit(planted(7, sites))
    finally:
        torch.set_num_threads(threads)
    return trainer, stats


def test_one_process_dist_is_a_no_op():
    d = Dist()
    t = torch.arange(4.0)
    assert d.all_reduce(t) is t and torch.equal(t, torch.arange(4.0))
    assert d.gather_object({"a": 1}) == [{"a": 1}] and d.all_agree(False) is False and d.is_main
    assert shard_sites([Site(0), Site(1)], d) == [Site(0), Site(1)]
    assert resolve_mode("auto", world_size=1) == "none" and resolve_mode("auto", world_size=2) == "dp"
    assert resolve_mode("sites", world_size=2) == "sites"
    with pytest.raises(ValueError, match="--distributed off, but WORLD_SIZE=2"):
        resolve_mode("off", world_size=2)
    d.mode, d.world_size, d.rank = "sites", 3, 1
    with pytest.raises(ValueError, match="needs at least as many sites"):
        shard_sites([Site(0), Site(1)], d)
    d.world_size = 2
    assert shard_sites([Site(0), Site(1), Site(2)], d) == [Site(1)]


def test_data_parallel_matches_single_process_on_the_global_batch(tmp_path):
    ranks = _spawn("dp", tmp_path)
    trainer, stats = _single([Site(0)])
    sae = trainer.states[Site(0)].sae
    for name, p in sae.named_parameters():
        # the ranks hold bit-identical weights (same reduced gradients, same Adam step)...
        assert torch.equal(ranks[0]["params"]["L0.z"][name], ranks[1]["params"]["L0.z"][name]), name
        # ...equal to the single-process weights up to fp32 summation order
        diff = (ranks[0]["params"]["L0.z"][name] - p.detach()).abs().max().item()
        assert diff <= 1e-6, f"{name}: data-parallel differs from single-process by {diff:.2e}"
    single, dp = stats[Site(0)], ranks[0]["stats"]["L0.z"]
    assert single.dead_fraction > 0 and single.auxk > 0, "the test must exercise AuxK on dead latents"
    for key in ("loss", "fvu", "auxk", "l0", "dead_fraction"):
        assert dp[key] == pytest.approx(getattr(single, key), rel=1e-5, abs=1e-7), key
    assert torch.equal(ranks[0]["tokens_since_fired"]["L0.z"], trainer.states[Site(0)].tokens_since_fired)
    # rank 0 alone wrote: checkpoints at steps 10 and 20, the log every 4 steps
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "step_00000020"
    state = load_trainer_state(run / "checkpoints" / "step_00000010")
    assert state["world_size"] == 2 and state["mode"] == "dp" and len(state["ranks"]) == 2
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [4, 8, 12, 16, 20, 24]


def test_site_sharded_training_equals_single_process(tmp_path):
    ranks = _spawn("sites", tmp_path)
    trainer, _ = _single([Site(0), Site(1)], tmp_path / "single")
    for site in (Site(0), Site(1)):
        for name, p in trainer.states[site].sae.named_parameters():
            got = ranks[0]["params"][site.label][name]  # rank 0 gathered both sites
            assert torch.equal(got, p.detach()), f"{site.label}.{name} differs from single-process training"
    assert set(ranks[1]["params"]) == {"L1.z"}  # rank 1 only ever held its own site
    run = tmp_path / "run"
    ckpt = latest_checkpoint(run)
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["L0.z", "L1.z"]
    state = load_trainer_state(ckpt)
    single_state = load_trainer_state(latest_checkpoint(tmp_path / "single"))
    for label in ("L0.z", "L1.z"):
        assert torch.equal(state["sites"][label]["tokens_since_fired"], single_state["sites"][label]["tokens_since_fired"])
    sharded = [(r["step"], r["site"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]
    single = [(r["step"], r["site"], r["loss"]) for r in
              map(json.loads, (tmp_path / "single" / "log.jsonl").read_text().splitlines())]
    assert sharded == single


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "sae_lens_attn.frontends.cli", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dp", "sites", "dp-cache"])
def test_cli_under_torchrun(mode, tmp_path):
    text = tmp_path / "small.txt"
    from sae_lens_attn.models import SAMPLE_TEXT

    text.write_text(SAMPLE_TEXT.read_text()[:20_000])
    common = ["--dataset", str(text), "--tokens", "8192", "--batch-size", "512", "--context-size", "64",
              "--eval-rows", "4", "--k", "8", "--expansion-factor", "2", "--checkpoint-every", "8",
              "--progress", "false", "--layers", "0,1", "--deterministic", "true"]
    if mode == "dp-cache":  # ranks slice the cache's global batches: the single-process batches, split
        common += ["--activation-cache", str(tmp_path / "cache")]
    out = tmp_path / "dist"
    r = _torchrun([*common, "--distributed", mode.removesuffix("-cache"), "--out-dir", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("SAEs saved under") == 1  # rank 0 alone reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["site"] for m in metrics] == ["L0.z", "L1.z"] and all(0 < m["l0"] <= 8 for m in metrics)
    assert latest_checkpoint(out).name == "step_00000016"
    if mode in ("sites", "dp-cache"):
        from sae_lens_attn.frontends.cli import main

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
        try:
            assert main(["train", *common, "--out-dir", str(tmp_path / "single")]) == 0
        finally:
            torch.set_num_threads(threads)
        for label in ("L0.z", "L1.z"):
            a, b = SAE.load(out / label), SAE.load(tmp_path / "single" / label)
            for name, p in a.named_parameters():
                q = dict(b.named_parameters())[name]
                if mode == "sites":  # each site trained from the single-process stream: identical SAEs
                    assert torch.equal(p, q), f"{label}.{name}"
                else:  # the same global batches, gradients summed over ranks: equal up to fp32 rounding
                    assert (p - q).abs().max().item() <= 1e-5, f"{label}.{name}"


def test_cli_refuses_off_under_torchrun_and_a_missing_rendezvous(monkeypatch, capsys):
    from sae_lens_attn.frontends.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--distributed", "off", "--progress", "false"])
    assert exc.value.code == 2 and "--distributed off, but WORLD_SIZE=2" in capsys.readouterr().err
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--distributed", "dp", "--progress", "false"])
    assert exc.value.code == 2 and "MASTER_ADDR is not set: launch with torchrun" in capsys.readouterr().err


class _RecordingTD:
    """Stands in for torch.distributed: records what close() calls, in order."""

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return True

    def monitored_barrier(self, group=None, timeout=None):
        self.calls.append(("barrier", timeout))

    def destroy_process_group(self):
        self.calls.append(("destroy", None))


@pytest.mark.parametrize("wait", [True, False])
def test_close_waits_for_every_rank_only_after_a_normal_end(wait):
    from datetime import timedelta

    from sae_lens_attn.training.distributed import TorchDist

    d = TorchDist.__new__(TorchDist)  # no process group: only close()'s order is under test
    d._td, d._cpu_group = _RecordingTD(), None
    d.close(wait=wait)
    names = [name for name, _ in d._td.calls]
    # a normal end: every rank meets before the group goes (rank 0 may still be evaluating, so no 30-min cap);
    # a failed rank leaves at once, where a barrier would hang the others until the timeout
    assert names == (["barrier", "destroy"] if wait else ["destroy"])
    if wait:
        assert d._td.calls[0][1] >= timedelta(hours=2)
