"""Training processes for the signal and kill tests: ``python -m tests.workers MODE OUT_DIR [STEPS]``.

A small Trainer on seeded planted data, one thread, so that runs in separate processes are bit-comparable.

* ``run``: train to STEPS with a checkpoint every step, continuing from the latest checkpoint in OUT_DIR
  (the resume the CLI does), then save the final SAE to OUT_DIR/final. Prints ``STARTED`` once it is
  training. Its checkpoints are large next to its steps, so a random moment is mostly inside a write.
* ``slow``: train 3 steps and checkpoint, print ``READY``, then continue with every write slowed down
  (0.3 s per write call), so that a signal lands while a checkpoint is being written.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import sae_lens_attn.files as files
from sae_lens_attn.activations import SiteBatch
from sae_lens_attn.sae import SAE, SAEConfig
from sae_lens_attn.sites import Site
from sae_lens_attn.training.run import memory_batches
from sae_lens_attn.training.trainer import OptimConfig, Trainer, latest_checkpoint, remove_partial_checkpoints

D_IN, D_SAE = 32, 4096


def data() -> dict[Site, SiteBatch]:
    g = torch.Generator().manual_seed(0)
    D = torch.randn(64, D_IN, generator=g)
    idx = torch.rand(4096, 64, generator=g).topk(4, dim=-1).indices
    x = torch.einsum("bk,bkd->bd", torch.rand(4096, 4, generator=g) + 0.5, D[idx])
    return {Site(0): SiteBatch(x, None)}


def trainer(out_dir: Path, steps: int, every: int) -> Trainer:
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=4), init=False)
    sae.reset_parameters(torch.Generator().manual_seed(1))
    cfg = OptimConfig(lr=2e-3, steps=steps, warmup_steps=2, dead_tokens=2048, checkpoint_every=every, log_every=1)
    return Trainer({Site(0): sae}, cfg, out_dir)


def run(out_dir: Path, steps: int) -> None:
    tr = trainer(out_dir, steps, every=1)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        tr.restore(ckpt)
        remove_partial_checkpoints(out_dir)
    print("STARTED", tr.step_idx, flush=True)
    tr.fit(memory_batches(data(), 128, seed=3, start=tr.batches_consumed))
    tr.saes[Site(0)].save(out_dir / "final")
    print("DONE", flush=True)


def slow(out_dir: Path) -> None:
    tr = trainer(out_dir, steps=10_000, every=0)
    batches = memory_batches(data(), 128, seed=3)
    tr.cfg.steps = 3
    tr.fit(batches)
    tr.checkpoint()
    real = files._os_write

    def slow_write(fd, view):
        time.sleep(0.3)
        return real(fd, view)

    files._os_write = slow_write
    tr.cfg.steps = 10_000
    print("READY", flush=True)
    tr.fit(batches)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "run":
        run(out, int(sys.argv[3]))
    else:
        slow(out)
