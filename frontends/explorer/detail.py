"""One feature at one token, as the explorer shows it: every number from the analysis API.

* DFA by head and by source position (:func:`~sae_lens_attn.analysis.dfa_by_source`): the heatmap over the
  source tokens, the pre-activation, activation and bias term (``by_head.sum() + bias == pre``);
* the SAE's error term at the token: ``||x - x_hat||^2 / ||x||^2`` at the site, and, through an upstream
  SAE, the error term's share of that layer's RDFA term;
* one RDFA step back (:func:`~sae_lens_attn.analysis.rdfa`): the DFA split into upstream components
  (embeddings, each upstream head, MLPs, biases), summed over heads and sources, and the largest single
  terms; along the feature's top head, each upstream head's term split by its own sources
  (:func:`~sae_lens_attn.analysis.rdfa_upstream_heads`) and, for every loaded SAE at an earlier layer, the
  layer's term split into that SAE's features plus its error (:func:`~sae_lens_attn.analysis.rdfa_upstream_features`);
* head shares of the decoder (hook_z SAEs), the direct logit effect (or why it is refused), and the
  feature's dashboard page when one was given.

A step the model cannot support exactly (RDFA on a model whose blocks match no known layout, logits of an
encoder) comes back as ``{"refused": "<why>"}`` in its place; the rest is still computed.
"""

from __future__ import annotations

import torch

from sae_lens_attn.analysis.dfa import dfa_by_source
from sae_lens_attn.analysis.logits import logit_effects
from sae_lens_attn.analysis.rdfa import rdfa, rdfa_upstream_features, rdfa_upstream_heads, top_terms
from sae_lens_attn.errors import InputError
from sae_lens_attn.spec import UnsupportedModelError


def _refusal(err: Exception) -> dict:
    return {"refused": str(err)}


@torch.no_grad()
def feature_detail(session, text: str, sae_id: str, feature: int, pos: int, n_logits: int = 10,
                   n_terms: int = 12) -> dict:
    e = session.entry(sae_id)
    f = session.check_feature(e, feature)
    p = session.prompt(text)
    n_pos = p.tokens.shape[1]
    if not 0 <= int(pos) < n_pos:
        raise InputError(f"token position {pos} is outside the prompt (positions 0..{n_pos - 1})")
    pos = int(pos)
    ids = p.tokens[0].tolist()
    names = session.token_texts(ids)
    out: dict = {"sae": e.id, "site": e.site.label, "layer": e.site.layer, "feature": f, "pos": pos, "token": names[pos],
                 "structural": not bool(p.keep[pos]), "dashboard": e.page(f)}
    res = dfa_by_source(session.model, e.sae, p.tokens, [f], e.site)
    encoder = session.spec.kind == "encoder"
    n_src = n_pos if encoder else pos + 1  # a causal model attends to nothing after the token
    by_head = res.by_head[0, pos, :, 0].cpu()
    top_head = int(by_head.argmax())
    out.update({
        "act": float(res.acts[0, pos, 0]), "pre": float(res.pre[0, pos, 0]), "bias": float(res.bias[0]),
        "dfa_by_head": by_head.tolist(), "top_head": top_head,
        "dfa_by_source": res.by_source[0, pos, :, :n_src, 0].cpu().tolist(),
        "sources": [{"pos": s, "text": names[s]} for s in range(n_src)],
        "explorer_act": float(p.acts[e.id][pos, f]),
    })
    out["error"] = _error(session, e, p, pos)
    out["rdfa"] = _rdfa(session, e, p, f, pos, n_terms)
    out["upstream_heads"] = _upstream_heads(session, e, p, f, pos, top_head, n_terms)
    out["upstream_features"] = _upstream_features(session, e, p, f, pos, top_head, n_terms)
    shares = session.shares(e)
    out["head_shares"] = shares[f].tolist() if shares is not None else None
    out["logits"] = _logits(session, e, f, n_logits)
    return out


