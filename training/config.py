"""The training configuration: one dataclass, a docstring under every field (they become ``--help``)."""

from __future__ import annotations

import ast
import codecs
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, fields
from typing import Literal

from sae_lens_attn.errors import InputError

SiteChoice = Literal["z", "attn_out"]
SAEChoice = Literal["topk", "gsae"]
DTypeChoice = Literal["float32", "bfloat16", "float16"]
DistChoice = Literal["auto", "off", "dp", "sites"]

_LAYERS_RE = re.compile(r"^\s*(all|\d+(\s*,\s*\d+)*)\s*$")


@dataclass
class OptimSettings:
    """The optimiser settings a user chooses, defined once: :class:`TrainConfig` takes them as flags, the
    trainer's ``OptimConfig`` (:mod:`.step`) adds the run's length and cadence to them."""

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


@dataclass
class TrainInputs:
    """What a run trains: the model, the data, the sites and the SAE (the first fields of TrainConfig)."""

    model: str | None = None
    """Hub id or local Hugging Face directory of the model; empty for the embedded default model."""
    dataset: str | None = None
    """Text/jsonl file or folder, a saved HF dataset directory, or a hub dataset id; empty for the sample text
    shipped with the default model."""
    text_field: str = "text"
    """Field holding the text in jsonl files and HF datasets."""
    encoding: str = "utf-8"
    """Encoding of text and jsonl files (e.g. 'latin-1', 'cp1252'); a file with NUL bytes, or with more than
    one byte in a hundred that does not decode, is refused as not being text in this encoding."""
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


@dataclass
class TrainConfig(OptimSettings, TrainInputs):
    """Everything one training run depends on, flat (one ``--flag`` per field, one key per field in
    ``train_config.json``): :class:`TrainInputs`, then :class:`OptimSettings`, then the fields below."""

    context_size: int = 128
    """Tokens per model row (BOS first); at most the model's context."""
    start_token: str = "bos"
    """Token every row starts with and packed documents are joined by: 'bos' (the tokenizer's own rule: BOS,
    EOS standing in, or [CLS] ... [SEP]), 'none', or one token's exact text such as '<|endoftext|>'
    (SmolLM2-Instruct's BOS is the chat-turn token <|im_start|>). Recorded in the SAE's metadata, and analysis
    loads the model with it."""
    model_batch_rows: int = 32
    """Rows per model forward pass while harvesting activations."""
    eval_rows: int = 64
    """Rows held out from training data to evaluate on at the end."""
    drop_bos: bool = True
    """Leave BOS positions out of the training data (their activations are attention sinks)."""
    activation_cache: str | None = None
    """Directory of an on-disk activation cache: written on the first run (sharded safetensors + manifest),
    read back (memory-mapped, shuffled) on later runs with the same model, sites and data, skipping the model."""
    bf16_encoder: bool = False
    """Choose latents with a bf16 encoder GEMM (the kept values are recomputed in fp32)."""
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
    """Show a live progress bar (rank 0 only under torchrun)."""
    resume: bool = False
    """Continue from the latest complete checkpoint in out_dir (weights, optimizer, schedule, RNG state, data
    position, dead-latent counters); starts afresh when there is none. The other settings must match the
    checkpointed run's (train_config.json), and the checkpoints must carry its run id."""
    overwrite: bool = False
    """Delete the files of an earlier run in out_dir (its SAEs, checkpoints, logs, train_config.json) and
    start afresh; other files there are left alone. Without it (or resume), a fresh run refuses an out_dir
    that holds a run."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) (and cuBLAS' fixed workspace on CUDA): bit-identical reruns
    on the same hardware and software, at some speed cost on CUDA."""
    distributed: DistChoice = "auto"
    """Multi-process mode under torchrun: 'dp' (data parallel: each rank trains every SAE on its share of the
    batch), 'sites' (each rank trains a subset of the layers' SAEs), 'off' (one process); 'auto' is dp when
    WORLD_SIZE > 1, else off."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs the wandb package; WANDB_MODE=offline works without a
    network). The JSONL log in out_dir is always written."""

    def __post_init__(self) -> None:
        _check_types(self)
        self._check_sizes()
        self._check_rates()
        self._check_site()
        self._check_run_settings()
        self._check_strings()

    def _check_sizes(self) -> None:
        """Widths, counts and lengths: positive integers (``d_sae`` and ``auxk_k`` may be empty)."""
        positive = ("k", "expansion_factor", "tokens", "batch_size", "context_size", "model_batch_rows", "dead_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise InputError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("d_sae", "auxk_k"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"TrainConfig.{name} must be a positive integer or empty, got {value!r}")
        if self.d_sae is not None and self.k > self.d_sae:
            raise InputError(f"TrainConfig.k ({self.k}) must not exceed d_sae ({self.d_sae})")

    def _check_rates(self) -> None:
        """The learning rate, its decay share and the loss weights: finite, in range."""
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.decay_fraction) and 0 <= self.decay_fraction <= 1):
            raise InputError(f"TrainConfig.decay_fraction must be in [0, 1], got {self.decay_fraction!r}")
        for name in ("gsae_beta", "auxk_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")

    def _check_site(self) -> None:
        """A head only on hook_z, and never negative."""
        if self.head is not None and self.site != "z":
            raise InputError("TrainConfig.head needs site 'z' (hook_attn_out has no head axis)")
        if self.head is not None and self.head < 0:
            raise InputError(f"TrainConfig.head must be >= 0, got {self.head!r}")

    def _check_run_settings(self) -> None:
        """Cadences, the context, the seed, the layers, and resume against overwrite."""
        for name in ("warmup_steps", "checkpoint_every", "eval_rows"):
            if getattr(self, name) < 0:
                raise InputError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.log_every <= 0:
            raise InputError(f"TrainConfig.log_every must be a positive integer, got {self.log_every!r}")
        if self.context_size < 2:
            raise InputError(f"TrainConfig.context_size must be at least 2, got {self.context_size}")
        if not 0 <= self.seed < 2**31:
            raise InputError(f"TrainConfig.seed must be in [0, 2**31), got {self.seed!r}")
        if not _LAYERS_RE.match(self.layers):
            raise InputError(
                f"TrainConfig.layers must be 'all' or comma-separated layer numbers such as '0,1', got {self.layers!r}"
            )
        if self.resume and self.overwrite:
            raise InputError("TrainConfig.resume and TrainConfig.overwrite exclude each other: resume continues the "
                             "run in out_dir, overwrite deletes it; pass one of them")

    def _check_strings(self) -> None:
        """The encoding is known, no name is blank, the device is a torch device."""
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise InputError(f"TrainConfig.encoding {self.encoding!r} is not a known text encoding; use e.g. "
                             "'utf-8', 'latin-1' or 'cp1252'") from None
        for name in ("model", "dataset", "activation_cache", "wandb_project", "text_field", "out_dir", "start_token"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise InputError(f"TrainConfig.{name} must not be blank (leave it empty/None instead), got {value!r}")
        if self.device is not None:
            try:
                import torch

                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise InputError(
                    f"TrainConfig.device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {self.device!r}"
                ) from None

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(inner) + " or empty (None)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_types(cfg) -> None:
    """Every field holds a value of its annotated type: the message names the field and what it takes."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if not _matches(value, hints[f.name]):
            raise InputError(
                f"{type(cfg).__name__}.{f.name} must be {_describe(hints[f.name])}, got {value!r}"
            )


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's docstring (the string literal under it), read from the source of ``cls`` and of the
    dataclasses it takes fields from."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__dataclass_fields__" not in vars(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
