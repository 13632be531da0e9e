"""``run_server``: the serving process (uvicorn with the toolkit's connection limits, signals, memory)."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import time
from pathlib import Path

from toolkit.errors import ConfigError
from toolkit.server.app import create_app, load_models
from toolkit.server.metrics import Metrics
from toolkit.settings import RuntimeOptions, ServerOptions

__all__ = ["bind_listener", "read_timeout_protocol", "run_server"]

log = logging.getLogger("toolkit.server")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def read_timeout_protocol(seconds: float):
    """uvicorn's httptools protocol with a request read timeout: a connection must deliver each request's
    headers and body within ``seconds`` of opening (or of its previous response), else it is closed.

    uvicorn has no such timeout: a connection that never sends its headers is held forever.
    Returns None where httptools is missing (uvicorn's own protocol is used then, without it).
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class ReadTimeoutProtocol(HttpToolsProtocol):
        _read_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(seconds, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if not self.transport.is_closing():
                log.debug("closing a connection that did not send its request within %.1f s", seconds)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return ReadTimeoutProtocol


def _release_freed_memory() -> None:
    """Hand the heap that model loading freed (the parsed ONNX protobuf) back to the OS.

    glibc keeps freed memory in its arenas; malloc_trim returns it: -21 MiB RSS for MiniLM (measured).
    """
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before anything is loaded or logged.

    A taken port is one ConfigError line (exit 2) at once, not a uvicorn traceback after the banner;
    the socket is handed to uvicorn, so nothing can take the port in between.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT does not block a restart
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is taken (another server?): pass another --port") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run_server(paths: list[Path], names: list[str], options: ServerOptions, runtime: RuntimeOptions,
               listener: socket.socket | None = None) -> int:
    """Load, then serve until SIGINT / SIGTERM (in-flight requests finish); returns the exit code.

    ``listener``: a socket from ``bind_listener`` (bound here when not given).
    """
    import uvicorn

    listener = listener or bind_listener(options.host, options.port)

    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    metrics = Metrics()
    registry = load_models(paths, names, runtime, metrics)
    app = create_app(registry, options, metrics)
    level = options.log_level.upper()
    for name in ("", "toolkit", "litestar"):  # Litestar's own logging config sets INFO on what it touches
        logging.getLogger(name).setLevel(level)
    for name, served in registry.models.items():
        log.info("serving %s (%s, %s) on %s", name, served.embedder.path.name, served.embedder.device.value,
                 f"http://{options.host}:{options.port}")
    log.info("models loaded in %.2f s", time.perf_counter() - started)
    _release_freed_memory()
    # uvicorn finishes in-flight requests on SIGTERM / SIGINT, then re-raises the signal
    # to the previous handler: make that a no-op so a graceful stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    protocol = read_timeout_protocol(options.read_timeout_s)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level, access_log=False,
                            http=protocol or "auto", timeout_keep_alive=5, limit_concurrency=options.max_connections,
                            timeout_graceful_shutdown=options.shutdown_grace_s)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[listener])
    finally:
        listener.close()
    return 0 if server.started else 1
