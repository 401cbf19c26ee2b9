"""Two torchrun *nodes* on one machine (c10d rendezvous on 127.0.0.1), training from pre-tokenized shards,
match one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sae_lens_attn.models import SAMPLE_TEXT
from sae_lens_attn.sae import SAE

from .test_distributed import free_port

pytestmark = pytest.mark.slow


def _node(rank: int, port: int, args: list[str], cwd) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
           str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "sae-test",
           "-m", "sae_lens_attn.frontends.cli", "train", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_nodes_from_shards_match_one_process(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text(SAMPLE_TEXT.read_text()[:30_000])
    shards = tmp_path / "shards"
    cli = [sys.executable, "-m", "sae_lens_attn.frontends.cli"]
    r = subprocess.run([*cli, "tokenize", "--dataset", str(text), "--out", str(shards), "--context-size", "64"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    common = ["--dataset", str(shards), "--tokens", "4096", "--batch-size", "512", "--context-size", "64",
              "--eval-rows", "4", "--k", "8", "--expansion-factor", "2", "--checkpoint-every", "0", "--progress",
              "false", "--layers", "0,1", "--deterministic", "true", "--distributed", "dp",
              "--activation-cache", str(tmp_path / "cache")]
    port = free_port()
    nodes = [_node(rank, port, [*common, "--out-dir", str(tmp_path / "dist")], tmp_path) for rank in (0, 1)]
    outs = [n.communicate(timeout=600) for n in nodes]
    for n, (_out, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    assert sum(out.count("SAEs saved under") for out, _ in outs) == 1  # one writer: node 0's rank 0
    from sae_lens_attn.frontends.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = [a for a in common if a not in ("--distributed", "dp")]
        assert main(["train", *single, "--out-dir", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    for label in ("L0.z", "L1.z"):
        a, b = SAE.load(tmp_path / "dist" / label), SAE.load(tmp_path / "single" / label)
        for name, p in a.named_parameters():
            q = dict(b.named_parameters())[name]
            assert (p - q).abs().max().item() <= 1e-5, f"{label}.{name}"
    meta = json.loads((tmp_path / "dist" / "L1.z" / "cfg.json").read_text())["metadata"]
    assert meta["dataset_path"] == str(shards)
