"""Indirect object identification (Wang et al. 2022) prompts and metric, for causal LMs that do IOI.

GPT-2 small does (clean logit difference about 3-4; README, "GPT-2 small and IOI"); the embedded Shakespeare
model does not (its clean logit difference is negative), so its circuit notebook studies name copying
(:mod:`.copying`) instead. Prompts are built from the model's own tokenizer by its tokenization policy, and
names that are not single tokens for it are dropped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int

from sae_lens_attn.errors import InputError
from sae_lens_attn.spec import model_spec

#: IOI templates (Wang et al. 2022, appendix): {A} and {B} are the first two names, {S} the repeated subject.
IOI_TEMPLATES: tuple[str, ...] = (
    "When{A} and{B} went to the{PLACE},{S} gave a{OBJECT} to",
    "Then,{A} and{B} went to the{PLACE}.{S} gave a{OBJECT} to",
    "After{A} and{B} went to the{PLACE},{S} gave a{OBJECT} to",
    "While{A} and{B} were working at the{PLACE},{S} gave a{OBJECT} to",
    "When{A} and{B} got a{OBJECT} at the{PLACE},{S} decided to give it to",
    "Friends{A} and{B} found a{OBJECT} at the{PLACE}.{S} gave it to",
)
IOI_PLACES: tuple[str, ...] = ("store", "garden", "house", "school", "market", "church", "court", "castle", "field", "hall")
IOI_OBJECTS: tuple[str, ...] = ("ring", "letter", "sword", "crown", "book", "drink", "gift", "flower", "kiss", "purse")
#: Candidate names: common English names (single tokens for GPT-2) and Shakespearean ones (single tokens for
#: the embedded model). :func:`single_token_names` keeps those the model's tokenizer has as one token.
IOI_NAMES: tuple[str, ...] = (
    "John", "Mary", "Tom", "James", "Dan", "Sarah", "Paul", "Anne", "Kate", "Mark", "Lisa", "Mike", "Jane",
    "David", "Emma", "Henry", "Richard", "Edward", "George", "Alice", "Peter", "Lucy", "Rose", "Jack",
    "Romeo", "Juliet", "Caesar", "Warwick", "York", "Clarence", "Angelo", "Tybalt", "Paris", "Gloucester",
    "Buckingham", "Pompey", "Hastings", "Percy", "Margaret", "Marcius", "Claudio", "Capulet", "Montague",
    "Bolingbroke", "Northumberland",
)

IOIPattern = Literal["ABBA", "BABA"]


def single_token_names(tokenizer, names: Sequence[str] = IOI_NAMES) -> list[str]:
    """The names that are one token (with their leading space) for ``tokenizer``, deduplicated in order."""
    out: list[str] = []
    for n in names:
        if n not in out and len(tokenizer(" " + n, add_special_tokens=False)["input_ids"]) == 1:
            out.append(n)
    return out


@dataclass
class IOIDataset:
    """Tokenised IOI prompts; ``positions`` index each row (rows are right-padded to one length)."""

    prompts: list[str]
    tokens: Int[torch.Tensor, "batch pos"]
    io_tokens: Int[torch.Tensor, " batch"]
    """The indirect object (the correct answer)."""
    s_tokens: Int[torch.Tensor, " batch"]
    """The subject (the name repeated)."""
    positions: dict[str, Int[torch.Tensor, " batch"]]
    """``IO``, ``S1``, ``S2`` (the names' positions) and ``end`` (the last prompt token, where the answer is read)."""
    patterns: list[str]
    """``ABBA`` or ``BABA`` per prompt."""
    specs: list[dict]
    """What each prompt was made of (template index, place, object, names): corruptions reuse it."""

    def __len__(self) -> int:
        return len(self.prompts)

    def mask(self, name: str) -> Bool[torch.Tensor, "batch pos"]:
        """[batch, pos] True at position ``name`` of each row."""
        m = torch.zeros_like(self.tokens, dtype=torch.bool)
        m[torch.arange(len(self)), self.positions[name]] = True
        return m


def _causal_policy(model):
    """IOI prompts are read at their last token: a causal LM with a start token is needed."""
    spec = model_spec(model)
    if spec.kind != "causal" or spec.tokens.start is None:
        from sae_lens_attn.spec import UnsupportedModelError

        raise UnsupportedModelError(
            f"IOI prompts need a causal LM whose tokenizer has a BOS (or EOS) token; {spec.family} is "
            f"{'an encoder' if spec.kind == 'encoder' else 'a causal LM without one'}"
        )
    return spec.tokens


def _fill(template: str, a: str, b: str, s: str, place: str, obj: str) -> str:
    return template.format(A=" " + a, B=" " + b, S=" " + s, PLACE=" " + place, OBJECT=" " + obj)


def _build(model, specs: list[dict]) -> IOIDataset:
    tok = model.tokenizer
    policy = _causal_policy(model)
    pad = policy.start
    prompts, rows, io_ids, s_ids, pos, pats = [], [], [], [], {"IO": [], "S1": [], "S2": [], "end": []}, []
    for spec in specs:
        io, s = spec["io"], spec["s"]
        a, b = (io, s) if spec["pattern"] == "ABBA" else (s, io)
        text = _fill(IOI_TEMPLATES[spec["template"]], a, b, s, spec["place"], spec["object"])
        ids = policy.encode(tok, text)
        io_id = tok(" " + io, add_special_tokens=False)["input_ids"][0]
        s_id = tok(" " + s, add_special_tokens=False)["input_ids"][0]
        io_at = [i for i, t in enumerate(ids) if t == io_id]
        s_at = [i for i, t in enumerate(ids) if t == s_id]
        if len(io_at) != 1 or len(s_at) != 2:
            raise InputError(f"prompt {text!r}: the names do not tokenize to single, separate tokens")
        prompts.append(text)
        rows.append(ids)
        io_ids.append(io_id)
        s_ids.append(s_id)
        pos["IO"].append(io_at[0])
        pos["S1"].append(s_at[0])
        pos["S2"].append(s_at[1])
        pos["end"].append(len(ids) - 1)
        pats.append(spec["pattern"])
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return IOIDataset(
        prompts, tokens, torch.tensor(io_ids), torch.tensor(s_ids), {k: torch.tensor(v) for k, v in pos.items()},
        pats, [dict(s) for s in specs],
    )


def make_ioi(
    model,
    n: int = 32,
    seed: int = 0,
    patterns: Sequence[IOIPattern] = ("ABBA", "BABA"),
    names: Sequence[str] | None = None,
    templates: Sequence[int] | None = None,
) -> IOIDataset:
    """``n`` IOI prompts, patterns alternating; names filtered to the model's single tokens.

    ABBA: "When A and B went to the store, B gave a ring to" -> A; BABA: "When B and A ...". Right-padded
    with BOS; read the answer at ``positions["end"]``.
    """
    pool = single_token_names(model.tokenizer, names or IOI_NAMES)
    if len(pool) < 3:
        raise InputError(
            f"only {len(pool)} of the candidate names are single tokens for this tokenizer ({pool}); pass names= "
            "with at least 3 names that are"
        )
    for p in patterns:
        if p not in ("ABBA", "BABA"):
            raise InputError(f"IOI patterns are 'ABBA' and 'BABA', got {p!r}")
    rng = random.Random(seed)
    tmpl = list(templates) if templates is not None else list(range(len(IOI_TEMPLATES)))
    specs = []
    for i in range(n):
        io, s = rng.sample(pool, 2)
        specs.append({
            "template": rng.choice(tmpl), "place": rng.choice(IOI_PLACES), "object": rng.choice(IOI_OBJECTS),
            "io": io, "s": s, "pattern": patterns[i % len(patterns)],
        })
    return _build(model, specs)


def corrupt_ioi(model, data: IOIDataset, seed: int = 1, names: Sequence[str] | None = None) -> IOIDataset:
    """The "ABC" corruption (Wang et al. 2022): every name replaced by a fresh one, three distinct names per
    prompt, so the prompt keeps its template and token positions but no name repeats.

    The returned dataset's ``io_tokens`` / ``s_tokens`` are still the clean prompt's, so the logit difference
    on it measures the same answer.
    """
    pool = single_token_names(model.tokenizer, names or IOI_NAMES)
    if len(pool) < 5:
        raise InputError(f"the ABC corruption needs at least 5 single-token names, the tokenizer has {len(pool)}")
    rng = random.Random(seed)
    tok = model.tokenizer
    policy = _causal_policy(model)
    prompts, rows = [], []
    for spec in data.specs:
        a_io, a_s = spec["io"], spec["s"]
        x, y, z = rng.sample([p for p in pool if p not in (a_io, a_s)], 3)
        a, b = (x, y) if spec["pattern"] == "ABBA" else (y, x)
        text = _fill(IOI_TEMPLATES[spec["template"]], a, b, z, spec["place"], spec["object"])
        prompts.append(text)
        rows.append(policy.encode(tok, text))
    tokens = torch.full_like(data.tokens, policy.start)
    for i, r in enumerate(rows):
        if len(r) != int(data.positions["end"][i]) + 1:
            raise InputError(f"corrupted prompt {prompts[i]!r} has a different length than the clean one")
        tokens[i, : len(r)] = torch.tensor(r)
    return replace(data, prompts=prompts, tokens=tokens, specs=[dict(s) for s in data.specs])


def logit_diff(logits: Float[torch.Tensor, "batch pos vocab"], data: IOIDataset, per_prompt: bool = False) -> torch.Tensor:
    """``logit[end, IO] - logit[end, S]``, averaged over prompts (or per prompt)."""
    idx = torch.arange(len(data))
    end = data.positions["end"].to(logits.device)
    at_end = logits[idx, end]
    diff = at_end[idx, data.io_tokens.to(logits.device)] - at_end[idx, data.s_tokens.to(logits.device)]
    return diff if per_prompt else diff.mean()
