"""The front ends: what a person runs, standing on the core, the training and the analysis.

:mod:`.cli` is the ``sae-lens-attn`` command (one entry that dispatches to each part's own parser),
:mod:`.explorer` the local web app, :mod:`.neuronpedia` the Neuronpedia export, :mod:`.gsae_study` the
TopK-vs-g-SAE study. Nothing below this layer imports it (``tests/test_layers.py``).
"""
