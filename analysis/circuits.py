"""Circuits through an attention SAE: IOI prompts, the logit-difference metric, the SAE spliced in with its
error term, feature ablations and noising (Wang et al. 2022; Kissane et al. 2024, section 5; Marks et al. 2024
for the error term and attribution patching).

With the SAE spliced in as ``x = x_hat(f) + err`` (err = x - x_hat computed on the same forward pass), the
model's output is unchanged until features are edited; an edit ``f -> f'`` then changes the site's activation
by exactly ``x_hat(f') - x_hat(f)``. Works on any causal LM TransformerBridge loads: prompts are built from
the model's own tokenizer, and names that are not single tokens for it are dropped.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int

from sae_lens_attn.activations import splice
from sae_lens_attn.models import model_device
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site
from sae_lens_attn.spec import model_spec

from ._common import FeatureIds, feature_ids, sae_site

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
            raise ValueError(f"prompt {text!r}: the names do not tokenize to single, separate tokens")
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
        raise ValueError(
            f"only {len(pool)} of the candidate names are single tokens for this tokenizer ({pool}); pass names= "
            "with at least 3 names that are"
        )
    for p in patterns:
        if p not in ("ABBA", "BABA"):
            raise ValueError(f"IOI patterns are 'ABBA' and 'BABA', got {p!r}")
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
        raise ValueError(f"the ABC corruption needs at least 5 single-token names, the tokenizer has {len(pool)}")
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
            raise ValueError(f"corrupted prompt {prompts[i]!r} has a different length than the clean one")
        tokens[i, : len(r)] = torch.tensor(r)
    return replace(data, prompts=prompts, tokens=tokens, specs=[dict(s) for s in data.specs])


def logit_diff(logits: Float[torch.Tensor, "batch pos vocab"], data: IOIDataset, per_prompt: bool = False) -> torch.Tensor:
    """``logit[end, IO] - logit[end, S]``, averaged over prompts (or per prompt)."""
    idx = torch.arange(len(data))
    end = data.positions["end"].to(logits.device)
    at_end = logits[idx, end]
    diff = at_end[idx, data.io_tokens.to(logits.device)] - at_end[idx, data.s_tokens.to(logits.device)]
    return diff if per_prompt else diff.mean()


# --- the SAE spliced in ------------------------------------------------------------------------------------

Positions = Bool[torch.Tensor, "batch pos"] | Int[torch.Tensor, " batch"] | None


def position_mask(positions: Positions, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, pos] bool: a mask as is, one index per row, or None for every position."""
    if positions is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    positions = torch.as_tensor(positions)
    if positions.dtype == torch.bool:
        if positions.shape != tokens.shape:
            raise ValueError(f"a position mask must have the tokens' shape {tuple(tokens.shape)}, got {tuple(positions.shape)}")
        return positions.to(tokens.device)
    if positions.shape != (tokens.shape[0],):
        raise ValueError(f"positions must be one index per row ({tokens.shape[0]},), got {tuple(positions.shape)}")
    m = torch.zeros_like(tokens, dtype=torch.bool)
    m[torch.arange(tokens.shape[0]), positions.to(tokens.device)] = True
    return m


FeatureEdit = Callable[[Float[torch.Tensor, "batch pos d_sae"]], Float[torch.Tensor, "batch pos d_sae"]]


class SplicedOutput(NamedTuple):
    logits: Float[torch.Tensor, "batch pos vocab"]
    features: Float[torch.Tensor, "batch pos d_sae"]
    """The SAE's features on this run, before the edit."""
    error: Float[torch.Tensor, "batch pos d_in"]
    """The error term ``x - x_hat``."""


@contextmanager
def sae_spliced(model, sae: SAE, site: Site | None = None, edit: FeatureEdit | None = None, record: dict | None = None):
    """Inside the block, ``site``'s activation is ``x_hat(edit(f)) + (x - x_hat(f))``.

    Without ``edit`` the output is the clean model's (up to float rounding). ``record``, if given, receives
    ``features`` (before the edit) and ``error``. Hooks are removed on exit, also on error.
    """
    site = sae_site(sae, site)
    sae.check_site(site, model.cfg)

    def fn(flat: torch.Tensor) -> torch.Tensor:
        x = flat.to(sae.W_enc.device, sae.W_enc.dtype)
        feats = sae.encode(x)
        err = x - sae.decode(feats)
        if record is not None:
            record["features"] = feats.detach()
            record["error"] = err.detach()
        new = feats if edit is None else edit(feats)
        return (sae.decode(new) + err).to(flat.device)

    with splice(model, site, fn):
        yield model


@torch.no_grad()
def run_spliced(model, sae: SAE, tokens: torch.Tensor, site: Site | None = None, edit: FeatureEdit | None = None) -> SplicedOutput:
    """One forward pass with the SAE spliced in (and ``edit`` applied to its features)."""
    rec: dict = {}
    tokens = tokens.to(model_device(model))
    with sae_spliced(model, sae, site, edit, rec):
        logits = model(tokens, return_type="logits")
    return SplicedOutput(logits, rec["features"], rec["error"])


