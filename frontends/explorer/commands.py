"""``sae-lens-attn explore``: load SAEs (and the model they name) and serve the explorer (127.0.0.1 by default)."""

from __future__ import annotations

import argparse

from sae_lens_attn.analysis.commands import HelpFormatter


def add_parsers(sub) -> None:
    """Add ``explore`` to the ``sae-lens-attn`` subparsers."""
    p = sub.add_parser(
        "explore", formatter_class=HelpFormatter,
        help="a local web app: type a prompt, see every SAE's features per token, DFA, RDFA, logits, steering",
        description="Serve the attention-SAE explorer (FastAPI + uvicorn, everything local, works offline): the "
        "prompt is tokenized by the project's policy; each SAE shows its top features per token; a click on a "
        "token and a feature shows DFA by head and source, the error term, one RDFA step back, head shares, "
        "logits, and steering. A JSON API under /api serves the same numbers.",
    )
    p.add_argument("--sae", action="append", required=True, metavar="DIR",
                   help="SAE directory (ours or SAELens' v6 layout); repeat for several SAEs shown side by side")
    p.add_argument("--model", default=None,
                   help="hub id or local model directory (default: the SAEs' metadata.model_name)")
    p.add_argument("--dashboards", action="append", default=None, metavar="DIR",
                   help="a folder written by `sae-lens-attn dashboard` (matched to the SAE by its site); "
                   "the explorer links each feature to its page; repeatable")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (the default is this machine only; the "
                   "API has no authentication, so another address prints a warning)")
    p.add_argument("--allow-host", action="append", default=None, metavar="NAME",
                   help="a Host name to answer besides --host, localhost, 127.0.0.1 and [::1] (the name or address "
                   "clients on the network use); repeatable; '*' answers any (turns off the DNS-rebinding guard)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port; the URL is printed)")
    p.add_argument("--device", default=None, help="'cpu', 'cuda', ... (default: CUDA when available)")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """Load and serve (a UserError prints as one line in frontends.cli)."""
    sock = None
    try:
        from .server import bind, create_app, serve
        from .session import ExplorerSession

        sock = bind(args.host, args.port)  # a bad --host or --port fails here, before anything loads
        session = ExplorerSession.from_paths(args.sae, args.model, args.device, args.dashboards or ())
        create_app(session)  # fail here, with the message, when FastAPI or uvicorn is missing
        serve(session, args.host, args.port, on_ready=lambda msg: print(msg, flush=True),
              allow_hosts=args.allow_host or (), sock=sock)
    except KeyboardInterrupt:
        pass
    finally:
        if sock is not None:
            sock.close()
    return 0
