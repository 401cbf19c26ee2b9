"""Shared plumbing for the per-tool step scripts: arguments, thread setup, memory and timing.

Every step script (ours_step.py, gemm_floor.py, peers/*.py) runs in its *own* process, possibly in another
virtual environment (the peers' venvs do not have sae_lens_attn), so this module uses only the standard
library until ``setup_torch`` is called. A step script:

1. parses the common arguments (:func:`parser`), calls :func:`setup_torch` (threads, seed) and builds the
   input batches (:func:`make_batches`: the same seeded data in every tool, since all venvs share one torch);
2. calls :meth:`Meter.start` right before building the SAE: it warms torch's lazy imports
   (:func:`warm_lazy_imports`), records RSS and resets the kernel's RSS
   high-water mark (``/proc/self/clear_refs``), so the peak seen afterwards belongs to the SAE, its
   optimizer and the step alone;
3. hands a zero-argument ``step()`` to :func:`time_steps` (warm-up, then timed steps, median);
4. prints one line ``BENCH_RESULT {json}`` (:func:`emit`), which the orchestrator parses.

Peak memory = VmHWM (after the steps) - VmRSS (before building the SAE), in MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

RESULT_PREFIX = "BENCH_RESULT "


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=24576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (Adam state, allocator, caches)")
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-batches", type=int, default=2, help="distinct input batches, cycled")
    return p


def n_threads(requested: int) -> int:
    return requested if requested > 0 else (os.cpu_count() or 1)


def setup_torch(args):
    import torch

    torch.set_num_threads(n_threads(args.threads))
    torch.manual_seed(args.seed)
    return torch


def make_batches(args, torch):
    """``n_batches`` fixed fp32 batches [batch, d_in]: a shared direction, a per-feature scale and a
    non-zero mean, so b_dec, the normalised MSE and TopK have something to do (all tools see the same)."""
    g = torch.Generator().manual_seed(args.seed)
    scale = torch.rand(args.d_in, generator=g) * 2 + 0.1
    mean = torch.randn(args.d_in, generator=g)
    out = []
    for _ in range(max(1, args.n_batches)):
        x = torch.randn(args.batch, args.d_in, generator=g) * scale + mean
        out.append(x.contiguous())
    return out


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def warm_lazy_imports() -> None:
    """Import what torch loads lazily on first use, so that no tool's peak memory counts it: building a
    ``torch.optim.Adam`` imports ``torch._dynamo`` (~75 MiB of RSS), which one tool's imports may already
    have pulled in and another's not. A throwaway Adam step on a 4-element parameter does it for all."""
    import torch

    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.Adam([p])
    (p * 2).sum().backward()
    opt.step()


class Meter:
    """RSS before building the SAE, and the high-water mark after the steps."""

    def __init__(self) -> None:
        self.rss0_kib: int | None = None
        self.hwm_reset = False

    def start(self) -> None:
        import gc

        warm_lazy_imports()
        gc.collect()
        self.rss0_kib = _proc_status_kib("VmRSS")
        self.hwm_reset = _reset_hwm()

    def peak_mib(self) -> float | None:
        hwm = _proc_status_kib("VmHWM")
        if hwm is None:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        if self.rss0_kib is None:
            return None
        return (hwm - self.rss0_kib) / 1024


def time_steps(step: Callable[[int], object], warmup: int, steps: int) -> tuple[list[float], list[float], object]:
    """Run ``step(i)`` ``warmup`` times untimed, then ``steps`` times timed. Returns (warm-up times, timed
    times, the last step's return value)."""
    warm, timed, last = [], [], None
    for i in range(warmup):
        t0 = time.perf_counter()
        last = step(i)
        warm.append(time.perf_counter() - t0)
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        last = step(i)
        timed.append(time.perf_counter() - t0)
    return warm, timed, last


def emit(tool: str, args, warm: list[float], timed: list[float], meter: Meter, extra: dict | None = None) -> dict:
    import torch

    med = statistics.median(timed) if timed else float("nan")
    rec = {
        "tool": tool,
        "d_in": args.d_in,
        "d_sae": args.d_sae,
        "k": args.k,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "warmup_times_s": warm,
        "times_s": timed,
        "median_s": med,
        "tokens_per_s": args.batch / med if timed and med > 0 else None,
        "peak_mib": meter.peak_mib(),
        "rss_before_mib": (meter.rss0_kib or 0) / 1024,
        "hwm_reset": meter.hwm_reset,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "executable": sys.executable,
    }
    rec.update(extra or {})
    print(RESULT_PREFIX + json.dumps(rec), flush=True)
    return rec


def ensure_ours_importable(repo: str) -> None:
    """Make ``sae_lens_attn`` and ``sae_lens_attn.training`` importable from a bare checkout (a machine where
    the package is not pip-installed, e.g. a lent GPU box): ``training/`` is mapped to
    ``sae_lens_attn.training`` as pyproject.toml's package-dir does."""
    import importlib
    import importlib.util

    try:
        importlib.import_module("sae_lens_attn.training.trainer")
        return
    except ModuleNotFoundError:
        pass
    if repo not in sys.path:
        sys.path.insert(0, repo)
    importlib.import_module("sae_lens_attn")
    if "sae_lens_attn.training" not in sys.modules:
        init = os.path.join(repo, "training", "__init__.py")
        spec = importlib.util.spec_from_file_location(
            "sae_lens_attn.training", init, submodule_search_locations=[os.path.join(repo, "training")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["sae_lens_attn.training"] = mod
        spec.loader.exec_module(mod)
    importlib.import_module("sae_lens_attn.training.trainer")
