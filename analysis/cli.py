"""``sae-lens-attn analyze`` and ``sae-lens-attn dashboard``: the analysis from the command line.

``analyze`` prints the head-by-head survey (weight-based head attribution with each feature's top tokens),
the heads' induction and previous-token scores, the prefix-length study of the SAE's layer, and the SAE's
induction features with the heads and source tokens they come from; ``--out`` also writes it all as JSON.
``dashboard`` writes one HTML page per feature and an index page. ``explore`` (registered here, built in
:mod:`sae_lens_attn.explorer.cli`) serves the local web app.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from sae_lens_attn.files import write_json

ERRORS = (ValueError, FileNotFoundError, OSError, FloatingPointError, KeyError)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE directory (ours or SAELens' v6 layout: cfg.json + sae_weights.safetensors)")
    p.add_argument("--model", default=None, help="hub id or local model directory (default: the SAE's metadata.model_name)")
    p.add_argument("--dataset", default=None, help="text/jsonl file or folder, saved HF dataset, or hub id (default: the sample text)")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl files and HF datasets")
    p.add_argument("--tokens", type=int, default=32_768, help="token budget for feature statistics")
    p.add_argument("--context-size", type=int, default=None, help="tokens per row (default: the SAE's metadata.context_size, else 128)")
    p.add_argument("--batch-rows", type=int, default=16, help="rows per model forward pass")
    p.add_argument("--device", default=None, help="'cpu', 'cuda', ... (default: CUDA when available)")
    p.add_argument("--seed", type=int, default=0, help="seeds random sequences and example sampling")
    p.add_argument("--allow-transfer", action="store_true",
                   help="apply the SAE to another model than its metadata's model_name (a deliberate transfer "
                   "experiment); without it, a model other than the SAE's is refused")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what empty means)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_subcommands(sub) -> None:
    """Add ``analyze``, ``dashboard`` and ``explore`` to the ``sae-lens-attn`` subparsers."""
    fmt = _Formatter
    a = sub.add_parser(
        "analyze", formatter_class=fmt,
        help="head survey, induction heads and features, prefix-length study of an attention SAE",
        description="Which heads write each feature (decoder-norm shares), which features each head computes, which "
        "features are induction features and where their DFA comes from (Kissane et al. 2024).",
    )
    _common(a)
    a.add_argument("--top", type=int, default=5, help="features listed per head")
    a.add_argument("--induction-length", type=int, default=32, help="length of the random sequence repeated in [BOS, r, r]")
    a.add_argument("--n-seq", type=int, default=16, help="repeated random sequences")
    a.add_argument("--out", default=None, help="also write the report as JSON to this file")
    d = sub.add_parser(
        "dashboard", formatter_class=fmt,
        help="one HTML page per feature and an index page (open index.html from disk)",
        description="Feature dashboards: top examples, activation histogram, head shares, DFA by source position, "
        "logit effects. Pages open from file:// without a server.",
    )
    _common(d)
    d.add_argument("--out", default=None, help="output folder (default: dashboards/<site label>)")
    d.add_argument("--features", default=None,
                   help="comma-separated feature ids (default: --n-features spread over density deciles, plus the "
                   "--n-induction most induction-like)")
    d.add_argument("--n-features", type=int, default=20,
                   help="features at evenly spaced density quantiles when --features is not given (2 per decile for 20)")
    d.add_argument("--n-induction", type=int, default=5,
                   help="most induction-like features added when --features is not given (largest second-copy mass "
                   "on repeated random tokens)")
    d.add_argument("--plotlyjs", choices=["inline", "file"], default="file",
                   help="file: one plotly.min.js beside the pages (pages of tens of kB); inline: every page self-contained (~5 MB)")
    from sae_lens_attn.explorer.cli import add_parser as add_explore

    add_explore(sub, fmt)


def _load(args):
    import torch

    from sae_lens_attn.data import check_text_source, token_rows
    from sae_lens_attn.interop import load_sae
    from sae_lens_attn.models import SAMPLE_TEXT, describe_tokens, load_model, model_device, token_policy

    from ._common import sae_site

    if args.tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {args.tokens}")
    check_text_source(args.dataset or SAMPLE_TEXT, getattr(args, "encoding", "utf-8"))  # before the model loads
    sae = load_sae(args.sae, device="cpu")
    site = sae_site(sae)
    features = _parse_features(getattr(args, "features", None), sae.cfg.d_sae)
    _refuse_another_model(sae, args.model, args.allow_transfer)
    model = load_model(args.model or sae.cfg.metadata.get("model_name"), device=args.device,
                       start_token=sae.cfg.metadata.get("start_token"))  # rows framed as in training
    print(describe_tokens(model))
    sae = sae.to(model_device(model))
    sae.check_site(site, model, allow_transfer=args.allow_transfer)
    n_ctx = min(args.context_size or int(sae.cfg.metadata.get("context_size") or 128), int(model.cfg.n_ctx))
    rows = token_rows(args.dataset or SAMPLE_TEXT, model.tokenizer, n_ctx, token_policy(model),
                      max_rows=max(1, math.ceil(args.tokens / n_ctx)), text_field=args.text_field)
    if rows.numel() < args.tokens:  # a short dataset is used whole, and said so
        print(f"sae-lens-attn: warning: the dataset {args.dataset or 'sample text'} holds only {rows.numel():,} "
              f"tokens ({rows.shape[0]} rows of {n_ctx}), fewer than --tokens {args.tokens:,}; the statistics use "
              "those. Give a larger --dataset for the full budget", file=sys.stderr)
    torch.manual_seed(args.seed)
    return model, sae, site, rows, features


def _refuse_another_model(sae, model: str | None, allow: bool) -> None:
    """``--model`` against the SAE's ``metadata.model_name`` before the model loads (a hub id would
    otherwise be downloaded first); the same rule ``check_site`` applies after loading."""
    from sae_lens_attn.models import resolve_model_name
    from sae_lens_attn.provenance import SiteMismatchError, same_model

    trained = sae.cfg.metadata.get("model_name")
    if allow or model is None or not trained:
        return
    try:  # same_model reads TransformerLens' alias table (gpt2-small = gpt2) when it is imported
        import transformer_lens.supported_models  # noqa: F401
    except ImportError:
        pass
    if same_model(str(trained), resolve_model_name(model)) is False:
        raise SiteMismatchError(
            f"this SAE was trained elsewhere: model {trained!r} (its metadata's model_name), not --model {model!r}. "
            "Leave --model out to load its own model, or pass --allow-transfer for a deliberate transfer experiment"
        )


def _parse_features(text: str | None, d_sae: int) -> list[int] | None:
    if not text:
        return None
    try:
        features = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--features must be comma-separated integers, got {text!r}") from None
    bad = [f for f in features if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"--features: feature ids must be in [0, {d_sae}), got {bad}")
    return features


def run_analyze(args) -> int:
    from sae_lens_attn.evals import metrics_lines, saved_metrics

    from .features import StatsConfig, feature_stats
    from .heads import format_head_report, head_report
    from .induction import (
        classify_prefix_heads,
        head_induction_scores,
        induction_feature_report,
        prefix_length_study,
        repeated_tokens,
    )
    from .induction_heads import explain_writers, format_writers, induction_writers
    from .survey import format_head_roles, head_roles

    model, sae, site, rows, _ = _load(args)
    n_heads = int(model.cfg.n_heads)
    stats = feature_stats(model, sae, rows, site=site, cfg=StatsConfig(batch_rows=args.batch_rows, seed=args.seed, n_samples=8))
    report: dict = {"site": site.label, "sae": str(args.sae), "tokens": stats.n_tokens,
                    "dead_fraction": float((stats.fire_count == 0).float().mean())}
    print(f"{site.label} of {report['sae']}: {stats.n_tokens:,} tokens, {report['dead_fraction']:.1%} of "
          f"{sae.cfg.d_sae} features never fired")
    saved = saved_metrics(sae)
    if saved is not None:
        print("\n".join(metrics_lines(saved)))
        report["evaluation_at_training"] = saved
    if site.kind == "z":
        heads = head_report(sae, n_heads, site, top=args.top, density=stats.density, describe=stats.describe)
        print("\nEach head's top features by decoder-norm share (Kissane et al. 2024, section 4.1)")
        print(format_head_report(heads, per_head=args.top))
        roles = head_roles(model, sae, stats, site, describe=stats.describe)
        print("\nHead survey: which features belong to each head and their roles (criterion: analysis/survey.py)")
        print(format_head_roles(roles))
        report["heads"] = [
            {"layer": h.layer, "head": h.head, "n_dominant": h.n_dominant, "mean_share": h.mean_share,
             "features": [vars(f) for f in h.features], "verdict": r.verdict, "roles": r.roles}
            for h, r in zip(heads, roles)
        ]
    toks = repeated_tokens(model, args.n_seq, args.induction_length, args.seed)
    hs = head_induction_scores(model, tokens=toks)
    print("\nHead induction / previous-token scores on [BOS, r, r]")
    for layer in range(hs.induction.shape[0]):
        ind = " ".join(f"{v:.2f}" for v in hs.induction[layer].tolist())
        prev = " ".join(f"{v:.2f}" for v in hs.previous_token[layer].tolist())
        print(f"  L{layer} induction: {ind}\n  L{layer} prev-tok:  {prev}")
    report["head_induction"] = hs.induction.tolist()
    report["head_previous_token"] = hs.previous_token.tolist()
    study = prefix_length_study(model, n_seq=args.n_seq, seed=args.seed)
    kinds = [k for k in classify_prefix_heads(study) if k.kind != "none"]
    print("\nPrefix-length study (attention to the token after the earlier occurrence; Kissane et al. 2024, 4.3)")
    for k in kinds:
        print(f"  L{k.layer}H{k.head}: {k.kind} (one-token match {k.short:.2f}, longest {k.long:.2f})")
    if not kinds:
        print("  no induction heads found")
    report["prefix_study"] = {"prefix_lengths": study.prefix_lengths, "head_scores": study.head_scores.tolist(),
                              "kinds": [k._asdict() for k in kinds]}
    found = induction_feature_report(model, sae, tokens=toks, site=site, top=args.top * 2)
    print(f"\nInduction features ({len(found)} shown): >= 90% of activation mass on the second copy")
    report["induction_features"] = [f._asdict() for f in found]
    for f in found:
        print(f"  #{f.feature:<6d} mass {f.mass_second:.2f}  DFA {f.head_fraction:.0%} from L{site.layer}H{f.head}, "
              f"{f.source_fraction:.0%} of it from the token after the earlier occurrence")
    if found:
        writers = induction_writers(model, sae, [f.feature for f in found], toks, site)
        print("\nWhich heads write the induction features (DFA = attention to the induction source x value read-out)")
        print(format_writers(writers, site.layer))
        print("  " + explain_writers(writers, site.layer))
        report["induction_writers"] = [w._asdict() for w in writers]
    if args.out:
        write_json(args.out, report, indent=1)
        print(f"\nreport written to {Path(args.out).resolve()}")
    return 0


def run_dashboard(args) -> int:
    from .dashboard import DashboardConfig, write_dashboards
    from .dashboard_select import default_features, induction_scores_or_none
    from .features import StatsConfig, feature_stats

    model, sae, site, rows, features = _load(args)
    for name in ("n_features", "n_induction"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    stats = feature_stats(model, sae, rows, features=features, site=site,
                          cfg=StatsConfig(batch_rows=args.batch_rows, seed=args.seed))
    scores = induction_scores_or_none(model, sae, site, stats, seed=args.seed)  # None: refused for this model
    if features is None:
        features = default_features(stats, args.n_features, scores, args.n_induction)
    extra = None
    if scores is not None:
        mass = dict(zip(scores.features.tolist(), scores.mass_second.tolist()))
        extra = {"induction mass": {f: mass[f] for f in features}}
    out = args.out or str(Path("dashboards") / site.label)
    files = write_dashboards(model, sae, stats, out, features, site, DashboardConfig(plotlyjs=args.plotlyjs), extra)
    print(f"wrote {len(files.pages)} feature pages; open {files.index.resolve()}")
    return 0


def run(args) -> int:
    """Dispatch ``analyze`` / ``dashboard``; errors a user can fix print one line and return 2."""
    from sae_lens_attn.provenance import transfer_allowed

    try:
        with transfer_allowed(args.allow_transfer):
            return run_analyze(args) if args.command == "analyze" else run_dashboard(args)
    except ERRORS as err:
        print(f"sae-lens-attn: error: {err}", file=sys.stderr)
        return 2
