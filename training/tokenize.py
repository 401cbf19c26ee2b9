"""``sae-lens-attn tokenize``: pack a corpus into token shards once (:mod:`sae_lens_attn.shards`), so every
later run (and every rank under torchrun) reads memory-mapped rows instead of tokenizing again."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sae_lens_attn.errors import InputError

from .config import _check_types


@dataclass
class TokenizeConfig:
    dataset: str
    """Text/jsonl file or folder, a saved HF dataset directory, or a hub dataset id (streamed)."""
    out: str
    """Folder to write the shards and their manifest (tokens.json) into; must not hold shards already."""
    model: str | None = None
    """The model whose tokenizer and start-token rule the rows follow (hub id, local directory or .gguf file);
    empty for the embedded default model."""
    context_size: int = 128
    """Tokens per row, structural tokens included; training must use the same value."""
    start_token: str = "bos"
    """'bos' (the tokenizer's own rule), 'none', or one token's exact text such as '<|endoftext|>'."""
    tokens: int | None = None
    """Stop after this many tokens (whole rows); empty: the whole dataset."""
    text_field: str = "text"
    """Field holding the text in jsonl files and HF datasets."""
    split: str = "train"
    """Split of a HF dataset."""
    encoding: str = "utf-8"
    """Encoding of text and jsonl files."""

    def __post_init__(self) -> None:
        _check_types(self)
        if self.context_size < 2:
            raise InputError(f"TokenizeConfig.context_size must be at least 2, got {self.context_size}")
        if self.tokens is not None and self.tokens <= 0:
            raise InputError(f"TokenizeConfig.tokens must be positive or empty, got {self.tokens}")


def tokenize(cfg: TokenizeConfig, log=print) -> dict:
    """Write ``cfg.dataset``'s packed rows under ``cfg.out``; returns the manifest."""
    from sae_lens_attn.data import check_text_source, text_row_blocks
    from sae_lens_attn.models import describe_tokens, load_model, model_name, token_policy
    from sae_lens_attn.shards import write_shards

    check_text_source(cfg.dataset, cfg.encoding)
    model = load_model(cfg.model, device="cpu", start_token=cfg.start_token)
    log(describe_tokens(model))
    n_ctx = min(cfg.context_size, int(model.cfg.n_ctx))
    policy = token_policy(model)
    blocks = text_row_blocks(cfg.dataset, model.tokenizer, n_ctx, policy, cfg.text_field, cfg.split, cfg.encoding)
    max_rows = -(-cfg.tokens // n_ctx) if cfg.tokens else None
    t0 = time.perf_counter()
    manifest = write_shards(blocks, cfg.out, model.tokenizer, model_name(model), n_ctx, policy, max_rows=max_rows,
                            source=str(cfg.dataset))
    dt = time.perf_counter() - t0
    n_tok = manifest["rows"] * n_ctx
    log(f"wrote {manifest['rows']:,} rows ({n_tok:,} tokens) in {len(manifest['shards'])} shard(s) to {cfg.out} "
        f"in {dt:.1f} s ({n_tok / max(dt, 1e-9):,.0f} tokens/s); train on them with --dataset {cfg.out}")
    return manifest
