"""The training configuration: one dataclass, a docstring under every field (they become ``--help``)."""

from __future__ import annotations

import ast
import inspect
import math
from dataclasses import dataclass, fields
from typing import Literal, get_args

SiteChoice = Literal["z", "attn_out"]
SAEChoice = Literal["topk", "gsae"]
DTypeChoice = Literal["float32", "bfloat16", "float16"]


@dataclass
class TrainConfig:
    model: str | None = None
    """Hub id or local Hugging Face directory of the model; empty for the embedded default model."""
    dataset: str | None = None
    """Text/jsonl file or folder, a saved HF dataset directory, or a hub dataset id; empty for the sample text
    shipped with the default model."""
    text_field: str = "text"
    """Field holding the text in jsonl files and HF datasets."""
    layers: str = "1"
    """Layers to train on: '1', '0,1' or 'all' (one SAE per layer, all from one model pass)."""
    site: SiteChoice = "z"
    """'z': hook_z with heads concatenated (d_in = n_heads*d_head); 'attn_out': hook_attn_out (d_model)."""
    head: int | None = None
    """With site 'z': train on this one head only (d_in = d_head)."""
    sae: SAEChoice = "topk"
    """Selection rule: 'topk' (Gao et al. 2024) or 'gsae' (gradient-aware TopK, Olmo et al. 2024)."""
    k: int = 16
    """Active latents per token."""
    d_sae: int | None = None
    """Number of latents; when empty, expansion_factor * d_in."""
    expansion_factor: int = 8
    """d_sae = expansion_factor * d_in when d_sae is not given."""
    gsae_beta: float = 1.0
    """g-SAE: weight of the gradient term in the selection score (0 = TopK)."""
    tokens: int = 3_000_000
    """Training tokens per SAE (the sample is reused for several epochs when it is smaller)."""
    batch_size: int = 4096
    """Activation vectors (tokens) per optimizer step."""
    lr: float = 2e-3
    """Adam learning rate, after warm-up; decays linearly to 0 over the last decay_fraction of training."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps."""
    decay_fraction: float = 0.2
    """Share of training, at the end, over which the learning rate decays to 0."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss on dead latents (Gao et al. 2024, appendix A.2)."""
    auxk_k: int | None = None
    """Dead latents used by AuxK per token; when empty, d_in // 2."""
    dead_tokens: int = 250_000
    """A latent that has not fired for this many tokens counts as dead."""
    context_size: int = 128
    """Tokens per model row (BOS first); at most the model's context."""
    model_batch_rows: int = 32
    """Rows per model forward pass while harvesting activations."""
    eval_rows: int = 64
    """Rows held out from training data to evaluate on at the end."""
    drop_bos: bool = True
    """Leave BOS positions out of the training data (their activations are attention sinks)."""
    device: str | None = None
    """'cpu', 'cuda', 'cuda:1', ...; empty picks CUDA when available."""
    dtype: DTypeChoice = "float32"
    """Dtype the model runs in (SAEs always keep float32 weights)."""
    seed: int = 0
    """Seeds SAE initialisation and data order."""
    out_dir: str = "runs/latest"
    """Where SAEs, checkpoints and the JSONL log are written."""
    checkpoint_every: int = 250
    """Steps between checkpoints (0 turns them off)."""
    log_every: int = 10
    """Steps between JSONL log records."""
    progress: bool = True
    """Show a live progress bar."""

    def __post_init__(self) -> None:
        positive = ("k", "expansion_factor", "tokens", "batch_size", "context_size", "model_batch_rows", "dead_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("d_sae", "auxk_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"TrainConfig.{name} must be a positive integer or empty, got {value!r}")
        if self.d_sae is not None and self.k > self.d_sae:
            raise ValueError(f"TrainConfig.k ({self.k}) must not exceed d_sae ({self.d_sae})")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"TrainConfig.decay_fraction must be in [0, 1], got {self.decay_fraction!r}")
        if not (math.isfinite(self.gsae_beta) and self.gsae_beta >= 0):
            raise ValueError(f"TrainConfig.gsae_beta must be >= 0, got {self.gsae_beta!r}")
        if not (math.isfinite(self.auxk_alpha) and self.auxk_alpha >= 0):
            raise ValueError(f"TrainConfig.auxk_alpha must be >= 0, got {self.auxk_alpha!r}")
        for name, choices in (("site", SiteChoice), ("sae", SAEChoice), ("dtype", DTypeChoice)):
            if getattr(self, name) not in get_args(choices):
                raise ValueError(f"TrainConfig.{name} must be one of {get_args(choices)}, got {getattr(self, name)!r}")
        if self.head is not None and self.site != "z":
            raise ValueError("TrainConfig.head needs site 'z' (hook_attn_out has no head axis)")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.log_every <= 0 or self.eval_rows < 0:
            raise ValueError("TrainConfig: warmup_steps, checkpoint_every and eval_rows must be >= 0, log_every > 0")
        if self.context_size < 2:
            raise ValueError(f"TrainConfig.context_size must be at least 2, got {self.context_size}")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's docstring (the string literal under it), read from the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
