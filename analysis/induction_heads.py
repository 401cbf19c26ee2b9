"""Which heads write the SAE's induction features, and why that can differ from the head with the top
attention-pattern induction score.

On ``[BOS, r, r]`` a feature's DFA through head h from the induction source s* (the token after the earlier
occurrence) factors as ``A_h[t, s*] * (v_h[s*] . e_{h,i})``: the attention the head pays to s* (what the
induction *score* measures) times how strongly the value vector it fetches from there reads out along the
feature's encoder block (its OV circuit, seen through the SAE). Two heads that attend equally well can write
very different amounts into a feature; the head that *writes* an induction feature is the one with both. This
module measures both factors per head over the firing second-copy tokens of the induction features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site

from ._common import sae_site
from .dfa import dfa_by_source
from .induction import head_induction_scores


class InductionWriter(NamedTuple):
    """One head's part in writing the induction features."""

    head: int
    induction_score: float
    """Attention-pattern induction score on the same tokens (mean attention from t to s*)."""
    attention: float
    """Mean attention to s* on the firing second-copy tokens of the features."""
    value_readout: float
    """Mean ``v_h[s*] . e_{h,i}`` there: how much of the fetched value lies along the feature's encoder."""
    dfa_share: float
    """This head's share of the features' positive DFA on those tokens."""
    n_top: int
    """Induction features for which this head writes the largest share."""


@torch.no_grad()
def induction_writers(model, sae: SAE, features: Sequence[int], tokens: torch.Tensor,
                      site: Site | None = None) -> list[InductionWriter]:
    """Per head of the SAE's layer, its attention and value read-out at the induction source for
    ``features`` on ``tokens`` (``[BOS, r, r]`` rows, :func:`~.induction.repeated_tokens`)."""
    site = sae_site(sae, site)
    if not features:
        return []
    length = (tokens.shape[1] - 1) // 2
    res = dfa_by_source(model, sae, tokens, list(features), site)
    second = torch.arange(length + 1, 2 * length + 1)
    src = second - length + 1
    by_src = res.by_source[:, second].cpu()  # [n, len, head, k, f]
    n_seq, n_len, n_head, _, n_f = by_src.shape
    at = by_src.gather(3, src.view(1, n_len, 1, 1, 1).expand(n_seq, n_len, n_head, 1, n_f)).squeeze(3)  # DFA from s*
    pattern = res.pattern.cpu()[:, :, second]  # [n, head, len, k]
    attn = pattern.gather(3, src.view(1, 1, n_len, 1).expand(n_seq, n_head, n_len, 1)).squeeze(3)  # [n, head, len]
    attn = attn.permute(0, 2, 1)[..., None].expand_as(at)  # [n, len, head, f]
    fired = (res.acts[:, second].cpu() > 0)[:, :, None, :].expand_as(at)  # [n, len, head, f]
    readout = torch.where(attn > 1e-6, at / attn.clamp_min(1e-6), torch.zeros_like(at))
    pos_dfa = res.by_head[:, second].cpu().clamp_min(0) * fired  # [n, len, head, f]
    per_feature = pos_dfa.sum((0, 1))  # [head, f]
    shares = per_feature.sum(-1) / per_feature.sum().clamp_min(1e-30)
    tops = per_feature.argmax(0)
    scores = head_induction_scores(model, tokens=tokens).induction[site.layer]
    n = fired.sum((0, 1, 3)).clamp_min(1)  # [head]
    out = []
    for h in range(at.shape[2]):
        mask = fired[:, :, h]
        out.append(InductionWriter(
            h, float(scores[h]), float((attn[:, :, h] * mask).sum() / n[h]),
            float((readout[:, :, h] * mask).sum() / n[h]), float(shares[h]), int((tops == h).sum()),
        ))
    return out


def explain_writers(writers: list[InductionWriter], layer: int) -> str:
    """Which head writes the induction features and, where it is not the top-scoring head, why."""
    if not writers:
        return "no induction features to attribute"
    by_dfa = max(writers, key=lambda w: w.dfa_share)
    by_score = max(writers, key=lambda w: w.induction_score)
    lines = [f"L{layer}H{by_dfa.head} writes {by_dfa.dfa_share:.0%} of the induction features' DFA and is the top "
             f"writer of {by_dfa.n_top} of {sum(w.n_top for w in writers)} of them."]
    if by_score.head != by_dfa.head:
        lines.append(
            f"L{layer}H{by_score.head} has the top attention-pattern score ({by_score.induction_score:.2f} vs "
            f"{by_dfa.induction_score:.2f}) but writes {by_score.dfa_share:.0%}: on these tokens it attends to the "
            f"induction source about as much ({by_score.attention:.2f} vs {by_dfa.attention:.2f}), while the value it "
            f"fetches reads out {by_score.value_readout:+.3f} along the features' encoder, against "
            f"{by_dfa.value_readout:+.3f} for L{layer}H{by_dfa.head}. DFA = attention x value read-out: the score "
            "says where a head looks, DFA what its output writes into the feature."
        )
    return " ".join(lines)


def format_writers(writers: list[InductionWriter], layer: int) -> str:
    rows = [f"  L{layer}H{w.head}: induction score {w.induction_score:.2f}, attention to s* {w.attention:.2f}, "
            f"value read-out {w.value_readout:+.3f}, DFA share {w.dfa_share:.0%}, top writer of {w.n_top}"
            for w in writers]
    return "\n".join(rows)
