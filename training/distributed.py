"""Training on several processes (``torchrun``), behind a do-nothing default for one.

Two layouts, chosen with ``--distributed``:

* ``dp`` (data parallel): every rank holds every SAE and trains it on its own share of each global batch.
  Gradients, the loss's normalisers and the dead-latent counters are summed across ranks, so the ranks'
  parameters stay identical and a step equals the single-process step on the concatenated global batch
  (see :class:`~sae_lens_attn.training.trainer.SiteState` for how the loss is split).
* ``sites``: every rank runs the model for its own subset of the sites (``sites[rank::world]``) and trains
  only those SAEs, each on the full stream of batches; nothing is reduced during a step, and the result is
  the single-process result site for site.

Only rank 0 writes files and logs; in ``sites`` mode it gathers the other ranks' SAEs and trainer state
for checkpoints and for the final save. ``Dist()`` is the one-process default: rank 0 of 1, and every
collective returns its input, so the single-process code path is the distributed one with no-op calls.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Literal

import torch

from sae_lens_attn.errors import InputError

Mode = Literal["none", "dp", "sites"]


class Dist:
    """One process: rank 0 of a world of 1. Every collective is the identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: Mode = "none"

    @property
    def is_main(self) -> bool:
        """Whether this rank writes files, logs and the progress bar."""
        return self.rank == 0

    @property
    def data_parallel(self) -> bool:
        return self.mode == "dp" and self.world_size > 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place; returns it."""
        return t

    def all_agree(self, ok: bool) -> bool:
        """True only if ``ok`` is true on every rank (a collective: every rank must call it)."""
        return ok

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Rank 0 gets every rank's ``obj`` (picklable, CPU tensors); other ranks get None."""
        return [obj]

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    def close(self, wait: bool = False) -> None:
        """Leave the process group; ``wait``: after every rank has arrived (the run ended normally)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, mode={self.mode!r})"


class TorchDist(Dist):
    """``torch.distributed`` underneath: gloo on CPU, NCCL on CUDA (objects always travel over gloo)."""

    def __init__(self, mode: Mode, backend: str, timeout_s: float = 1800.0):
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        self._td = td
        self.mode = mode
        self.rank = td.get_rank()
        self.world_size = td.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.backend = td.get_backend()
        # Pickled objects (checkpoint state, log records) are CPU data: a gloo group carries them even when
        # tensors go over NCCL, which would need them copied to the GPU first.
        self._cpu_group = td.new_group(backend="gloo") if self.backend != "gloo" else None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self._td.all_reduce(t, op=self._td.ReduceOp.SUM)
        return t

    def all_agree(self, ok: bool) -> bool:
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
        self._td.all_reduce(flag, op=self._td.ReduceOp.SUM, group=self._cpu_group)
        return int(flag.item()) == 0

    def gather_object(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._td.gather_object(obj, out, dst=0, group=self._cpu_group)
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._td.all_gather_object(out, obj, group=self._cpu_group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        self._td.broadcast_object_list(box, src=src, group=self._cpu_group)
        return box[0]

    def barrier(self) -> None:
        self._td.barrier(group=self._cpu_group)

    def close(self, wait: bool = False) -> None:
        if not self._td.is_initialized():
            return
        if wait:
            # A rank that tears gloo down while rank 0 still evaluates can abort in C++ ("terminate called
            # without an active exception"; seen in 2 of 15 torchrun runs of the slow test), and torchrun then
            # kills rank 0 mid-evaluation. So the ranks leave together. The wait is rank 0's evaluation, which can outlast
            # the group's 30-minute timeout at scale; a rank that dies instead is torchrun's to stop.
            self._td.monitored_barrier(group=self._cpu_group, timeout=timedelta(days=1))
        self._td.destroy_process_group()


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def resolve_mode(requested: str, world_size: int | None = None) -> Mode:
    """``auto``: ``dp`` under torchrun with more than one process, else single-process."""
    world = env_world_size() if world_size is None else world_size
    if requested == "auto":
        return "dp" if world > 1 else "none"
    if requested == "off":
        if world > 1:
            raise InputError(
                f"--distributed off, but WORLD_SIZE={world}: every process would train the same SAEs and write "
                "the same out_dir; use --distributed dp or sites, or run one process"
            )
        return "none"
    if requested in ("dp", "sites"):
        return requested  # type: ignore[return-value]
    raise InputError(f"--distributed must be auto, off, dp or sites, got {requested!r}")


def init_distributed(requested: str = "auto", device: str | None = None, timeout_s: float = 1800.0) -> Dist:
    """The ``Dist`` for this process: ``Dist()`` for one process, else a process group from torchrun's env.

    ``device``: the run's device setting; CUDA picks NCCL (and this rank's ``cuda:LOCAL_RANK``), else gloo.
    """
    mode = resolve_mode(requested)
    world = env_world_size()
    if world <= 1:
        d = Dist()
        d.mode = mode  # dp/sites with one process: every collective is still the identity
        return d
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise InputError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun --nproc-per-node N")
    use_cuda = rank_device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return TorchDist(mode, "nccl" if use_cuda else "gloo", timeout_s)


def rank_device(device: str | None, dist: Dist | None = None) -> torch.device:
    """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun; empty picks CUDA if present."""
    local = dist.local_rank if dist is not None else int(os.environ.get("LOCAL_RANK", "0"))
    world = dist.world_size if dist is not None else env_world_size()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", local)
    return dev


def shard_sites(sites: list, dist: Dist) -> list:
    """The sites this rank trains: all of them, except in ``sites`` mode (round-robin ``sites[rank::world]``)."""
    if dist.mode != "sites" or dist.world_size == 1:
        return list(sites)
    if len(sites) < dist.world_size:
        raise InputError(
            f"--distributed sites with {dist.world_size} processes needs at least as many sites, got "
            f"{len(sites)} ({[s.label for s in sites]}); train more layers, use fewer processes, or use dp"
        )
    return list(sites)[dist.rank :: dist.world_size]