def _error(session, e, p, pos: int) -> dict:
    x = p.x[e.id][pos]
    x_hat = e.sae.decode(p.acts[e.id][pos].to(e.sae.W_dec.dtype)).float()
    err = x - x_hat
    x_sq = float(x.pow(2).sum())
    return {"x_norm": x_sq**0.5, "error_norm": float(err.norm()),
            "fvu": float(err.pow(2).sum()) / x_sq if x_sq > 0 else 0.0,
            "l0": int((p.acts[e.id][pos] > 0).sum())}


def _rdfa(session, e, p, f: int, pos: int, n_terms: int) -> dict:
    try:
        step = rdfa(session.model, e.sae, p.tokens, f, pos, e.site)
    except UnsupportedModelError as err:
        return _refusal(err)
    per = step.contributions.sum((1, 2)).cpu()  # [component]
    order = per.abs().argsort(descending=True).tolist()
    return {
        "components": [{"name": step.names[i], "value": float(per[i])} for i in order],
        "value_bias": float(step.value_bias.sum()),
        "total": float(step.total.sum()),
        "top_terms": [{"component": c, "head": h, "source": s, "value": v} for c, h, s, v in top_terms(step, n_terms)],
    }


def _upstream_heads(session, e, p, f: int, pos: int, head: int, n_terms: int) -> dict:
    if e.site.layer == 0:
        return _refusal(ValueError("the SAE is at layer 0: there are no upstream heads"))
    try:
        step = rdfa_upstream_heads(session.model, e.sae, p.tokens, f, pos, head, e.site)
    except UnsupportedModelError as err:
        return _refusal(err)
    t = step.by_source.cpu()  # [layer, g, s, s']
    per_head = t.sum((2, 3))
    heads = [{"layer": layer, "head": g, "value": float(per_head[layer, g])}
             for layer in range(t.shape[0]) for g in range(t.shape[1])]
    heads.sort(key=lambda r: -abs(r["value"]))
    flat = t.flatten()
    order = flat.abs().argsort(descending=True)[:n_terms].tolist()
    terms = []
    for i in order:
        layer, g, s, s2 = torch.unravel_index(torch.tensor(i), t.shape)
        terms.append({"layer": int(layer), "head": int(g), "source": int(s), "source2": int(s2), "value": float(flat[i])})
    return {"head": head, "heads": heads, "top_terms": terms}


def _upstream_features(session, e, p, f: int, pos: int, head: int, n_terms: int) -> list[dict]:
    out = []
    for up in session.saes.values():
        if up.site.layer >= e.site.layer or (up.site.kind == "z" and up.site.head is not None):
            continue
        try:
            step = rdfa_upstream_features(session.model, e.sae, up.sae, p.tokens, f, pos, head, e.site, up.site)
        except UnsupportedModelError as err:
            out.append({"sae": up.id, **_refusal(err)})
            continue
        per = step.contributions.sum(1).cpu()  # [d_sae_up]
        order = per.abs().argsort(descending=True)[:n_terms].tolist()
        total, error, bias = float(step.total.sum()), float(step.error.sum()), float(step.bias.sum())
        out.append({
            "sae": up.id, "head": head, "total": total, "error": error, "bias": bias,
            "features_sum": float(per.sum()),
            "error_share": error / total if total != 0 else None,
            "features": [{"feature": j, "value": float(per[j]), "dashboard": up.page(j)} for j in order if per[j] != 0],
        })
    return out


def _logits(session, e, f: int, k: int) -> dict:
    try:
        eff = logit_effects(session.model, e.sae, [f], e.site, k=k)
    except UnsupportedModelError as err:
        return _refusal(err)
    tok = session.token_texts

    def rows(ids, vals):
        return [{"id": int(t), "text": s, "value": float(v)} for t, s, v in zip(ids.tolist(), tok(ids.tolist()), vals.tolist())]

    return {"top": rows(eff.top_tokens[0], eff.top_values[0]), "bottom": rows(eff.bottom_tokens[0], eff.bottom_values[0])}
