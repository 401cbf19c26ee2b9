"""Compatibility path: the g-SAE study is a front end (it trains and analyses), in
:mod:`sae_lens_attn.frontends.gsae_study`. This module only re-exports it, so ``python -m
sae_lens_attn.analysis.gsae_study`` and old imports keep working; the layer test allows it because it holds
no code of its own and nothing in the package imports it."""

import sys

from sae_lens_attn.frontends.gsae_study import StudyConfig, main, report, run_study

__all__ = ["StudyConfig", "main", "report", "run_study"]

if __name__ == "__main__":
    sys.exit(main())
