"""Load any model TransformerLens' TransformerBridge can boot: a hub id, a local directory, or the default.

The embedded default model (``assets/default_model``, built by ``sae_lens_attn.training.build_default_model``)
is a Hugging Face directory and goes through exactly the code path a hub model does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import MissingFileError, UnavailableError
from .gguf import is_gguf, load_gguf
from .spec import derive_spec, model_spec
from .tokens import TokenPolicy, policy_from_tokenizer, with_start_token

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "default_model"
SAMPLE_TEXT = ASSETS / "sample_text.txt"
#: The name recorded in SAE metadata for the embedded model; ``load_model`` accepts it too.
DEFAULT_MODEL_NAME = "sae-lens-attn/shakespeare-2l"


def resolve_model_name(name_or_path: str | os.PathLike | None) -> str:
    """The name to record in metadata: the default's alias, a hub id, or a local path as given."""
    if name_or_path is None or str(name_or_path) in (DEFAULT_MODEL_NAME, "default"):
        return DEFAULT_MODEL_NAME
    return str(name_or_path)


def _local_dir(name_or_path: str | os.PathLike | None) -> Path | None:
    if name_or_path is None or str(name_or_path) in (DEFAULT_MODEL_NAME, "default"):
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise MissingFileError(
                f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; rebuild it with "
                "`python -m sae_lens_attn.training.build_default_model --corpus <shakespeare folder>`"
            )
        return DEFAULT_MODEL_DIR
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise MissingFileError(f"{p} is not a Hugging Face model directory: it has no config.json")
        return p
    return None


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    start_token: str | None = None,
):
    """Boot a model with ``TransformerBridge.boot_transformers`` and put it in eval mode, frozen.

    ``name_or_path``: a hub id (``"gpt2"``, ``"EleutherAI/pythia-70m"``), a local directory in Hugging
    Face format, a llama.cpp ``.gguf`` file (:mod:`sae_lens_attn.gguf`; dequantized to ``dtype``, the
    tokenizer read from the same file), or None for the embedded default. Parameters are frozen
    (``requires_grad=False``): the toolkit only ever differentiates with respect to activations.

    ``start_token``: the token rows and prompts start with (:func:`~sae_lens_attn.tokens.with_start_token`):
    ``"bos"`` (default: the tokenizer's own rule), ``"none"``, or one token's text such as
    ``"<|endoftext|>"``. :func:`describe_tokens` says which rule is in force (the CLIs print it at load).

    The model's :class:`~sae_lens_attn.spec.ModelSpec` (family, kind, heads, layout, tokenization policy,
    weights the checkpoint lacked) is derived here, once, and read by everything else through
    :func:`~sae_lens_attn.spec.model_spec`. Weights that were newly initialised because the checkpoint
    lacked them are reported in a warning (and loss-based metrics on such a model are refused). The
    ``transformers`` logger's level is left as it was (TransformerLens sets it to ERROR on import).
    """
    from .devices import check_device

    gguf = is_gguf(name_or_path)
    local = None if gguf else _local_dir(name_or_path)
    target = str(Path(str(name_or_path)).expanduser()) if gguf else str(local) if local is not None else str(name_or_path)
    device = str(check_device(device))  # before anything loads: a missing GPU is one clear error
    tf_logger = logging.getLogger("transformers")
    level = tf_logger.level
    try:
        with _loading_report() as report:
            bridge, tokenizer, source = _boot(target, gguf, device, dtype)
    finally:
        tf_logger.setLevel(level)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    bridge.sae_lens_attn_name = resolve_model_name(name_or_path)  # type: ignore[attr-defined]
    encoder = getattr(bridge.cfg, "attention_dir", "causal") == "bidirectional"
    new = tuple(sorted(report.missing)) if report.checked else None
    policy = with_start_token(policy_from_tokenizer(tokenizer, encoder), tokenizer, start_token, encoder)
    spec = dataclasses.replace(derive_spec(bridge, policy, new), source=source)
    bridge.sae_lens_attn_spec = spec  # type: ignore[attr-defined]
    if new:
        warnings.warn(
            f"{target}: {len(new)} weight(s) were not in the checkpoint and were newly initialised at load "
            f"({', '.join(new[:8])}{' ...' if len(new) > 8 else ''}); loss-based metrics (CE, KL) will be refused",
            UserWarning, stacklevel=2,
        )
    return bridge


