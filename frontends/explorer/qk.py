"""Why a head attends where it does, as the explorer shows it (:func:`~sae_lens_attn.analysis.qk_attribution`).

A click on a cell of a feature's DFA-by-source heatmap names a head and a source; this view splits that
head's attention score from the feature's token (the query) to the source (the key) into query term x key
term pairs over the upstream parts (embeddings, upstream heads, MLPs, biases), with each side's totals, the
contrast against the source the head attends to most otherwise, and, for every loaded SAE at an earlier
layer, the same split with that layer's heads replaced by the SAE's active features and its error term.
A model the analysis cannot treat exactly comes back as ``{"refused": "<why>"}``.
"""

from __future__ import annotations

import torch

from sae_lens_attn.analysis.qk import QKAttribution, qk_attribution
from sae_lens_attn.spec import UnsupportedModelError


def _rows(pairs: list[tuple[str, float]]) -> list[dict]:
    return [{"name": n, "value": v} for n, v in pairs]


def attribution_json(res: QKAttribution, n: int) -> dict:
    """One attribution's numbers: the score, the model's own, the largest pairs and each side's largest totals."""
    return {
        "score": res.score, "model_score": res.model_score, "sum_error": res.sum_error,
        "pattern": list(res.pattern), "contrast_pos": res.contrast_pos, "n_query_terms": len(res.query_names),
        "n_key_terms": len(res.key_names),
        "pairs": [{"query": q, "key": k, "value": v} for q, k, v in res.top_pairs(n)],
        "query_totals": _rows(res.top("query", n)), "key_totals": _rows(res.top("key", n)),
    }


def _view_json(res: QKAttribution, n: int, sae_id: str, page) -> dict:
    out = attribution_json(res, n)
    prefix = res.saes[0] + ":"
    for rows in (out["query_totals"], out["key_totals"]):
        for r in rows:
            tail = r["name"][len(prefix):] if r["name"].startswith(prefix) else ""
            r["dashboard"] = page(int(tail)) if tail.isdigit() else None
    out["sae"] = sae_id
    out["contrast"] = attribution_json(res.contrast, n) if res.contrast is not None else None
    return out


@torch.no_grad()
def qk_detail(session, text: str, layer: int, head: int, pos: int, source: int, contrast: int | None = None,
              n_pairs: int = 12) -> dict:
    p = session.prompt(text)
    names = session.token_texts(p.tokens[0].tolist())
    ups = [e for e in session.saes.values() if e.site.layer < int(layer)]
    out: dict = {"layer": int(layer), "head": int(head), "query_pos": int(pos), "key_pos": int(source)}
    try:
        res = qk_attribution(session.model, p.tokens, int(layer), int(head), int(pos), int(source),
                             saes=[e.sae for e in ups], contrast_pos="auto" if contrast is None else int(contrast))
    except UnsupportedModelError as err:
        return {**out, "refused": str(err)}
    out.update(attribution_json(res, n_pairs))
    out.update({"kv_head": res.kv_head, "query_token": names[res.query_pos], "key_token": names[res.key_pos],
                "scale": res.scale, "softcap": res.softcap, "check": res.check, "notes": list(res.notes),
                "bias": res.bias_terms})
    c = res.contrast
    out["contrast"] = None if c is None else {**attribution_json(c, n_pairs), "token": names[c.contrast_pos]}
    out["features"] = [_view_json(v, n_pairs, e.id, e.page) for v, e in zip(res.features, ups)]
    return out
