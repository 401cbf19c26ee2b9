"""A local web app for exploring any prompt through attention-output SAEs (``sae-lens-attn explore``).

:mod:`.session` computes every number as JSON from the Python API (testable without HTTP); :mod:`.detail`
and :mod:`.steer` are its feature and steering views; :mod:`.server` serves it with FastAPI and uvicorn
(the ``explore`` extra); ``static/`` holds the page (plain HTML and JavaScript, plotly.js served from the
installed ``plotly`` package, nothing from the network).
"""

from .session import ExplorerSession, LoadedSAE, Prompt, UnknownSAEError

__all__ = ["ExplorerSession", "LoadedSAE", "Prompt", "UnknownSAEError"]
