"""``sae-lens-attn``: the command line, one entry that dispatches to each part's own parser.

An error a user can fix (:class:`sae_lens_attn.errors.UserError`) prints as one line and exits 2; any other
exception is a bug and surfaces as a traceback with exit 1.

Each part (a module with ``add_parsers(sub)`` and ``run(parser, args, argv)``) owns the subcommands it adds: :mod:`sae_lens_attn.training.commands` (``train``, ``tokenize``),
:mod:`sae_lens_attn.analysis.commands` (``analyze``, ``dashboard``) and
:mod:`sae_lens_attn.frontends.explorer.commands` (``explore``).
"""

from __future__ import annotations

import argparse
import sys

from sae_lens_attn.analysis import commands as analysis_commands
from sae_lens_attn.errors import UserError, one_line
from sae_lens_attn.training import commands as training_commands
from sae_lens_attn.training.config import TrainConfig

from .explorer import commands as explorer_commands

PARTS = (training_commands, analysis_commands, explorer_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-attn",
        description="Sparse autoencoders on attention-layer outputs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for part in PARTS:
        before = set(sub.choices)
        part.add_parsers(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(_run=part.run)  # the part that added a subcommand runs it
    return parser


def parse_train_config(argv: list[str]) -> TrainConfig:
    """``sae-lens-attn train ARGV`` parsed into a TrainConfig, without training (argparse errors exit 2)."""
    parser = build_parser()
    return training_commands.config_from_args(parser, parser.parse_args(["train", *argv]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return args._run(parser, args, argv)
    except UserError as err:  # anything else is a bug: its traceback surfaces, exit 1
        print(f"sae-lens-attn: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
