"""A circuit the embedded model has: copying a name from its earlier occurrence in natural text (induction).

In a play, speaker names recur within a scene. Many are several tokens long (``CA SS IUS``), so at a later
occurrence, after the first piece ``a``, the model can predict the next piece ``b`` by finding the earlier
``a b`` and copying ``b`` -- the induction circuit (Olsson et al. 2022): a previous-token head in layer 0
and induction heads in layer 1.

:func:`repeated_name_prompts` cuts prompts from text so that each ends at a later occurrence's first piece
``a`` whose earlier occurrence ``a b`` lies inside the prompt. The corrupted prompt is the same text with
the earlier occurrence's second piece (every earlier ``a b`` in the prompt) replaced by ``b'``, another
name's second piece that does not follow ``a`` anywhere in the prompt; positions and everything else are
unchanged. :func:`copy_logit_diff` is ``logit[b] - logit[b']`` at the last position: large in the clean run
if the model copies, pushed towards ``b'`` in the corrupted run. This is a metric the model does well on
(``notebooks/circuit.ipynb``: about 7.6 clean vs 1.0 corrupted on the held-out plays).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from sae_lens_attn.errors import InputError
from sae_lens_attn.spec import UnsupportedModelError, model_spec


@dataclass
class CopyDataset:
    """Clean and corrupted prompts of the name-copying task; the answer is read at the last position."""

    tokens: Int[torch.Tensor, "n pos"]
    corrupted: Int[torch.Tensor, "n pos"]
    answer: Int[torch.Tensor, " n"]
    """``b``: the clean continuation (the second piece of the repeated name)."""
    alt: Int[torch.Tensor, " n"]
    """``b'``: the piece the corrupted earlier occurrence has instead."""
    earlier: Int[torch.Tensor, " n"]
    """Position of the (last) earlier occurrence's first piece ``a`` in the prompt; ``b`` is one after it."""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _name_starts(pieces: list[str]) -> list[int]:
    """Positions of the first piece of an all-capitals word of at least two pieces at the start of a line."""
    out = []
    for p in range(1, len(pieces) - 1):
        if pieces[p - 1].endswith("\n") and re.fullmatch(r"[A-Z]{2,}", pieces[p]) and re.fullmatch(r"[A-Z]+", pieces[p + 1]):
            out.append(p)
    return out


def repeated_name_prompts(model, text: str, n: int = 64, window: int = 96, seed: int = 0, min_gap: int = 8) -> CopyDataset:
    """Up to ``n`` prompts of ``window`` tokens (the policy's start token first) from ``text`` (see the
    module docstring). Raises when ``text`` has fewer than ``n`` usable repetitions within one window."""
    spec = model_spec(model)
    if spec.kind != "causal" or spec.tokens.start is None:
        raise UnsupportedModelError(f"the copying task reads a next-token prediction: {spec.family} is not a causal LM "
                                    "with a start token")
    tok = model.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    starts = _name_starts(pieces)
    seconds = sorted({ids[p + 1] for p in starts})
    rng = random.Random(seed)
    body = window - spec.tokens.n_structural
    rows: dict[str, list] = {"clean": [], "corr": [], "ans": [], "alt": [], "earlier": []}
    for j in starts:
        lo = j - body + 1
        if lo < 0:
            continue
        key = (ids[j], ids[j + 1])
        occ = [k for k in range(lo, j - min_gap) if (ids[k], ids[k + 1]) == key]
        if not occ:
            continue
        used = {ids[k + 1] for k in range(lo, j) if ids[k] == ids[j]}
        choices = [s for s in seconds if s not in used and s != ids[j + 1]]
        if not choices:
            continue
        alt = rng.choice(choices)
        clean = ids[lo : j + 1]
        corr = list(clean)
        for k in occ:
            corr[k + 1 - lo] = alt
        rows["clean"].append(spec.tokens.wrap(clean))
        rows["corr"].append(spec.tokens.wrap(corr))
        rows["ans"].append(ids[j + 1])
        rows["alt"].append(alt)
        rows["earlier"].append(occ[-1] - lo + int(spec.tokens.start is not None))
        if len(rows["ans"]) >= n:
            break
    if len(rows["ans"]) < n:
        raise InputError(f"the text has only {len(rows['ans'])} repeated multi-piece names within {window} tokens of "
                         f"each other; pass more text or a smaller n")
    return CopyDataset(torch.tensor(rows["clean"]), torch.tensor(rows["corr"]), torch.tensor(rows["ans"]),
                       torch.tensor(rows["alt"]), torch.tensor(rows["earlier"]))


def copy_logit_diff(logits: Float[torch.Tensor, "n pos vocab"], data: CopyDataset, per_prompt: bool = False) -> torch.Tensor:
    """``logit[b] - logit[b']`` at the last position, averaged over prompts (or per prompt)."""
    last = logits[:, -1]
    idx = torch.arange(last.shape[0], device=last.device)
    diff = last[idx, data.answer.to(last.device)] - last[idx, data.alt.to(last.device)]
    return diff if per_prompt else diff.mean()


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties broken by position)."""
    def ranks(v: torch.Tensor) -> torch.Tensor:
        r = torch.empty(len(v), dtype=torch.float64)
        r[v.argsort()] = torch.arange(len(v), dtype=torch.float64)
        return r

    rx, ry = ranks(x.detach().cpu()), ranks(y.detach().cpu())
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])
