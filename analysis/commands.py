"""The analysis part of the command line: every registered analysis (:mod:`.registry`; ``analyze`` is
:mod:`.report`) as a subcommand with the common flags and ``--out`` JSON, and ``dashboard``, which writes one
HTML page per feature and an index page. :mod:`sae_lens_attn.frontends.cli`
dispatches here.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from sae_lens_attn.errors import InputError
from sae_lens_attn.files import write_json

from . import report as _report  # noqa: F401  (registers ``analyze``)
from .registry import ANALYSES, Analysis, BelowMinimum, Context


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what empty means)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _checked(opt):
    """The option's parser for argparse: a bad value exits with the option's own message."""
    def parse(text: str):
        try:
            return opt.parse(text)
        except BelowMinimum as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {opt.type.__name__}, got {text!r}") from None

    parse.__name__ = opt.type.__name__
    return parse


def _add_analysis(sub, analysis: Analysis) -> argparse.ArgumentParser:
    p = sub.add_parser(analysis.name, formatter_class=HelpFormatter, help=analysis.help,
                       description=analysis.description or analysis.help)
    _common(p)
    for opt in analysis.options:
        p.add_argument(opt.flag, type=_checked(opt), default=opt.default, help=opt.help)
    p.add_argument("--out", default=None, help="also write the report as JSON to this file")
    return p


def default_args(analysis: Analysis, sae: str, options: dict | None = None) -> argparse.Namespace:
    """The flags ``analysis`` would get on the command line with ``--sae sae`` and ``options`` (by flag name
    without dashes, ``{"n": 2}``), every other flag at its default: what a front end other than the command
    line (the explorer) passes as :attr:`Context.args`."""
    p = _add_analysis(argparse.ArgumentParser(prog="sae-lens-attn").add_subparsers(), analysis)
    args = p.parse_args(["--sae", sae])
    own = {opt.dest: opt for opt in analysis.options}
    for name, value in (options or {}).items():
        if name not in own:
            raise InputError(f"{analysis.name} has no option {name!r}; its options: {', '.join(own) or 'none'}")
        try:
            setattr(args, name, own[name].parse(str(value)))  # as typed on a command line: 2.5 is not an int
        except BelowMinimum as err:
            raise InputError(f"{analysis.name}: option {name!r}: {err}") from None
        except ValueError:
            raise InputError(f"{analysis.name}: option {name!r} must be {own[name].type.__name__}, got {value!r}") from None
    return args


def add_parsers(sub) -> None:
    """Add ``analyze``, ``dashboard`` and every other registered analysis to the ``sae-lens-attn``
    subparsers."""
    fmt = HelpFormatter
    _add_analysis(sub, ANALYSES["analyze"])
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
    for analysis in ANALYSES.values():
        if analysis.name != "analyze":
            _add_analysis(sub, analysis)


def _load(args):
    import torch

    from sae_lens_attn.data import check_text_source, token_rows
    from sae_lens_attn.interop import load_sae
    from sae_lens_attn.models import SAMPLE_TEXT, describe_tokens, load_model, model_device, token_policy

    from ._common import sae_site

    if args.tokens <= 0:
        raise InputError(f"--tokens must be positive, got {args.tokens}")
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
        raise InputError(f"--features must be comma-separated integers, got {text!r}") from None
    bad = [f for f in features if not 0 <= f < d_sae]
    if bad:
        raise InputError(f"--features: feature ids must be in [0, {d_sae}), got {bad}")
    return features


def run_analysis(analysis: Analysis, args) -> int:
    """Load the model, SAE and rows, print each part of ``analysis`` as it comes, write ``--out``."""
    model, sae, site, rows, _ = _load(args)
    report: dict = {}
    for part in analysis.run(Context(model, sae, site, rows, args)):
        print(part.text)
        report.update(part.data)
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
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
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


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``analyze`` or ``dashboard`` (a UserError prints as one line in frontends.cli)."""
    from sae_lens_attn.provenance import transfer_allowed

    with transfer_allowed(args.allow_transfer):
        return run_dashboard(args) if args.command == "dashboard" else run_analysis(ANALYSES[args.command], args)
