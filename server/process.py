"""``run_server``: the serving process (uvicorn with the toolkit's connection limits, signals, memory)."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import time
from pathlib import Path

import msgspec

from toolkit.errors import ConfigError
from toolkit.runtime.session import default_batch_workers
from toolkit.server.app import create_logged_app, load_models
from toolkit.server.metrics import Metrics
from toolkit.server.telemetry import configure_logging
from toolkit.settings import RuntimeOptions, ServerOptions

__all__ = ["bind_listener", "bind_unix", "check_tls", "read_timeout_protocol", "run_server"]

log = logging.getLogger("toolkit.server")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def read_timeout_protocol(seconds: float):
    """uvicorn's httptools protocol with a request read timeout: a connection must deliver each request's
    headers and body within ``seconds`` of opening (or of its previous response), else it is closed.

    uvicorn has no such timeout: a connection that never sends its headers is held forever. On shutdown an idle
    TLS connection is dropped at once rather than closed gracefully (see ``shutdown``).
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

        def shutdown(self) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self.transport.get_extra_info("sslcontext") is not None:
                # TLS: close() waits for the client's close_notify (asyncio's 30 s SSL shutdown timeout), and an
                # idle keep-alive client never sends it: shutdown would wait out its whole grace period
                self.transport.abort()
                return
            super().shutdown()

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


def bind_unix(path: str) -> socket.socket:
    """A listening Unix domain socket at ``path``; a stale socket file (no server answers on it) is replaced,
    a live one or any other file is a ConfigError."""
    target = Path(path)
    if target.exists() or target.is_symlink():
        if not target.is_socket():
            raise ConfigError(f"--uds-path {path} exists and is not a socket: remove it or pick another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            target.unlink()  # nobody listens: a socket file left by a server that died
        else:
            raise ConfigError(f"--uds-path {path}: another server is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on the Unix socket {path}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def check_tls(keyfile: str | None, certfile: str | None, ca_certs: str | None) -> None:
    """The TLS files load (the key matches the certificate) before anything else starts: ConfigError in one line."""
    import ssl

    if (keyfile is None) != (certfile is None):
        raise ConfigError("--ssl-keyfile and --ssl-certfile go together: give both for HTTPS")
    if keyfile is None:
        if ca_certs is not None:
            raise ConfigError("--ssl-ca-certs needs --ssl-keyfile and --ssl-certfile (it asks clients for certificates)")
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for flag, path in (("--ssl-keyfile", keyfile), ("--ssl-certfile", certfile), ("--ssl-ca-certs", ca_certs)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    try:
        context.load_cert_chain(certfile, keyfile)
        if ca_certs is not None:
            context.load_verify_locations(ca_certs)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot use the TLS key and certificate ({keyfile}, {certfile}"
                          f"{', ' + ca_certs if ca_certs else ''}): {getattr(exc, 'reason', None) or exc}") from None


def run_server(paths: list[Path], names: list[str], options: ServerOptions, runtime: RuntimeOptions,
               listener: socket.socket | None = None) -> int:
    """Load, then serve until SIGINT / SIGTERM (in-flight requests finish); returns the exit code.

    ``listener``: a socket from ``bind_listener`` (bound here when not given); ``runtime.batch_workers`` None:
    ``default_batch_workers`` for the device and threads (as a Ray replica chooses, ``server.ray.replica_runtime``).
    """
    import uvicorn

    if runtime.batch_workers is None:
        runtime = msgspec.structs.replace(
            runtime, batch_workers=default_batch_workers(runtime.device, runtime.intra_op_threads))

    listener = listener or bind_listener(options.host, options.port)
    sockets = [listener]
    if options.prometheus_port is not None:
        sockets.append(bind_listener(options.host, options.prometheus_port))
    if options.uds_path is not None:
        sockets.append(bind_unix(options.uds_path))

    configure_logging(options.log_level, options.json_output, spans=not options.disable_spans)
    started = time.perf_counter()
    metrics = Metrics()
    registry = load_models(paths, names, runtime, metrics)
    app = create_logged_app(registry, options, metrics)
    scheme = "https" if options.ssl_certfile else "http"
    for name, served in registry.models.items():
        workers, threads = runtime.batch_workers, served.embedder.session.threads
        log.info("serving %s (%s, %s, %d batch worker%s x %d onnxruntime thread%s) on %s", name,
                 served.embedder.path.name, served.embedder.device.value, workers, "s"[:workers > 1], threads,
                 "s"[:threads > 1], f"{scheme}://{options.host}:{options.port}")
    if options.uds_path is not None:
        log.info("also listening on the Unix socket %s", options.uds_path)
    if options.prometheus_port is not None:
        log.info("metrics on %s://%s:%d/metrics", scheme, options.host, options.prometheus_port)
    log.info("models loaded in %.2f s", time.perf_counter() - started)
    _release_freed_memory()
    # uvicorn finishes in-flight requests on SIGTERM / SIGINT, then re-raises the signal
    # to the previous handler: make that a no-op so a graceful stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    protocol = read_timeout_protocol(options.read_timeout_s)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level, access_log=False,
                            log_config=None, http=protocol or "auto", timeout_keep_alive=5,
                            limit_concurrency=options.max_connections,
                            timeout_graceful_shutdown=options.shutdown_grace_s, ssl_keyfile=options.ssl_keyfile,
                            ssl_certfile=options.ssl_certfile, ssl_ca_certs=options.ssl_ca_certs,
                            ssl_cert_reqs=2 if options.ssl_ca_certs else 0)  # ssl.CERT_REQUIRED with a CA list
    server = uvicorn.Server(config)
    try:
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        if options.uds_path is not None:
            Path(options.uds_path).unlink(missing_ok=True)
    return 0 if server.started else 1