def _set_features(features: FeatureIds, d_sae: int, mask: torch.Tensor, values: Callable[[torch.Tensor], torch.Tensor]) -> FeatureEdit:
    ids = feature_ids(features, d_sae)

    def edit(f: torch.Tensor) -> torch.Tensor:
        out = f.clone()
        m = mask.to(f.device)
        sel = out[..., ids.to(f.device)]
        out[..., ids.to(f.device)] = torch.where(m[..., None], values(sel), sel)
        return out

    return edit


@torch.no_grad()
def feature_means(model, sae: SAE, tokens: torch.Tensor, positions: Positions = None, site: Site | None = None) -> Float[torch.Tensor, " d_sae"]:
    """Mean of every feature over the chosen positions of ``tokens`` (mean-ablation values)."""
    out = run_spliced(model, sae, tokens, site)
    m = position_mask(positions, tokens.to(out.features.device))
    return out.features[m].mean(0)


@torch.no_grad()
def ablate_features(
    model,
    sae: SAE,
    tokens: torch.Tensor,
    features: FeatureIds,
    positions: Positions = None,
    mode: Literal["zero", "mean"] = "zero",
    means: Float[torch.Tensor, " d_sae"] | None = None,
    site: Site | None = None,
) -> Float[torch.Tensor, "batch pos vocab"]:
    """Logits with ``features`` zero- or mean-ablated at ``positions`` (error term kept).

    ``mode="mean"`` uses ``means`` (e.g. :func:`feature_means` over a reference distribution), else the
    features' means over ``positions`` of ``tokens`` themselves.
    """
    tokens = tokens.to(model_device(model))
    mask = position_mask(positions, tokens)
    ids = feature_ids(features, sae.cfg.d_sae)
    if mode == "zero":
        edit = _set_features(ids, sae.cfg.d_sae, mask, torch.zeros_like)
    elif mode == "mean":
        mu = means if means is not None else feature_means(model, sae, tokens, mask, site)
        sel = mu.to(sae.W_enc.device)[ids.to(sae.W_enc.device)]
        edit = _set_features(ids, sae.cfg.d_sae, mask, lambda cur: sel.to(cur.device).expand_as(cur))
    else:
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    return run_spliced(model, sae, tokens, site, edit).logits


@torch.no_grad()
def patch_features(
    model,
    sae: SAE,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    features: FeatureIds,
    positions: Positions = None,
    site: Site | None = None,
) -> Float[torch.Tensor, "batch pos vocab"]:
    """Noising: logits of the clean run with ``features`` at ``positions`` set to their values on the
    corrupted prompt (same shape; the clean run's error term kept)."""
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean and corrupted tokens must have one shape, got {tuple(clean.shape)} and {tuple(corrupted.shape)}")
    corr = run_spliced(model, sae, corrupted, site).features
    clean = clean.to(model_device(model))
    mask = position_mask(positions, clean)
    ids = feature_ids(features, sae.cfg.d_sae).to(corr.device)
    corr_sel = corr[..., ids]

    def edit(f: torch.Tensor) -> torch.Tensor:
        out = f.clone()
        sel = out[..., ids]
        out[..., ids] = torch.where(mask.to(f.device)[..., None], corr_sel.to(f.device), sel)
        return out

    return run_spliced(model, sae, clean, site, edit).logits


class FeatureAttribution(NamedTuple):
    """First-order estimate of patching each feature from the corrupted run (attribution patching)."""

    attribution: Float[torch.Tensor, "batch pos d_sae"]
    """``(f_corrupted - f_clean) * d metric / d f`` at the clean run."""
    clean_metric: float
    corrupted_metric: float


def attribute_features(
    model,
    sae: SAE,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: Callable[[torch.Tensor], torch.Tensor],
    site: Site | None = None,
) -> FeatureAttribution:
    """Which features matter for ``metric`` (e.g. ``lambda logits: logit_diff(logits, data)``): the gradient of
    the metric with respect to the spliced-in features, times their change under the corruption (Syed et al.
    2023; Marks et al. 2024). Rank with ``attribution.sum(0)`` and check the top ones with
    :func:`patch_features` / :func:`ablate_features`."""
    site = sae_site(sae, site)
    corr = run_spliced(model, sae, corrupted, site)
    leaf: dict = {}

    def edit(f: torch.Tensor) -> torch.Tensor:
        f = f.detach().requires_grad_(True)
        leaf["f"] = f
        return f

    clean = clean.to(model_device(model))
    with torch.enable_grad(), sae_spliced(model, sae, site, edit):
        logits = model(clean, return_type="logits")
        value = metric(logits)
        (grad,) = torch.autograd.grad(value, leaf["f"])
    with torch.no_grad():
        clean_f = leaf["f"].detach()
        attribution = (corr.features.to(clean_f.device) - clean_f) * grad
    return FeatureAttribution(attribution, float(value.detach()), float(metric(corr.logits)))


def top_features(attribution: Float[torch.Tensor, "batch pos d_sae"], mask: torch.Tensor | None = None, n: int = 10,
                 ) -> list[tuple[int, float]]:
    """Features with the largest total |attribution| over the batch at ``mask`` (all positions when None),
    as ``(feature, summed attribution)``."""
    a = attribution if mask is None else attribution * mask.to(attribution.device)[..., None]
    total = a.sum((0, 1))
    order = total.abs().argsort(descending=True)[:n]
    return [(int(i), float(total[i])) for i in order]
