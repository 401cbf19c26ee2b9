"""Steering in the explorer: a feature added at every text position (:func:`sae_lens_attn.steering.steer`),
and what it does to the prompt's next-token distribution and to a short greedy continuation.

The continuation is ``model.generate(..., do_sample=False, stop_at_eos=False)`` (always ``n_tokens`` long) with the steering hook active, so every new
token is steered too (the key/value cache runs one position at a time; ``steer`` with ``positions=None``
handles that). Encoders have no next token: refused, naming the family.
"""

from __future__ import annotations

import torch

from sae_lens_attn.errors import InputError
from sae_lens_attn.objective import kl_per_position
from sae_lens_attn.spec import UnsupportedModelError
from sae_lens_attn.steering import steer

#: Most new tokens one steering call generates.
MAX_NEW_TOKENS = 64
#: Largest |coefficient|: decoder rows are unit vectors and activations are O(1)-O(100), so anything near
#: this only drives the logits to inf/NaN.
MAX_COEFFICIENT = 1e6


def _top(session, probs: torch.Tensor, k: int) -> list[dict]:
    vals, ids = probs.topk(k)
    names = session.token_texts(ids.tolist())
    return [{"id": int(i), "text": s, "prob": float(v)} for i, s, v in zip(ids.tolist(), names, vals.tolist())]


def _continue(session, tokens: torch.Tensor, n: int) -> list[int]:
    room = int(session.model.cfg.n_ctx) - tokens.shape[1]
    n = min(n, room)
    if n <= 0:
        return []
    out = session.model.generate(tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False,
                                     verbose=False)
    return out[0, tokens.shape[1]:].tolist()


@torch.no_grad()
def steer_prompt(session, text: str, sae_id: str, feature: int, coefficient: float, n_tokens: int = 20,
                 top: int = 10) -> dict:
    spec = session.spec
    if spec.kind == "encoder":
        raise UnsupportedModelError(
            f"{spec.family} is an encoder: it has no next token to steer (steering shows the next-token "
            "distribution and a greedy continuation of a causal LM)")
    if not 0 <= int(n_tokens) <= MAX_NEW_TOKENS:
        raise InputError(f"n_tokens must be in 0..{MAX_NEW_TOKENS}, got {n_tokens}")
    if not 1 <= int(top) <= 100:
        raise InputError(f"top must be in 1..100, got {top}")
    coefficient = float(coefficient)
    if not abs(coefficient) <= MAX_COEFFICIENT:  # also NaN
        raise InputError(f"coefficient: must be a finite number in -{MAX_COEFFICIENT:g}..{MAX_COEFFICIENT:g}, got "
                         f"{coefficient:g}")
    e = session.entry(sae_id)
    f = session.check_feature(e, feature)
    tokens = session.prompt(text).tokens
    model = session.model
    clean_logits = model(tokens, return_type="logits")[0, -1].float()
    clean_cont = _continue(session, tokens, int(n_tokens))
    with steer(model, e.sae, f, coefficient, site=e.site) as vec:
        steered_logits = model(tokens, return_type="logits")[0, -1].float()
        if not bool(torch.isfinite(steered_logits).all()):
            raise InputError(f"coefficient: {coefficient:g} drives the model's logits to inf/NaN; use a smaller "
                             "coefficient")
        steered_cont = _continue(session, tokens, int(n_tokens))
    lp_clean, lp_steer = clean_logits.log_softmax(-1), steered_logits.log_softmax(-1)
    p_clean, p_steer = lp_clean.exp(), lp_steer.exp()
    delta = p_steer - p_clean
    up, down = delta.topk(top), (-delta).topk(top)
    names = session.token_texts
    decode = session.model.tokenizer.decode

    def changes(ids: torch.Tensor) -> list[dict]:
        return [{"id": int(i), "text": s, "clean": float(p_clean[i]), "steered": float(p_steer[i]),
                 "delta": float(delta[i])} for i, s in zip(ids.tolist(), names(ids.tolist()))]

    return {
        "sae": e.id, "feature": f, "coefficient": coefficient, "positions": "every text token",
        "vector_norm": float(vec.norm()),
        "clean": _top(session, p_clean, top), "steered": _top(session, p_steer, top),
        "increased": changes(up.indices), "decreased": changes(down.indices),
        "kl": float(kl_per_position(clean_logits, steered_logits)),
        "continuation": {"clean": decode(clean_cont), "steered": decode(steered_cont),
                         "clean_ids": clean_cont, "steered_ids": steered_cont},
    }
