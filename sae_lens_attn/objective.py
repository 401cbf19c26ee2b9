"""The model kind's own loss: next-token cross-entropy for causal LMs, masked-token cross-entropy for encoders.

Everything that needs "the model's loss" reads it from here: gradients at sites (g-SAE), CE loss recovered,
KL, circuit metrics. For an encoder, a next-token loss is meaningless (the model sees the token it would
predict), so the loss is the masked-LM one: a fixed share of the text positions (:data:`MASK_SHARE`, at least
one per row; structural tokens never) is replaced by the tokenizer's mask token, chosen by a seeded
generator, and the loss is the cross-entropy of the original tokens at those positions. Every ``[MASK]``
replaces its token (no 80/10/10 split: the evaluation is deterministic and simple to reproduce).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .spec import ModelSpec, UnsupportedModelError

#: Share of text positions masked for an encoder's masked-token loss (BERT's pre-training share).
MASK_SHARE = 0.15
#: Seed of the masking generator (fixed: the same rows are always masked the same way).
MASK_SEED = 0


class LossInput(NamedTuple):
    """What the model is run on for its loss, and where the loss is read."""

    tokens: torch.Tensor
    """[batch, pos]: the tokens as given (causal) or with the chosen positions masked (encoder)."""
    targets: torch.Tensor
    """[batch, pos]: the token to predict at each position (``-100`` where no loss is read)."""


def mask_positions(tokens: torch.Tensor, spec: ModelSpec, share: float = MASK_SHARE, seed: int = MASK_SEED) -> torch.Tensor:
    """[batch, pos] bool: the positions an encoder's masked-token loss masks (``share`` of each row's text
    positions, rounded up, at least one; a row without text positions has none)."""
    text = spec.tokens.keep(tokens)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(tokens.shape, generator=gen).to(tokens.device)
    keys = keys.masked_fill(~text, 2.0)
    n_text = text.sum(1)
    n_mask = torch.where(n_text > 0, (n_text.double() * share).ceil().long().clamp_min(1), torch.zeros_like(n_text))
    order = keys.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(tokens.shape[1], device=tokens.device).expand_as(order))
    return ranks < n_mask[:, None]


def loss_input(tokens: torch.Tensor, spec: ModelSpec, seed: int = MASK_SEED) -> LossInput:
    """The model's input and targets for its own loss on ``tokens``."""
    if spec.kind == "causal":
        targets = torch.full_like(tokens, -100)
        targets[:, :-1] = tokens[:, 1:]  # every next token, document separators included (the usual LM loss)
        return LossInput(tokens, targets)
    if spec.tokens.mask is None:
        raise UnsupportedModelError(
            f"{spec.family} is an encoder whose tokenizer has no mask token: its masked-token loss is undefined"
        )
    where = mask_positions(tokens, spec, seed=seed)
    masked = torch.where(where, torch.full_like(tokens, spec.tokens.mask), tokens)
    targets = torch.where(where, tokens, torch.full_like(tokens, -100))
    return LossInput(masked, targets)


#: Elements of a float64 temporary in :func:`token_losses` / :func:`kl_per_position` (32 MiB): positions
#: are reduced in slices of ``SLICE_ELEMENTS // vocab``, so a 49k-entry vocabulary never costs a float64
#: copy of a whole chunk's logits. Each position's value depends only on its own row of logits, so the
#: slicing leaves every number bit-identical.
SLICE_ELEMENTS = 1 << 22


def _position_slices(n_positions: int, vocab: int) -> range:
    return range(0, n_positions, max(1, SLICE_ELEMENTS // max(vocab, 1)))


def token_losses(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[batch, pos] cross-entropy at every position with a target (0 elsewhere), computed in ``dtype``
    (float64 for metrics; the logits' own dtype for gradients)."""
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = targets.reshape(-1).to(logits.device)
    if flat.shape[0] == 0:
        return torch.zeros(targets.shape, dtype=dtype, device=logits.device)
    step = _position_slices(flat.shape[0], flat.shape[1]).step
    parts = [F.cross_entropy(flat[i : i + step].to(dtype), tgt[i : i + step], reduction="none", ignore_index=-100)
             for i in range(0, flat.shape[0], step)]
    return torch.cat(parts).reshape(targets.shape)


def kl_per_position(clean_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """[batch, pos] KL(clean || other) of the output distributions, float64."""
    c = clean_logits.reshape(-1, clean_logits.shape[-1])
    o = other_logits.reshape(-1, other_logits.shape[-1])
    parts = [torch.zeros(0, dtype=torch.float64, device=c.device)]
    for i in _position_slices(c.shape[0], c.shape[1]):
        j = i + _position_slices(c.shape[0], c.shape[1]).step
        lp_c = F.log_softmax(c[i:j].double(), -1)
        lp_o = F.log_softmax(o[i:j].double(), -1)
        parts.append((lp_c.exp() * (lp_c - lp_o)).sum(-1))
    return torch.cat(parts).reshape(clean_logits.shape[:-1])
