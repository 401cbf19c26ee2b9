"""Interoperability: exports SAELens and Neuronpedia read, and a check of SAELens' cfg.json conventions.

Loading lives in :mod:`sae_lens_attn.saes` (``SAE.load``: every SAELens v6 architecture, older SAELens
configs and Kissane et al.'s files); :func:`load_sae` here is the same function, kept for old callers, and
``ReLUSAE`` an alias of :class:`~sae_lens_attn.saes.StandardSAE` (JumpReLU and BatchTopK SAEs subclass it).

Exporting (:func:`export_saelens`) writes the v6 layout with ``metadata.sae_lens_version`` set, without
which SAELens treats a config as pre-v6 and drops the metadata (hook name, model name, ...).
:func:`saelens_cfg_problems` checks a cfg.json against SAELens v6's field list and conventions.
:func:`export_neuronpedia` writes feature data in the batch JSON layout of Neuronpedia's uploader.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .files import ensure_dir, write_json
from .sae import SAE, StandardSAE
from .saes.config import SAELENS_FORMAT_VERSION, version_tuple  # noqa: F401  (re-exported)
from .saes.files import (  # noqa: F401  (re-exported)
    SAELENS_ARCH_FIELDS,
    SAELENS_BASE_FIELDS,
    SAELENS_NORMALIZE,
    check_version,
)
from .saes.loading import load_sae, normalise_saelens_cfg  # noqa: F401  (re-exported)
from .sites import Site

#: Deprecated alias: the ReLU SAE class (JumpReLUSAE and BatchTopKSAE are subclasses of it).
ReLUSAE = StandardSAE


# --------------------------------------------------------------------------------- SAELens cfg handling


def saelens_cfg_problems(d: Mapping[str, Any]) -> list[str]:
    """What in ``d`` (a cfg.json) SAELens v6 would reject, misread or silently drop; empty when fine.

    Checked: every v6 field present with SAELens' type and value conventions (dtype spelled like
    ``"float32"``, ``normalize_activations`` and ``reshape_activations`` among SAELens' choices,
    ``reshape_activations: "hook_z"`` only for a hook_z site), no unknown top-level field (SAELens drops
    them), and ``metadata.sae_lens_version`` >= 6 (else SAELens drops the metadata).
    """
    problems = []
    arch = d.get("architecture")
    if arch not in SAELENS_ARCH_FIELDS:
        return [f"architecture {arch!r} is not one of {sorted(SAELENS_ARCH_FIELDS)}"]
    wanted = SAELENS_BASE_FIELDS + SAELENS_ARCH_FIELDS[arch]
    problems += [f"missing field {k!r}" for k in wanted if k not in d]
    problems += [f"unknown top-level field {k!r} (SAELens drops it)" for k in d if k not in wanted]
    for k in ("d_in", "d_sae") + (("k",) if arch == "topk" else ()):
        v = d.get(k)
        if k in d and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            problems.append(f"{k} must be a positive integer, got {v!r}")
    if arch == "topk" and isinstance(d.get("k"), int) and isinstance(d.get("d_sae"), int) and d["k"] > d["d_sae"]:
        problems.append(f"k={d['k']} exceeds d_sae={d['d_sae']}")
    dtype = d.get("dtype")
    if "dtype" in d and not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
        problems.append(f"dtype must name a torch dtype like 'float32' (no 'torch.' prefix), got {dtype!r}")
    for k in ("apply_b_dec_to_input",) + (("rescale_acts_by_decoder_norm",) if arch == "topk" else ()):
        if k in d and not isinstance(d[k], bool):
            problems.append(f"{k} must be a boolean, got {d[k]!r}")
    if "device" in d and not isinstance(d["device"], str):
        problems.append(f"device must be a string, got {d['device']!r}")
    if "normalize_activations" in d and d["normalize_activations"] not in SAELENS_NORMALIZE:
        problems.append(f"normalize_activations must be one of {SAELENS_NORMALIZE}, got {d['normalize_activations']!r}")
    meta = d.get("metadata")
    if not isinstance(meta, dict):
        problems.append(f"metadata must be an object, got {type(meta).__name__}")
        meta = {}
    if d.get("reshape_activations") not in ("none", "hook_z"):
        problems.append(f"reshape_activations must be 'none' or 'hook_z', got {d.get('reshape_activations')!r}")
    elif d["reshape_activations"] == "hook_z" and meta.get("hook_name") and not str(meta["hook_name"]).endswith("_z"):
        problems.append(f"reshape_activations 'hook_z' needs a hook_z hook_name, got {meta['hook_name']!r}")
    version = meta.get("sae_lens_version")
    if version is None or version_tuple(str(version)) < (6,):
        problems.append(f"metadata.sae_lens_version must be >= 6 (got {version!r}): SAELens would read the file "
                        "as pre-v6 and drop the metadata")
    if "hook_name" not in meta:
        problems.append("metadata.hook_name is missing: SAELens and Neuronpedia need it to attach the SAE")
    return problems


# ------------------------------------------------------------------------------------------ exporting


def saelens_export_dict(sae: SAE) -> dict[str, Any]:
    """cfg.json for SAELens v6 (what ``sae.save`` writes): our fields, ``metadata.sae_lens_version`` set, the
    architecture under SAELens' name."""
    return sae.cfg.to_saelens_dict()


