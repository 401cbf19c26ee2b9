"""Preemption: SIGINT (Ctrl-C) and SIGTERM (cluster preemption, time limits) end training cleanly.

While :class:`StopSignals` is active (the trainer holds it for the duration of ``fit``), the first SIGINT or
SIGTERM only sets a flag: the trainer finishes the step it is in, writes a checkpoint and raises
:class:`TrainingInterrupted`; the CLI prints the command that resumes the run and exits 130 (SIGINT) or 143
(SIGTERM), the shell's codes for those signals. A second signal exits the process at once (``os._exit``):
a checkpoint being written is then left as a ``.tmp_*`` directory (removed by the next ``--resume``),
and the complete ``step_N`` directories are untouched, since each is only ever renamed into place whole.
The previous handlers come back when the block ends, so nothing outside training is affected.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after a complete step; ``checkpoint`` holds that step (None without an
    out_dir). A KeyboardInterrupt, so ``except Exception`` does not swallow it."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = f"wrote checkpoint {checkpoint}" if checkpoint is not None else "no out_dir, so no checkpoint"
        super().__init__(f"interrupted by {name}: finished step {step} and {where}")

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


class StopSignals:
    """Context manager: the first SIGINT/SIGTERM sets :attr:`signum`; a second one exits at once with
    status 128 + signal. Outside the main thread it installs nothing (Python delivers signals there only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            _say(f"{signal.Signals(signum).name} received: finishing this step and writing a checkpoint (send it "
                 "again to exit at once)")
            return
        _say(f"{signal.Signals(signum).name} received again: exiting now; every complete checkpoint is intact (a "
             "half-written one is discarded by --resume)")
        os._exit(128 + signum)


def _say(text: str) -> None:
    """Write to stderr from a signal handler: os.write, since the handler may run inside a buffered write
    of the main thread, and re-entering that buffer raises."""
    try:
        os.write(2, f"\n{text}\n".encode())
    except OSError:
        pass


def _is_flag(token: str, name: str) -> bool:
    """``token`` sets ``--name`` (argparse also accepts unique prefixes and ``--name=value``)."""
    key = token.split("=", 1)[0]
    return key.startswith("--") and len(key) > 2 and name.startswith(key)


def resume_command(argv: Sequence[str], prog: Sequence[str] | None = None) -> str:
    """The command line that resumes a run started with ``argv`` (the arguments after the program):
    the same arguments without ``--resume``/``--overwrite``, plus ``--resume true``."""
    args, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if _is_flag(tok, "--resume") or _is_flag(tok, "--overwrite"):
            skip = "=" not in tok
            continue
        args.append(tok)
    return shlex.join([*(prog or program()), *args, "--resume", "true"])


def program() -> list[str]:
    """How this process was started: ``sae-lens-attn`` (the entry point) or ``python -m ...cli``."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name == "sae-lens-attn":
        return ["sae-lens-attn"]
    if Path(argv0).parts[-2:] == ("training", "cli.py"):  # the old module path, still runnable
        return [sys.executable, "-m", "sae_lens_attn.training.cli"]
    return [sys.executable, "-m", "sae_lens_attn.frontends.cli"]
