"""``sae-lens-attn analyze``: the report on one attention SAE, step by step, registered as an analysis.

The head-by-head survey (weight-based head attribution with each feature's top tokens), the heads'
induction and previous-token scores, the prefix-length study of the SAE's layer, and the SAE's induction
features with the heads and source tokens they come from. Each step prints its part and adds its keys to
the ``--out`` JSON.
"""

from __future__ import annotations

from collections.abc import Iterator

from sae_lens_attn.evals import metrics_lines, saved_metrics

from .features import FeatureStats, StatsConfig, feature_stats
from .heads import format_head_report, head_report
from .induction import (
    classify_prefix_heads,
    head_induction_scores,
    induction_feature_report,
    prefix_length_study,
    repeated_tokens,
)
from .induction_heads import explain_writers, format_writers, induction_writers
from .registry import Analysis, Context, Option, Part, register
from .survey import format_head_roles, head_roles


def summary(ctx: Context, stats: FeatureStats) -> Part:
    """Tokens seen, never-firing features, and the evaluation saved with the SAE at training."""
    data: dict = {"site": ctx.site.label, "sae": str(ctx.args.sae), "tokens": stats.n_tokens,
                  "dead_fraction": float((stats.fire_count == 0).float().mean())}
    lines = [f"{ctx.site.label} of {data['sae']}: {stats.n_tokens:,} tokens, {data['dead_fraction']:.1%} of "
             f"{ctx.sae.cfg.d_sae} features never fired"]
    saved = saved_metrics(ctx.sae)
    if saved is not None:
        lines += metrics_lines(saved)
        data["evaluation_at_training"] = saved
    return Part("\n".join(lines), data)


def heads(ctx: Context, stats: FeatureStats) -> Part:
    """Each head's top features by decoder-norm share, and the head survey (hook_z SAEs)."""
    top = ctx.args.top
    report = head_report(ctx.sae, int(ctx.model.cfg.n_heads), ctx.site, top=top, density=stats.density,
                         describe=stats.describe)
    roles = head_roles(ctx.model, ctx.sae, stats, ctx.site, describe=stats.describe)
    text = ("\nEach head's top features by decoder-norm share (Kissane et al. 2024, section 4.1)\n"
            + format_head_report(report, per_head=top)
            + "\n\nHead survey: which features belong to each head and their roles (criterion: analysis/survey.py)\n"
            + format_head_roles(roles))
    data = [{"layer": h.layer, "head": h.head, "n_dominant": h.n_dominant, "mean_share": h.mean_share,
             "features": [vars(f) for f in h.features], "verdict": r.verdict, "roles": r.roles}
            for h, r in zip(report, roles)]
    return Part(text, {"heads": data})


def head_scores(ctx: Context, toks) -> Part:
    """Every head's induction and previous-token score on repeated random tokens."""
    hs = head_induction_scores(ctx.model, tokens=toks)
    lines = ["\nHead induction / previous-token scores on [BOS, r, r]"]
    for layer in range(hs.induction.shape[0]):
        ind = " ".join(f"{v:.2f}" for v in hs.induction[layer].tolist())
        prev = " ".join(f"{v:.2f}" for v in hs.previous_token[layer].tolist())
        lines.append(f"  L{layer} induction: {ind}\n  L{layer} prev-tok:  {prev}")
    return Part("\n".join(lines), {"head_induction": hs.induction.tolist(),
                                   "head_previous_token": hs.previous_token.tolist()})


def prefix_study(ctx: Context) -> Part:
    """Which heads are short- or long-prefix induction heads (Kissane et al. 2024, 4.3)."""
    study = prefix_length_study(ctx.model, n_seq=ctx.args.n_seq, seed=ctx.args.seed)
    kinds = [k for k in classify_prefix_heads(study) if k.kind != "none"]
    lines = ["\nPrefix-length study (attention to the token after the earlier occurrence; Kissane et al. 2024, 4.3)"]
    lines += [f"  L{k.layer}H{k.head}: {k.kind} (one-token match {k.short:.2f}, longest {k.long:.2f})" for k in kinds]
    if not kinds:
        lines.append("  no induction heads found")
    return Part("\n".join(lines), {"prefix_study": {"prefix_lengths": study.prefix_lengths,
                                                    "head_scores": study.head_scores.tolist(),
                                                    "kinds": [k._asdict() for k in kinds]}})


def induction_features(ctx: Context, found) -> Part:
    """The SAE's induction features, with the head and source their DFA comes from."""
    lines = [f"\nInduction features ({len(found)} shown): >= 90% of activation mass on the second copy"]
    lines += [f"  #{f.feature:<6d} mass {f.mass_second:.2f}  DFA {f.head_fraction:.0%} from L{ctx.site.layer}H{f.head}, "
              f"{f.source_fraction:.0%} of it from the token after the earlier occurrence" for f in found]
    return Part("\n".join(lines), {"induction_features": [f._asdict() for f in found]})


def writers(ctx: Context, found, toks) -> Part:
    """Which heads write the induction features, and why that can differ from the top head share."""
    ws = induction_writers(ctx.model, ctx.sae, [f.feature for f in found], toks, ctx.site)
    text = ("\nWhich heads write the induction features (DFA = attention to the induction source x value read-out)\n"
            + format_writers(ws, ctx.site.layer) + "\n  " + explain_writers(ws, ctx.site.layer))
    return Part(text, {"induction_writers": [w._asdict() for w in ws]})


def analyze(ctx: Context) -> Iterator[Part]:
    args = ctx.args
    stats = feature_stats(ctx.model, ctx.sae, ctx.rows, site=ctx.site,
                          cfg=StatsConfig(batch_rows=args.batch_rows, seed=args.seed, n_samples=8))
    yield summary(ctx, stats)
    if ctx.site.kind == "z":
        yield heads(ctx, stats)
    toks = repeated_tokens(ctx.model, args.n_seq, args.induction_length, args.seed)
    yield head_scores(ctx, toks)
    yield prefix_study(ctx)
    found = induction_feature_report(ctx.model, ctx.sae, tokens=toks, site=ctx.site, top=args.top * 2)
    yield induction_features(ctx, found)
    if found:
        yield writers(ctx, found, toks)


register(Analysis(
    "analyze", analyze,
    help="head survey, induction heads and features, prefix-length study of an attention SAE",
    description="Which heads write each feature (decoder-norm shares), which features each head computes, which "
    "features are induction features and where their DFA comes from (Kissane et al. 2024).",
    options=(Option("--top", int, 5, "features listed per head", minimum=1),
             Option("--induction-length", int, 32, "length of the random sequence repeated in [BOS, r, r]", minimum=2),
             Option("--n-seq", int, 16, "repeated random sequences", minimum=1)),
    explorer=True,
))