def export_saelens(sae: SAE, path: str | os.PathLike, log_sparsity: torch.Tensor | None = None) -> Path:
    """Write ``sae`` so that ``sae_lens.SAE.load_from_disk(path)`` loads it with its metadata.

    A g-SAE is written as ``topk`` (without a gradient it is one); its rule stays in ``metadata.selection``.
    Raises ValueError when the config would not pass :func:`saelens_cfg_problems` (e.g. no hook_name).
    """
    problems = saelens_cfg_problems(saelens_export_dict(sae))
    if problems:
        raise ValueError(f"cannot export to SAELens: {'; '.join(problems)}")
    return sae.save(path, log_sparsity)


# ---------------------------------------------------------------------------------------- Neuronpedia


def _round(values, digits: int = 3) -> list[float]:
    return [round(float(v), digits) for v in values]


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
    # analysis builds on the core; imported here so `import sae_lens_attn` does not pull it in.
    from sae_lens_attn.analysis._common import decode_token
    from sae_lens_attn.analysis.features import StatsConfig, feature_stats, logit_weights

    ids = list(range(sae.cfg.d_sae)) if features is None else [int(f) for f in features]
    stats = feature_stats(
        model, sae, rows, ids, site=site,
        cfg=StatsConfig(n_top=n_top, n_samples=max(n_quantile_bins * per_bin * 4, 16), ctx_left=ctx_left,
                        ctx_right=ctx_right),
    )
    weights = logit_weights(model, sae, ids, site).float().cpu()
    tok = model.tokenizer

    def example(ex, bin_min: float, bin_max: float, contains: float) -> dict[str, Any]:
        keep = [i for i, t in enumerate(ex.tokens) if t >= 0]
        values = _round(ex.acts[i] for i in keep)
        return {"binMin": bin_min, "binMax": bin_max, "binContains": contains,
                "tokens": [decode_token(tok, ex.tokens[i]) for i in keep], "values": values,
                "maxValue": max(values) if values else 0.0, "lossValues": []}

    out = []
    for j, f in enumerate(ids):
        w = weights[j]
        top, bottom = w.topk(n_logits), w.topk(n_logits, largest=False)
        centres, counts = stats.histogram(f)
        lh_counts, lh_edges = torch.histogram(w, bins=40)
        fires = int(stats.fire_count[j])
        acts = [example(ex, -1, round(ex.activation, 3), -1) for ex in stats.top_examples(f)]
        for label, group in stats.quantile_examples(f, n_bins=n_quantile_bins, per_bin=per_bin):
            lo, hi = (float(x) for x in label.split(" - "))
            acts += [example(ex, round(lo, 3), round(hi, 3), round(1.0 / n_quantile_bins, 3)) for ex in group]
        out.append({
            "featureIndex": f,
            "pos_str": [decode_token(tok, t) for t in top.indices.tolist()],
            "pos_values": _round(top.values),
            "neg_str": [decode_token(tok, t) for t in bottom.indices.tolist()],
            "neg_values": _round(bottom.values),
            "frac_nonzero": fires / max(1, stats.n_tokens),
            "freq_hist_data_bar_values": _round(centres[counts > 0]),
            "freq_hist_data_bar_heights": [int(c) for c in counts[counts > 0]],
            "logits_hist_data_bar_values": _round((lh_edges[:-1] + lh_edges[1:]) / 2),
            "logits_hist_data_bar_heights": [int(c) for c in lh_counts],
            "num_tokens_for_dashboard": stats.n_tokens,
            "activations": acts,
        })
    return out


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
        raise ValueError(f"features_per_batch must be positive, got {features_per_batch}")
    out = ensure_dir(out_dir)
    ids = list(range(sae.cfg.d_sae)) if features is None else [int(f) for f in features]
    layer = sae.cfg.metadata.get("hook_layer")
    if layer is None and kwargs.get("site") is not None:
        layer = kwargs["site"].layer
    if layer is None and sae.cfg.metadata.get("hook_name"):
        try:
            layer = Site.parse(str(sae.cfg.metadata["hook_name"])).layer
        except ValueError:  # not an attention hook: Neuronpedia's layer field stays "None"
            pass
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
