"""Machine description and table formatting shared by bench_step.py, bench_e2e.py and gpu_bench.py."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD/matrix extensions that decide fp32 and bf16 GEMM speed on x86."""
    want = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [w for w in want if w in flags]
    except OSError:
        pass
    return []


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_rev(repo: str) -> str | None:
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(repo: str) -> dict:
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": loadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git": git_rev(repo),
    }


def command_line() -> str:
    """The command as typed, to paste beside results (``nice -n 19`` kept if the caller used it)."""
    exe = os.path.relpath(sys.argv[0]) if os.path.exists(sys.argv[0]) else sys.argv[0]
    return "python " + " ".join(shlex.quote(a) for a in [exe, *sys.argv[1:]])


def warn_if_busy(threads: int) -> str | None:
    la = loadavg()
    if la is not None and la[0] > 0.5 * max(1, threads):
        return (f"WARNING: 1-minute load average is {la[0]} with {threads} thread(s) wanted: another job is using "
                "the CPU and the timings will be noisy (run when the machine is quiet)")
    return None


def markdown_table(headers: list[str], rows: list[list[object]], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        out.append("| " + " | ".join("" if v is None else str(v) for v in r) + " |")
    return "\n".join(out)


def text_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[("" if v is None else str(v)) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def fmt(x: float | None, spec: str = ".1f") -> str | None:
    return None if x is None else format(x, spec)
