"""Compatibility path: the explorer is a front end, in :mod:`sae_lens_attn.frontends.explorer`. This module
only re-exports its public names; the layer test allows it because it holds no code of its own and nothing
in the package imports it."""

from sae_lens_attn.frontends.explorer import ExplorerSession, LoadedSAE, Prompt, UnknownSAEError

__all__ = ["ExplorerSession", "LoadedSAE", "Prompt", "UnknownSAEError"]
