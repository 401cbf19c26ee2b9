"""Where the explorer listens, and which ``Host`` headers it answers.

The API has no authentication: anyone who can reach the port can run the model and read ``/api/info``
(which names local SAE paths). So:

* :func:`bind` opens the socket before anything is loaded, and a bad ``--host`` is an error about the host
  (a name that does not resolve, an address this machine does not have), not about the port;
* :func:`network_warning` is printed at start when the address is not a loopback one;
* :class:`HostCheck` answers only requests whose ``Host`` header names the bound host, ``localhost``,
  ``127.0.0.1`` or ``[::1]`` (plus ``--allow-host`` names; ``*`` turns the check off). A page on another
  site that rebinds its DNS name to 127.0.0.1 still sends its own name as the Host, so it is refused: this
  is what stops a browser on this machine from being used to read the local API.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
from collections.abc import Iterable

from sae_lens_attn.errors import InputError, UserError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def normalise_host(host: str) -> str:
    """``host`` as compared: lower case, without IPv6 brackets or a trailing dot."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def header_host(value: str) -> str:
    """The host of a ``Host`` header value (``name:port``, ``[v6]:port`` or a bare name), normalised."""
    value = value.strip()
    if value.startswith("["):  # [::1]:8000
        return normalise_host(value[: value.find("]") + 1] if "]" in value else value)
    return normalise_host(value.rsplit(":", 1)[0] if value.count(":") == 1 else value)


def allowed_hosts(bound: str = "127.0.0.1", extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host names the explorer answers: the bound host, the loopback names and ``extra``."""
    return frozenset({normalise_host(bound), *LOOPBACK_NAMES, *(normalise_host(h) for h in extra if h.strip())})


def is_loopback(host: str) -> bool:
    host = normalise_host(host)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: loopback only if every address it resolves to is
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def network_warning(host: str, allowed: frozenset[str]) -> str | None:
    """The start-up warning for a non-loopback address (None for a loopback one)."""
    if is_loopback(host):
        return None
    where = "every network interface" if normalise_host(host) in ("0.0.0.0", "::", "") else host
    names = "any Host (--allow-host '*')" if "*" in allowed else f"the Host names {', '.join(sorted(allowed))}"
    return (f"sae-lens-attn: warning: the explorer listens on {where}, and its API has no authentication: anyone "
            f"who can reach this port can run the model and read /api/info (local SAE paths). It answers "
            f"{names}; --allow-host NAME adds the name clients use. Use --host 127.0.0.1 to keep it on this machine")


class BindError(UserError, OSError):
    """The explorer cannot listen on the ``--host``/``--port`` given; the message names the flag at fault."""


def _bind_error(host: str, port: int, err: OSError) -> BindError:
    hosts = "use 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of this machine's addresses"
    if isinstance(err, socket.gaierror):
        return BindError(f"cannot listen on --host {host!r}: the name does not resolve ({err.strerror}); {hosts}")
    if err.errno == errno.EADDRNOTAVAIL:
        return BindError(f"cannot listen on --host {host!r}: it is not an address of this machine (EADDRNOTAVAIL); "
                       f"{hosts}")
    if err.errno == errno.EADDRINUSE:
        return BindError(f"cannot listen on {host}:{port}: the port is in use (EADDRINUSE); choose another --port "
                       "(0: any free one)")
    if err.errno == errno.EACCES:
        return BindError(f"cannot listen on {host}:{port}: this user may not use port {port} (EACCES); choose a "
                       "--port of 1024 or more (0: any free one)")
    return BindError(f"cannot listen on {host}:{port} ({err.strerror or err}); check --host and --port")


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: a free one), so the URL is known before the server
    starts; an ``OSError`` whose one-line message names the flag at fault."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"--port must be an integer in 0..65535 (0: any free port), got {port!r}")
    name = normalise_host(host) or "0.0.0.0"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as err:
        raise _bind_error(host, port, err if isinstance(err, OSError) else socket.gaierror(str(err))) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as err:
        sock.close()
        raise _bind_error(host, port, err) from None
    sock.listen(128)
    return sock


class HostCheck:
    """ASGI middleware: a request whose ``Host`` header is not in ``allowed`` gets a 400 naming it."""

    def __init__(self, app, allowed: frozenset[str]):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or "*" in self.allowed:
            return await self.app(scope, receive, send)
        value = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        host = header_host(value)
        if host in self.allowed:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        detail = (f"Host header {value!r} is not a name this explorer answers ({', '.join(sorted(self.allowed))}); "
                  "this stops pages of other sites from reading the local API. Open it by one of those names, or "
                  f"start it with --allow-host {host or 'NAME'}")
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
