"""The training part of the command line: ``train`` and ``tokenize``, their flags generated from the
config dataclasses' fields and field docstrings. :mod:`sae_lens_attn.frontends.cli` dispatches here."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from dataclasses import MISSING, fields

from sae_lens_attn.errors import UserError, one_line

from .config import TrainConfig, field_docs


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("", "none") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def int_list(text: str) -> list[int]:
    """An argparse type: '1,2' -> [1, 2]; anything else is an error naming the text."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _kind(hint):
    """The argparse ``type`` that parses one value of ``hint`` (bool: true/false; list[int]: '1,2')."""
    if hint is bool:
        return _bool
    if typing.get_origin(hint) is list:
        return int_list
    return hint


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig, prefix: str = "", defaults=None) -> None:
    """One flag per field of the dataclass ``cls``, its help the field's docstring. ``prefix`` is put before
    each flag and destination (``steer_`` gives ``--steer-rows`` into ``steer_rows``); ``defaults`` (an
    instance of ``cls``) supplies the default values instead of the fields' own. Fields holding a nested
    dataclass are skipped: the caller adds them with their own prefix. A bool flag given alone means true."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            continue
        dest = prefix + f.name
        default = getattr(defaults, f.name) if defaults is not None else (f.default if f.default is not MISSING else None)
        kw: dict = {"dest": dest, "default": default, "help": docs.get(f.name, "")}  # the formatter adds "(default: ...)"
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            inner = next(a for a in args if a is not type(None))
            kw["type"], hint, origin = _optional(_kind(inner)), inner, typing.get_origin(inner)
        if origin is typing.Literal:
            kw["choices"] = list(typing.get_args(hint))
        elif hint is bool:
            kw.update(type=kw.get("type", _bool), metavar="BOOL", nargs="?", const=True)
        elif "type" not in kw:
            kw["type"] = _kind(hint)
        parser.add_argument("--" + dest.replace("_", "-"), **kw)


def add_parsers(sub) -> None:
    """Add ``train`` and ``tokenize`` to the ``sae-lens-attn`` subparsers."""
    from .tokenize import TokenizeConfig

    train = sub.add_parser(
        "train",
        help="train SAEs on attention outputs (defaults: TopK on layer 1 hook_z of the embedded model)",
        description="Train one SAE per layer's site from a shared model pass, evaluate it, and save it in "
        "SAELens' format. With no flags: TopK, k=16, on hook_z of layer 1 of the embedded default model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_arguments(train)
    tok = sub.add_parser(
        "tokenize",
        help="pack a corpus into token shards once (train on them with --dataset FOLDER)",
        description="Tokenize and pack a dataset into memory-mapped .npy shards with a manifest naming the "
        "tokenizer, context size and start-token rule; `train --dataset FOLDER` reads them without tokenizing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_arguments(tok, TokenizeConfig)


def _flag_names(text: str) -> str:
    """``TrainConfig.batch_size`` in a message -> ``--batch-size``, the spelling the user typed."""
    return re.sub(r"TrainConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), text)


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The ``train`` subcommand's TrainConfig; an invalid value exits through ``parser.error`` (status 2)
    with a message naming the flag."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    try:
        return TrainConfig(**values)
    except UserError as err:
        parser.error(_flag_names(str(err)))
    raise AssertionError("unreachable")  # parser.error exits


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    cfg = config_from_args(parser, args)
    from sae_lens_attn.devices import check_device

    from .distributed import init_distributed, rank_device
    from .preempt import TrainingInterrupted, resume_command
    from .run import train

    try:
        check_device(rank_device(cfg.device))  # before torchrun's process group picks a backend for it
        dist = init_distributed(cfg.distributed, cfg.device)
    except UserError as err:
        parser.error(_flag_names(str(err)))
    prefix = "sae-lens-attn: error" + (f" (rank {dist.rank})" if dist.world_size > 1 else "")
    finished = False
    try:
        result = train(cfg, log=print if dist.is_main else (lambda *a, **k: None), dist=dist)
        finished = True
    except UserError as err:  # anything else is a bug: its traceback surfaces, exit 1
        print(f"{prefix}: {_flag_names(one_line(err))}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        if dist.is_main:
            how = ("rerun the same torchrun command with these arguments" if dist.world_size > 1 else "resume with")
            print(f"sae-lens-attn: {stop}; {how}:\n{resume_command(argv)}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # outside the training loop (loading, harvesting, evaluating): nothing to keep
        print("sae-lens-attn: interrupted outside the training steps (loading, harvesting or evaluating); to "
              f"continue from the last checkpoint, if any:\n{resume_command(argv)}", file=sys.stderr)
        return 130
    finally:
        dist.close(wait=finished)
    if dist.is_main:
        print()
        print(result.table())
        print(f"\nSAEs saved under {result.out_dir.resolve()}")
    return 0


def _tokenize(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .tokenize import TokenizeConfig, tokenize

    try:
        cfg = TokenizeConfig(**{f.name: getattr(args, f.name) for f in fields(TokenizeConfig)})
    except UserError as err:
        parser.error(re.sub(r"TokenizeConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(err)))
    tokenize(cfg)  # a UserError prints as one line in frontends.cli
    return 0


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``train`` or ``tokenize``; ``argv`` (the command line as typed) goes into the resume hint."""
    if args.command == "train":
        return _train(parser, args, argv)
    return _tokenize(parser, args)