def _boot(target: str, gguf: bool, device: str, dtype: torch.dtype):
    """``(bridge, tokenizer as saved, source description)``."""
    from transformer_lens.model_bridge import TransformerBridge

    if gguf:
        hf_model, tokenizer, info = load_gguf(target, dtype)
        bridge = TransformerBridge.boot_transformers(target, hf_model=hf_model.to(device), tokenizer=tokenizer,
                                                     device=device, dtype=dtype)
        return bridge, tokenizer, info.describe(dtype)
    try:
        bridge = TransformerBridge.boot_transformers(target, device=device, dtype=dtype)
    except OSError as err:
        raise UnavailableError(
            f"could not load model {target!r}: it is not a local directory and the hub could not serve it "
            f"({err.__class__.__name__}: {err}). Pass a local Hugging Face directory or .gguf file, or check the "
            "hub id and the network"
        ) from err
    return bridge, _saved_tokenizer(target, bridge), ""


class _Report:
    def __init__(self) -> None:
        self.missing: set[str] = set()
        self.checked = False


@contextmanager
def _loading_report():
    """Record the keys ``transformers`` reports missing from the checkpoint (newly initialised) while a
    model loads. ``transformers`` hands every load's structured report to ``log_state_dict_report``; it is
    wrapped for the duration. Where this ``transformers`` has no such function, ``checked`` stays False."""
    report = _Report()
    try:
        import transformers.modeling_utils as mu
    except ImportError:  # pragma: no cover
        yield report
        return
    original = getattr(mu, "log_state_dict_report", None)
    if original is None:
        yield report
        return
    report.checked = True

    def wrapped(model, pretrained_model_name_or_path, ignore_mismatched_sizes, loading_info, *a, **kw):
        report.missing |= {str(k) for k in getattr(loading_info, "missing_keys", ()) or ()}
        report.missing |= {str(k[0]) for k in getattr(loading_info, "mismatched_keys", ()) or ()}
        return original(model, pretrained_model_name_or_path, ignore_mismatched_sizes, loading_info, *a, **kw)

    mu.log_state_dict_report = wrapped
    try:
        yield report
    finally:
        mu.log_state_dict_report = original


def _saved_tokenizer(target: str, bridge):
    """The tokenizer as saved with the model (the bridge changes a missing BOS/EOS into ``<|endoftext|>``)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(target)
    except Exception:  # remote-code or unusual tokenizers: the bridge's copy, read with care by the policy
        return bridge.tokenizer


def model_name(model) -> str:
    """The name to record in SAE metadata for a model returned by :func:`load_model`."""
    return getattr(model, "sae_lens_attn_name", None) or getattr(model.cfg, "model_name", "unknown")


def bos_token_id(model) -> int | None:
    """The token every row and prompt starts with under the model's tokenization policy (BOS, EOS standing
    in for a missing BOS, or CLS for encoders), or None when the policy has none."""
    return model_spec(model).tokens.start


def describe_tokens(model) -> str:
    """One line for logs: how rows and prompts are framed, and where the weights came from."""
    spec = model_spec(model)
    src = f"; weights: {spec.source}" if spec.source else ""
    return f"{model_name(model)}: rows and prompts are {spec.tokens.describe()} (start_token {spec.tokens.start_token!r}){src}"


def token_policy(model) -> TokenPolicy:
    """The model's tokenization policy (:mod:`sae_lens_attn.tokens`)."""
    return model_spec(model).tokens


def model_device(model) -> torch.device:
    return next(iter(model.parameters())).device
