"""The explorer's web server: FastAPI routes over an :class:`~.session.ExplorerSession`, run by uvicorn.

FastAPI because it is widely used and maintained, validates every request body against a typed model
(a bad field is a 422 naming it) and needs nothing but Starlette and pydantic; uvicorn is its usual ASGI
server. Everything is served locally -- the page, its script, and plotly.js from the installed ``plotly``
package -- so the explorer works offline (FastAPI's /docs page loads from a CDN, so it is switched off; the
schema is at /openapi.json).

JSON API (POST bodies are JSON; errors are ``{"detail": "..."}`` with 400 for bad input or a Host header
not allowed (``hosts.py``), 404 for an unknown SAE, 422 for a malformed body or field (``fields.py``):

``GET  /api/info``         the model, the loaded SAEs and the analyses offered as panels
``POST /api/analyze``      ``{text, top_k=8}``: tokens, each SAE's top features per token
``POST /api/activations``  ``{text, sae, feature}``: one feature's activation on every token
``POST /api/feature``      ``{text, sae, feature, pos, n_logits=10, n_terms=12}``: DFA, error, RDFA, logits
``POST /api/qk``           ``{text, layer, head, pos, source, contrast=None, n_pairs=12}``: why the head attends there
``POST /api/steer``        ``{text, sae, feature, coefficient, n_tokens=20, top=10}``: next-token change, continuation
``POST /api/run``          ``{text, sae, analysis, options={}}``: a registered analysis (``explorer=True``) on the prompt
``GET  /dashboards/<sae>/feature_<i>.html``  dashboard pages, when a folder was given for that SAE
"""

# no ``from __future__ import annotations``: FastAPI reads the request models from the routes' annotations
import json
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sae_lens_attn.errors import MissingExtraError, MissingFileError

from .hosts import HostCheck, allowed_hosts, bind, network_warning
from .session import MAX_TOP_K, ExplorerSession, UnknownSAEError

STATIC = Path(__file__).parent / "static"


def plotly_js() -> Path:
    """plotly.min.js as shipped inside the installed ``plotly`` package."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise MissingFileError(f"{path} is missing: reinstall plotly (pip install --force-reinstall plotly)")
    return path


def _missing_extra(err: ImportError) -> MissingExtraError:
    return MissingExtraError(f"the explorer needs FastAPI and uvicorn ({err.name} is not installed): "
                             "pip install 'sae-lens-attn[explore]'")


def _request_models() -> tuple:
    """The request bodies (Analyze, Activations, Feature, Steer, QK, Run): strict (true is not 1), bounded."""
    from pydantic import Field

    from .fields import Body as BaseModel
    from .fields import Text
    from .steer import MAX_COEFFICIENT

    class Analyze(BaseModel):
        text: Text
        top_k: int = Field(8, ge=1, le=MAX_TOP_K)

    class Activations(BaseModel):
        text: Text
        sae: Text
        feature: int = Field(ge=0)

    class Feature(Activations):
        pos: int = Field(ge=0)
        n_logits: int = Field(10, ge=1, le=100)
        n_terms: int = Field(12, ge=1, le=200)

    class Steer(Activations):
        coefficient: float = Field(ge=-MAX_COEFFICIENT, le=MAX_COEFFICIENT, allow_inf_nan=False)
        n_tokens: int = Field(20, ge=0, le=64)
        top: int = Field(10, ge=1, le=100)

    class QK(BaseModel):
        text: Text
        layer: int = Field(ge=0)
        head: int = Field(ge=0)
        pos: int = Field(ge=0)
        source: int = Field(ge=0)
        contrast: int | None = Field(None, ge=0)
        n_pairs: int = Field(12, ge=1, le=100)

    class Run(BaseModel):
        text: Text
        sae: Text
        analysis: Text
        options: dict[str, int | float | str] = Field(default_factory=dict, max_length=32)

    return Analyze, Activations, Feature, Steer, QK, Run


def _error(detail, status: int):  # ASCII JSON: encodes whatever text the request held
    from fastapi.responses import Response

    return Response(json.dumps({"detail": detail}), status_code=status, media_type="application/json")


def _add_error_handlers(app) -> None:
    """404 for an unknown SAE, 422 for a malformed field, 400 for a refused input."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError

    from .fields import validation_detail

    @app.exception_handler(UnknownSAEError)
    async def not_found(request: Request, err: UnknownSAEError):
        return _error(str(err.args[0]) if err.args else "not found", 404)

    @app.exception_handler(RequestValidationError)
    async def bad_field(request: Request, err: RequestValidationError):
        return _error(validation_detail(err.errors()), 422)

    @app.exception_handler(ValueError)  # UnsupportedModelError is a ValueError: a refusal naming the family
    @app.exception_handler(FloatingPointError)  # an SAE whose outputs overflow on this prompt
    async def bad_input(request: Request, err: Exception):
        return _error(str(err), 400)


