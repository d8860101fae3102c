"""Run the app under uvicorn: bind (port 0 = any free port), say where, stop cleanly on SIGTERM / Ctrl-C.

On a signal the server stops accepting (the listening socket closes; requests on open connections get 503), lets
in-flight requests finish for `grace_s` seconds, cancels what is left, and returns normally: the process exits 0.
(uvicorn re-raises the signal after its own shutdown, which would end the process with 128 + signal; a managed
kiosk service should see a clean stop.)
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys
import threading

import uvicorn

from ..errors import UserError

log = logging.getLogger("edge_vl2.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve_app(app, host: str = "127.0.0.1", port: int = 8000, grace_s: float = 30.0,
              announce=lambda line: print(line, file=sys.stderr, flush=True)) -> None:
    """Serve until SIGTERM / SIGINT (or the app asks to stop), then return."""
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=grace_s,
                            lifespan="on")
    server = _Server(config, app)
    app.state.serve.stop_server = lambda: setattr(server, "should_exit", True)
    if threading.current_thread() is threading.main_thread():
        # From before the first line we print, not only once uvicorn runs: a SIGTERM at any point is a clean stop.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, server.handle_exit)
    if not is_loopback(host):
        announce(f"warning: listening on {host}, not loopback: anyone who can reach this machine can use the "
                 "model" + ("" if _has_key(app) else "; set --api-key"))
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    announce(f"edge-vl2 serve: listening on http://{_url_host(bound_host)}:{bound_port} (model "
             f"{app.state.serve.model_id}; GET /health says when it is ready)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn's server whose signal handler also stops the app accepting requests, and does not re-raise the
    signal after shutdown."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.app_state = app.state.serve

    def handle_exit(self, sig, frame) -> None:
        self.app_state.stop_accepting()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for in-flight requests
        else:
            self.should_exit = True
            log.info("stopping: no new requests; in-flight ones have %.0f s to finish",
                     self.config.timeout_graceful_shutdown)


def _has_key(app) -> bool:
    return bool(app.state.serve.config.api_key)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
