"""Neuronpedia export: feature data in the batch JSON layout of Neuronpedia's uploader.

A front end: the records are built from the analysis (feature statistics, logit weights), so this module
stands above :mod:`sae_lens_attn.analysis`; the SAELens export, which needs no analysis, stays in
:mod:`sae_lens_attn.interop`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sae_lens_attn.analysis._common import decode_token
from sae_lens_attn.analysis.features import Example, FeatureStats, StatsConfig, feature_stats
from sae_lens_attn.analysis.logits import logit_weights
from sae_lens_attn.errors import InputError
from sae_lens_attn.files import ensure_dir, write_json
from sae_lens_attn.sae import SAE
from sae_lens_attn.sites import Site


def _round(values, digits: int = 3) -> list[float]:
    return [round(float(v), digits) for v in values]


def _example(tok, ex: Example, bin_min: float, bin_max: float, contains: float) -> dict[str, Any]:
    """One entry of a record's ``activations``: the example's tokens and the feature's value on each."""
    keep = [i for i, t in enumerate(ex.tokens) if t >= 0]
    values = _round(ex.acts[i] for i in keep)
    return {"binMin": bin_min, "binMax": bin_max, "binContains": contains,
            "tokens": [decode_token(tok, ex.tokens[i]) for i in keep], "values": values,
            "maxValue": max(values) if values else 0.0, "lossValues": []}


def _examples(tok, stats: FeatureStats, f: int, n_quantile_bins: int, per_bin: int) -> list[dict[str, Any]]:
    """The top examples (``binMin=-1``, ``binContains=-1``), then examples from equal-count quantiles."""
    acts = [_example(tok, ex, -1, round(ex.activation, 3), -1) for ex in stats.top_examples(f)]
    for label, group in stats.quantile_examples(f, n_bins=n_quantile_bins, per_bin=per_bin):
        lo, hi = (float(x) for x in label.split(" - "))
        acts += [_example(tok, ex, round(lo, 3), round(hi, 3), round(1.0 / n_quantile_bins, 3)) for ex in group]
    return acts


def _record(tok, stats: FeatureStats, j: int, f: int, w: torch.Tensor, n_logits: int,
            acts: list[dict[str, Any]]) -> dict[str, Any]:
    """Feature ``f``'s record: logit effects and their histogram, density and activation histogram."""
    top, bottom = w.topk(n_logits), w.topk(n_logits, largest=False)
    centres, counts = stats.histogram(f)
    lh_counts, lh_edges = torch.histogram(w, bins=40)
    return {
        "featureIndex": f,
        "pos_str": [decode_token(tok, t) for t in top.indices.tolist()],
        "pos_values": _round(top.values),
        "neg_str": [decode_token(tok, t) for t in bottom.indices.tolist()],
        "neg_values": _round(bottom.values),
        "frac_nonzero": int(stats.fire_count[j]) / max(1, stats.n_tokens),
        "freq_hist_data_bar_values": _round(centres[counts > 0]),
        "freq_hist_data_bar_heights": [int(c) for c in counts[counts > 0]],
        "logits_hist_data_bar_values": _round((lh_edges[:-1] + lh_edges[1:]) / 2),
        "logits_hist_data_bar_heights": [int(c) for c in lh_counts],
        "num_tokens_for_dashboard": stats.n_tokens,
        "activations": acts,
    }


def neuronpedia_features(
    model,
    sae: SAE,
    rows: torch.Tensor,
    features: Sequence[int] | None = None,
    *,
    site=None,
    n_top: int = 20,
    n_quantile_bins: int = 4,
    per_bin: int = 5,
    ctx_left: int = 24,
    ctx_right: int = 8,
    n_logits: int = 10,
) -> list[dict[str, Any]]:
    """Per-feature records in Neuronpedia's layout (the ``features`` list of an upload batch).

    Each record: ``featureIndex``; ``pos_str``/``pos_values`` and ``neg_str``/``neg_values`` (top and bottom
    ``n_logits`` tokens of the feature's direct logit effect); ``frac_nonzero`` (density on ``rows``);
    ``freq_hist_data_bar_values``/``_heights`` (activation histogram); ``logits_hist_data_bar_values``/
    ``_heights`` (histogram of the logit effect over the vocabulary); ``num_tokens_for_dashboard``; and
    ``activations``: the top examples (``binMin=-1``, ``binContains=-1``) then examples from equal-count
    activation quantiles (``binMin``/``binMax`` the quantile's range, ``binContains`` its share), each with
    ``tokens`` (strings), ``values`` (the feature's activation on every token) and ``maxValue``.
    """
    ids = list(range(sae.cfg.d_sae)) if features is None else [int(f) for f in features]
    stats = feature_stats(
        model, sae, rows, ids, site=site,
        cfg=StatsConfig(n_top=n_top, n_samples=max(n_quantile_bins * per_bin * 4, 16), ctx_left=ctx_left,
                        ctx_right=ctx_right),
    )
    weights = logit_weights(model, sae, ids, site).float().cpu()
    tok = model.tokenizer
    return [_record(tok, stats, j, f, weights[j], n_logits, _examples(tok, stats, f, n_quantile_bins, per_bin))
            for j, f in enumerate(ids)]


def _layer(sae: SAE, site) -> int | None:
    """Neuronpedia's ``layer`` field: the SAE's hook layer, else the site's, else its hook name's."""
    layer = sae.cfg.metadata.get("hook_layer")
    if layer is None and site is not None:
        layer = site.layer
    if layer is None and sae.cfg.metadata.get("hook_name"):
        try:
            layer = Site.parse(str(sae.cfg.metadata["hook_name"])).layer
        except ValueError:  # not an attention hook: Neuronpedia's layer field stays "None"
            pass
    return layer


def export_neuronpedia(
    model,
    sae: SAE,
    rows: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    model_id: str,
    sae_id: str,
    features: Sequence[int] | None = None,
    features_per_batch: int = 128,
    dead_log_sparsity: float = -10.0,
    **kwargs,
) -> list[Path]:
    """Write ``batch-N.json`` files (``{"model_id", "layer", "sae_id", "features": [...]}``) and
    ``skipped_indexes.json`` (features that never fired on ``rows``) in the layout of Neuronpedia's
    uploader (as SAELens' neuronpedia runner wrote it). ``kwargs`` go to :func:`neuronpedia_features`."""
    if features_per_batch <= 0:
        raise InputError(f"features_per_batch must be positive, got {features_per_batch}")
    out = ensure_dir(out_dir)
    ids = list(range(sae.cfg.d_sae)) if features is None else [int(f) for f in features]
    layer = _layer(sae, kwargs.get("site"))
    written, skipped = [], []
    for b, start in enumerate(range(0, len(ids), features_per_batch), start=1):
        records = neuronpedia_features(model, sae, rows, ids[start : start + features_per_batch], **kwargs)
        live = [r for r in records if r["frac_nonzero"] > 0]
        skipped += [r["featureIndex"] for r in records if r["frac_nonzero"] == 0]
        doc = {"model_id": model_id, "layer": str(layer), "sae_id": sae_id, "features": live,
               "n_prompts_to_select": int(rows.shape[0])}
        f = out / f"batch-{b}.json"
        write_json(f, doc, allow_nan=False)
        written.append(f)
    skipped_doc = {"model_id": model_id, "layer": str(layer), "sae_id": sae_id,
                   "log_sparsity": dead_log_sparsity, "skipped_indexes": skipped}
    write_json(out / "skipped_indexes.json", skipped_doc)
    return written
