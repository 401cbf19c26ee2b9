"""Compatibility path: the command line's entry is :mod:`sae_lens_attn.frontends.cli` and the training
subcommands are :mod:`sae_lens_attn.training.commands`. This module only re-exports them, so
``python -m sae_lens_attn.training.cli`` and old imports keep working; the layer test allows it because it
holds no code of its own and nothing in the package imports it."""

import sys

from sae_lens_attn.frontends.cli import build_parser, main, parse_train_config
from sae_lens_attn.training.commands import add_config_arguments, config_from_args

__all__ = ["add_config_arguments", "build_parser", "config_from_args", "main", "parse_train_config"]

if __name__ == "__main__":
    sys.exit(main())
