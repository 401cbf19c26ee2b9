"""The token rows a training run reads: only as many as it trains and evaluates on.

The run needs ``eval_rows`` rows to evaluate on and rows holding ``steps * batch_size`` kept tokens to
train on (kept: not a structural token, when those are dropped). Rows are read from the source lazily
(:func:`sae_lens_attn.data.iter_row_blocks` through ``token_rows``' block reader) until that many are in
hand, so a 20k-token run on a 100 MB corpus tokenizes about 20k tokens, not 100 MB.

The rows read are then shuffled by row (seeded) and the first ``min(eval_rows, rows // 4)`` held out for
evaluation, as before; a source smaller than the run's need is read whole and reused for several epochs,
which the log says with the count of tokens it holds. A worst-case bound keeps the training share large
enough whichever rows the shuffle holds out: the kept tokens read, minus ``eval_rows`` full rows, must
reach the training budget.
"""

from __future__ import annotations

import numpy as np
import torch

from sae_lens_attn.data import EmptyDatasetError, text_row_blocks
from sae_lens_attn.errors import InputError
from sae_lens_attn.models import SAMPLE_TEXT, token_policy

from .config import TrainConfig
from .distributed import Dist


def _kept(block: np.ndarray, special: np.ndarray | None) -> int:
    return int(block.size if special is None else (~np.isin(block, special)).sum())


def gather_rows(cfg: TrainConfig, model, context_size: int) -> tuple[torch.Tensor, bool]:
    """``(rows, whole)``: rows read until the run's need is met (see the module docstring), and whether
    the source ended first (it was read whole)."""
    policy = token_policy(model)
    special = np.asarray(sorted(policy.special), dtype=np.int64) if cfg.drop_bos and policy.special else None
    row_kept_max = context_size - (policy.n_structural if special is not None else 0)
    train_tokens, n_eval = cfg.steps * cfg.batch_size, cfg.eval_rows
    source = cfg.dataset or SAMPLE_TEXT
    blocks, n_rows, kept = [], 0, 0
    for block in text_row_blocks(source, model.tokenizer, context_size, policy, cfg.text_field, "train",
                                 cfg.encoding):
        blocks.append(block)
        n_rows, kept = n_rows + len(block), kept + _kept(block, special)
        if n_rows > n_eval and kept - n_eval * row_kept_max >= train_tokens:
            return _trim(blocks, special, n_eval, row_kept_max, train_tokens), False
    if not n_rows:
        raise EmptyDatasetError(f"dataset {source} gave no rows of {context_size} tokens: it is empty or shorter than "
                                "one row; pass more text or a smaller context size")
    return torch.from_numpy(np.concatenate(blocks)).long(), True


def _trim(blocks: list[np.ndarray], special, n_eval: int, row_kept_max: int, train_tokens: int) -> torch.Tensor:
    """The shortest prefix of the rows read that meets the need (the last block is cut at the row)."""
    rows = np.concatenate(blocks)
    kept = np.full(len(rows), rows.shape[1]) if special is None else (~np.isin(rows, special)).sum(1)
    enough = np.cumsum(kept) - n_eval * row_kept_max >= train_tokens
    enough[: n_eval + 1] = False
    end = int(np.argmax(enough)) + 1 if enough.any() else len(rows)
    return torch.from_numpy(rows[:end]).long()


def read_rows(cfg: TrainConfig, model, context_size: int, dist: Dist, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eval_rows, train_rows)`` for this run, shuffled by row with ``cfg.seed``."""
    source = cfg.dataset or SAMPLE_TEXT
    rows, whole = gather_rows(cfg, model, context_size)
    rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(cfg.seed))]
    n_eval = min(cfg.eval_rows, rows.shape[0] // 4)
    eval_rows, train_rows = rows[:n_eval], rows[n_eval:]
    if train_rows.shape[0] < dist.world_size:
        raise InputError(f"dataset {source} is too small: no rows left for training after {n_eval} eval rows")
    policy = token_policy(model)
    keep = policy.keep(train_rows) if cfg.drop_bos else torch.ones_like(train_rows, dtype=torch.bool)
    held = int(keep.sum())
    wanted = cfg.steps * cfg.batch_size
    if whole and held < wanted:
        log(f"dataset {source} holds {held:,} training tokens ({train_rows.shape[0]:,} rows of {context_size}, after "
            f"{n_eval} evaluation rows); --tokens {wanted:,} reuses them for {wanted / held:.1f} epochs")
    else:
        log(f"read {rows.shape[0]:,} rows of {context_size} tokens from {source}: {held:,} training tokens for "
            f"{wanted:,} asked, {n_eval} evaluation rows")
    return eval_rows, train_rows