def _add_api(app, session: ExplorerSession) -> None:
    """The JSON API under /api: every route one call of the session."""
    from fastapi.responses import Response

    Analyze, Activations, Feature, Steer, QK, Run = _request_models()

    def reply(obj: dict) -> Response:
        # json.dumps directly: FastAPI's generic encoder walks every number in Python, several times slower
        return Response(json.dumps(obj, allow_nan=False), media_type="application/json")

    @app.get("/api/info")
    def info():
        return reply(session.info())

    @app.post("/api/analyze")
    def analyze(req: Analyze):
        return reply(session.analyze(req.text, req.top_k))

    @app.post("/api/activations")
    def activations(req: Activations):
        return reply(session.activations(req.text, req.sae, req.feature))

    @app.post("/api/feature")
    def feature(req: Feature):
        return reply(session.feature(req.text, req.sae, req.feature, req.pos, req.n_logits, req.n_terms))

    @app.post("/api/steer")
    def steer(req: Steer):
        return reply(session.steer(req.text, req.sae, req.feature, req.coefficient, req.n_tokens, req.top))

    @app.post("/api/qk")
    def qk(req: QK):
        return reply(session.qk(req.text, req.layer, req.head, req.pos, req.source, req.contrast, req.n_pairs))

    @app.post("/api/run")
    def run(req: Run):
        return reply(session.run_analysis(req.analysis, req.text, req.sae, req.options))


def _add_pages(app, session: ExplorerSession) -> None:
    """The page, its static files, plotly.js from the installed package, and each SAE's dashboards."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/plotly.min.js")
    def plotly():
        return FileResponse(plotly_js(), media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for e in session.saes.values():
        if e.dashboard is not None:
            app.mount(f"/dashboards/{e.id}", StaticFiles(directory=e.dashboard, html=True), name=f"dash-{e.id}")


def create_app(session: ExplorerSession, hosts: frozenset[str] | None = None):
    """The FastAPI application serving ``session``, answering the Host names ``hosts`` (default: loopback)."""
    try:
        import fastapi
        import pydantic  # noqa: F401

        from . import fields  # noqa: F401
    except ImportError as err:
        raise _missing_extra(err) from err
    app = fastapi.FastAPI(title="sae-lens-attn explorer", docs_url=None, redoc_url=None)
    app.add_middleware(HostCheck, allowed=hosts if hosts is not None else allowed_hosts())
    _add_error_handlers(app)
    _add_api(app, session)
    _add_pages(app, session)
    return app


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _server(session: ExplorerSession, log_level: str, hosts: frozenset[str] | None = None):
    try:
        import uvicorn
    except ImportError as err:
        raise _missing_extra(err) from err
    return uvicorn.Server(uvicorn.Config(create_app(session, hosts), log_level=log_level, lifespan="off"))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve(session: ExplorerSession, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
          on_ready=print, allow_hosts: Sequence[str] = (), sock: socket.socket | None = None, warn=_stderr) -> None:
    """Serve until interrupted (Ctrl+C); ``on_ready(message)`` gets the URL once the socket listens.
    ``sock``: a socket already bound to ``host`` (:func:`bind`); ``allow_hosts``: Host names answered besides
    ``host`` and the loopback names; ``warn`` gets the no-authentication warning of a non-loopback address."""
    sock = sock or bind(host, port)
    hosts = allowed_hosts(host, allow_hosts)
    server = _server(session, log_level, hosts)
    warning = network_warning(host, hosts)
    if warning:
        warn(warning)
    on_ready(f"sae-lens-attn explorer: {url_of(sock)}  (Ctrl+C stops it)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextmanager
def running(session: ExplorerSession, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
            allow_hosts: Sequence[str] = ()) -> Iterator[str]:
    """Serve ``session`` from a background thread for the ``with`` block; yields the URL (tests, benchmarks)."""
    sock = bind(host, port)
    server = _server(session, log_level, allowed_hosts(host, allow_hosts))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the explorer server stopped while starting")
            thread.join(0.02)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
