"""Interoperability: SAEs from SAELens (and the files it reads), exports SAELens and Neuronpedia read.

Loading (:func:`load_sae`) accepts

* our own SAEs (SAELens v6 layout, ``architecture: "topk"``, training rule in ``metadata.selection``);
* SAELens v6 directories (``cfg.json`` + ``sae_weights.safetensors``) of architecture ``topk``,
  ``standard`` (ReLU) or ``jumprelu``, including hook_z attention SAEs (``reshape_activations: "hook_z"``:
  SAELens flattens ``[..., n_heads, d_head]`` head-major, exactly as :meth:`Site.flatten` does, so the
  weights are used as they are);
* SAELens configs from before v6 (``hook_point``, ``activation_fn_str``/``activation_fn_kwargs.k``,
  boolean ``normalize_activations``), converted the way SAELens' ``handle_pre_6_0_config`` does;
* the original files of Kissane et al.'s attention SAEs (``<name>.pt`` beside ``<name>_cfg.json`` with
  ``act_size``/``dict_size``/``act_name``), the source of SAELens' ``gpt2-small-hook-z-kk`` release.

TopK SAEs load as :class:`~sae_lens_attn.sae.SAE`; ReLU and JumpReLU SAEs as :class:`ReLUSAE`, a subclass
with the same interface (``encode`` returns the active latents of each row, padded, so ``decode``,
``encode_dense``, evals and analysis work unchanged). ``rescale_acts_by_decoder_norm`` and a non-trivial
``scaling_factor`` are folded into the weights (the function computed is unchanged).

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
from jaxtyping import Float

from . import __version__
from .files import ensure_dir, save_tensors, write_json
from .sae import (
    CFG_FILENAME,
    SAE,
    SPARSITY_FILENAME,
    WEIGHTS_FILENAME,
    EncodeOutput,
    SAEConfig,
    SAEFileError,
    read_cfg_json,
    version_tuple,  # noqa: F401  (re-exported)
)
from .sites import Site
from .weights_only import weights_only_refusal

#: The SAELens file-format version our exports claim (the v6 layout). SAELens reads a config without
#: ``sae_lens_version`` >= 6 through its pre-6 converter, which keeps only pre-6 top-level metadata keys.
SAELENS_FORMAT_VERSION = "6.0.0"

#: SAELens v6 ``SAEConfig`` fields (sae_lens/saes/sae.py), plus each architecture's own.
SAELENS_BASE_FIELDS = (
    "architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
    "reshape_activations", "metadata",
)
SAELENS_ARCH_FIELDS = {
    "standard": (),
    "topk": ("k", "rescale_acts_by_decoder_norm"),
    "jumprelu": (),
}
SAELENS_NORMALIZE = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm",
                     "covariance_whitening")
#: Metadata keys SAELens' pre-6 converter lifts from the top level (its LLM_METADATA_KEYS).
_PRE6_METADATA_KEYS = (
    "model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
    "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
    "sae_lens_version", "sae_lens_training_version", "hook_layer",
)


# --------------------------------------------------------------------------------------------- versions


def check_version(path: str | os.PathLike, cfg: Mapping[str, Any] | None = None) -> None:
    """Refuse an SAE written by a newer sae_lens_attn (``metadata.sae_lens_attn_version`` > ours).

    ``path``: the SAE directory (or its cfg.json). The error names the file and both versions.
    """
    path = Path(path)
    f = path if path.suffix == ".json" else path / CFG_FILENAME
    d = dict(cfg) if cfg is not None else read_cfg_json(f)
    meta = d.get("metadata") if isinstance(d.get("metadata"), dict) else {}
    theirs = meta.get("sae_lens_attn_version", d.get("sae_lens_attn_version"))
    if theirs is None:
        return
    if version_tuple(str(theirs)) > version_tuple(__version__):
        raise SAEFileError(
            f"{f}: written by sae_lens_attn {theirs}, newer than this sae_lens_attn {__version__}; its format "
            "may have changed, so it is not read. Upgrade sae_lens_attn (pip install -U sae-lens-attn)"
        )


# --------------------------------------------------------------------------------- SAELens cfg handling


def normalise_saelens_cfg(d: Mapping[str, Any], source: str = CFG_FILENAME) -> dict[str, Any]:
    """A SAELens (or sae_lens_attn) cfg.json in its v6 shape: pre-6 keys renamed, metadata collected,
    TopK given as ``architecture: "topk"`` with ``k``. Raises :class:`SAEFileError` naming ``source``."""
    d = dict(d)
    if d.get("metadata") is not None and not isinstance(d.get("metadata"), dict):
        raise SAEFileError(f"{source}: metadata must be a JSON object, got {d['metadata']!r}")
    meta = dict(d.get("metadata") or {})
    version = d.get("sae_lens_version") or meta.get("sae_lens_version")
    pre6 = "metadata" not in d and (version is None or version_tuple(str(version)) < (6,))
    if pre6:  # SAELens' handle_pre_6_0_config
        renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                   "hook_point_layer": "hook_layer", "activation_fn_str": "activation_fn"}
        d = {renames.get(k, k): v for k, v in d.items()}
        d.setdefault("architecture", "standard")
        fn_k = (d.get("activation_fn_kwargs") or {}).get("k")
        if d.get("activation_fn") == "topk" and fn_k is not None:
            d["architecture"], d["k"] = "topk", fn_k
        d.setdefault("reshape_activations", "hook_z" if "hook_z" in str(d.get("hook_name", "")) else "none")
        for key in _PRE6_METADATA_KEYS:
            if key in d and key not in meta:
                meta[key] = d[key]
    norm = d.get("normalize_activations", "none")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    d["normalize_activations"] = "none" if norm is None else norm
    missing = [k for k in ("d_in", "d_sae") if k not in d]
    if missing:
        raise SAEFileError(f"{source}: missing field(s) {missing}")
    arch = d.get("architecture")
    if not isinstance(arch, str) or arch not in SAELENS_ARCH_FIELDS:
        raise SAEFileError(
            f"{source}: architecture {arch!r} is not supported (supported: {sorted(SAELENS_ARCH_FIELDS)})"
        )
    if arch == "topk" and "k" not in d:
        raise SAEFileError(f"{source}: a topk SAE needs the field 'k'")
    for key in ("d_in", "d_sae") + (("k",) if arch == "topk" else ()):
        if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] <= 0:
            raise SAEFileError(f"{source}: {key} must be a positive integer, got {d[key]!r}")
    d["metadata"] = meta
    return d


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


# ----------------------------------------------------------------------------------------- ReLU SAEs


class ReLUSAE(SAE):
    """A ReLU ("standard") or JumpReLU SAE from SAELens, with the interface of :class:`SAE`.

    ``acts = ReLU(pre) * (pre > threshold)`` with ``threshold = 0`` for a standard SAE (SAELens'
    ``StandardSAE`` / ``JumpReLUSAE``). ``cfg.k`` is ``d_sae`` (any number of latents may fire);
    :meth:`encode` returns each row's active latents, padded with zero values to the batch's largest count.
    """

    def __init__(self, cfg: SAEConfig, architecture: str = "standard"):
        super().__init__(cfg, init=False)
        self.architecture = architecture
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=getattr(torch, cfg.dtype), device=cfg.device))

    def encode(self, x: Float[torch.Tensor, "batch d_in"], grad: torch.Tensor | None = None) -> EncodeOutput:
        pre = self.encode_pre(x)
        acts = pre.relu() * (pre > self.threshold).to(pre.dtype)
        width = max(1, int((acts > 0).sum(-1).max())) if acts.numel() else 1
        values, indices = acts.topk(min(width, self.cfg.d_sae), dim=-1, sorted=False)
        return EncodeOutput(values, indices, pre, self.architecture)

    def encode_dense(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        pre = self.encode_pre(x)
        return pre.relu() * (pre > self.threshold).to(pre.dtype)

    def save(self, path: str | os.PathLike, log_sparsity: torch.Tensor | None = None) -> Path:
        """Write SAELens' v6 layout with this SAE's own architecture (``standard`` or ``jumprelu``)."""
        path = ensure_dir(path)
        tensors = {n: p.detach().contiguous().cpu() for n, p in self.named_parameters()}
        if self.architecture == "jumprelu":
            tensors["threshold"] = self.threshold.detach().contiguous().cpu()
        save_tensors(path / WEIGHTS_FILENAME, tensors)
        if log_sparsity is not None:
            save_tensors(path / SPARSITY_FILENAME, {"sparsity": log_sparsity.detach().float().contiguous().cpu()})
        write_json(path / CFG_FILENAME, saelens_export_dict(self), indent=2)
        return path


# ------------------------------------------------------------------------------------------- loading


def _read_tensors(f: Path) -> dict[str, torch.Tensor]:
    if not f.exists():
        raise SAEFileError(f"{f} is missing")
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(f))
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors / zipfile / pickle errors for damaged files
        refusal = weights_only_refusal(f, err)
        if refusal is not None:  # a valid pickle of more than tensors: refused on purpose, not damaged
            raise SAEFileError(refusal) from err
        raise SAEFileError(f"{f}: unreadable weights file ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                           "it is truncated or corrupted") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise SAEFileError(f"{f}: expected a dict of tensors, got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _kissane_cfg(pt: Path) -> dict[str, Any]:
    """Kissane et al.'s ``<name>_cfg.json`` as a SAELens v6 config (as SAELens' connor_rob_hook_z loader)."""
    f = pt.with_name(pt.name[: -len(".pt")] + "_cfg.json")
    old = read_cfg_json(f)
    missing = [k for k in ("act_size", "dict_size", "act_name") if k not in old]
    if missing:
        raise SAEFileError(f"{f}: missing field(s) {missing} of a Kissane et al. attention-SAE config")
    hook = str(old["act_name"])
    return {
        "architecture": "standard", "d_in": int(old["act_size"]), "d_sae": int(old["dict_size"]),
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none",
        "metadata": {"model_name": old.get("model_name", "gpt2-small"), "hook_name": hook,
                     "hook_layer": old.get("layer"), "hook_head_index": None, "prepend_bos": True,
                     "context_size": old.get("seq_len", 128), "sae_lens_version": SAELENS_FORMAT_VERSION},
    }


def load_sae(path: str | os.PathLike, device: str | torch.device | None = None) -> SAE:
    """Load an SAE written by sae_lens_attn or SAELens (any version), or a Kissane et al. ``.pt`` file.

    Returns :class:`~sae_lens_attn.sae.SAE` (TopK) or :class:`ReLUSAE` (standard / JumpReLU). Every problem
    raises :class:`SAEFileError` naming the file: missing or damaged files, unsupported fields, shapes
    that disagree with cfg.json, non-finite weights, or a config from a newer sae_lens_attn.
    """
    path = Path(path)
    if path.suffix == ".pt" and path.is_file():
        raw, weights_file, source = _kissane_cfg(path), path, str(path.with_name(path.stem + "_cfg.json"))
    else:
        cfg_file = path / CFG_FILENAME
        raw, source = read_cfg_json(cfg_file), str(cfg_file)
        check_version(path, raw)
        weights_file = path / WEIGHTS_FILENAME
    d = normalise_saelens_cfg(raw, source)
    arch = d["architecture"]
    if d["normalize_activations"] not in ("none", "expected_average_only_in"):
        # expected_average_only_in is folded into the weights by SAELens when it saves (its inference SAE
        # applies nothing at run time), so such files read like "none"; the others transform at run time.
        raise SAEFileError(
            f"{source}: normalize_activations={d['normalize_activations']!r} is not supported (its run-time "
            "normalisation is not part of this SAE); fold it into the weights first"
        )
    meta = dict(d["metadata"])
    try:
        cfg = SAEConfig.from_saelens_dict(
            {**d, "architecture": "topk", "k": int(d.get("k", d["d_sae"])), "rescale_acts_by_decoder_norm": False,
             "normalize_activations": "none", "metadata": meta},
            source,
        )
    except SAEFileError:
        raise
    except (TypeError, ValueError) as err:
        raise SAEFileError(f"{source}: {err}") from err
    if device is not None:
        cfg.device = str(device)
    tensors = _read_tensors(weights_file)
    sae: SAE = SAE(cfg, init=False) if arch == "topk" else ReLUSAE(cfg, arch)
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_in), "b_enc": (cfg.d_sae,),
                "b_dec": (cfg.d_in,)}
    if arch == "jumprelu":
        if "log_threshold" in tensors and "threshold" not in tensors:  # older SAELens JumpReLU files
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        expected["threshold"] = (cfg.d_sae,)
    for name, shape in expected.items():
        if name not in tensors:
            raise SAEFileError(f"{weights_file}: tensor {name!r} is missing (has {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise SAEFileError(
                f"{weights_file}: {name} has shape {tuple(tensors[name].shape)} but {Path(source).name} "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {shape}"
            )
        if not torch.isfinite(tensors[name]).all():
            raise SAEFileError(f"{weights_file}: {name} holds NaN/inf values; the file is corrupted")
    W_enc, W_dec = tensors["W_enc"].double(), tensors["W_dec"].double()
    b_enc = tensors["b_enc"].double()
    scale = tensors.get("scaling_factor", tensors.get("finetuning_scaling_factor"))
    if scale is not None and not torch.allclose(scale.double(), torch.ones_like(scale.double())):
        W_dec = W_dec * scale.double()[:, None]  # SAELens (pre-6) decoded acts * scaling_factor
    if arch == "topk" and d.get("rescale_acts_by_decoder_norm"):
        # SAELens: pre *= ||W_dec_i|| before TopK, acts /= ||W_dec_i|| before decoding. Folding the norms
        # into W_enc/b_enc and out of W_dec computes the same function with unit decoder rows.
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(tensors["b_dec"])
        if isinstance(sae, ReLUSAE) and "threshold" in expected:
            sae.threshold.copy_(tensors["threshold"])
    return sae


# ------------------------------------------------------------------------------------------ exporting


def saelens_export_dict(sae: SAE) -> dict[str, Any]:
    """cfg.json for SAELens v6: our fields, ``metadata.sae_lens_version`` set, architecture kept."""
    d = sae.cfg.to_saelens_dict()
    d["metadata"] = {**d.get("metadata", {}), "sae_lens_version": SAELENS_FORMAT_VERSION}
    if isinstance(sae, ReLUSAE):
        d["architecture"] = sae.architecture
        d.pop("k", None)
        d.pop("rescale_acts_by_decoder_norm", None)
        for key in ("selection", "gsae_beta"):
            d["metadata"].pop(key, None)
    return d


def export_saelens(sae: SAE, path: str | os.PathLike, log_sparsity: torch.Tensor | None = None) -> Path:
    """Write ``sae`` so that ``sae_lens.SAE.load_from_disk(path)`` loads it with its metadata.

    A g-SAE is written as ``topk`` (without a gradient it is one); its rule stays in ``metadata.selection``.
    Raises ValueError when the config would not pass :func:`saelens_cfg_problems` (e.g. no hook_name).
    """
    problems = saelens_cfg_problems(saelens_export_dict(sae))
    if problems:
        raise ValueError(f"cannot export to SAELens: {'; '.join(problems)}")
    path = sae.save(path, log_sparsity)
    if not isinstance(sae, ReLUSAE):  # SAE.save writes its own cfg.json; add what SAELens needs
        write_json(path / CFG_FILENAME, saelens_export_dict(sae), indent=2)
    return path


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
