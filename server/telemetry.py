"""What the server tells its operators about each request: one record per request (id, route, status,
latency, tokens, phases) kept in a context variable while it runs, a log line from it (JSON with
``--json-output``), and OpenTelemetry spans exported over OTLP/HTTP (``--otlp-endpoint``, the [otel] extra).

The Gateway opens the record and closes it; the engine's ``on_request`` callback adds each task's tokens and
phase times (``note_work``) from inside the request's task, so no route has to know about any of this.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from toolkit.errors import ConfigError
from toolkit.model_source import require_extra

__all__ = ["JsonFormatter", "RequestRecord", "Tracer", "begin_request", "check_otlp", "configure_logging", "end_request",
           "note_work", "traces_url"]

access_log = logging.getLogger("toolkit.access")
_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("toolkit_request", default=None)
_REQUEST_ID_CHARS = 128  # a caller's x-request-id is echoed, cut to this length, printable ASCII only


@dataclass
class RequestRecord:
    """One request as the operator sees it."""

    id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    started_ns: int = field(default_factory=time.time_ns)
    status: int = 500
    tokens: int = 0
    # (phase, seconds, when it ended: perf_counter) for the engine's phases, in the order they happened
    phases: list[tuple[str, float, float]] = field(default_factory=list)
    engine_done: float | None = None  # when the engine last handed back a result (what follows is encoding)
    span: object = None  # the request's OpenTelemetry span, when tracing

    def fields(self) -> dict:
        """The record as log fields."""
        return {"request_id": self.id, "method": self.method, "route": self.path, "status": self.status,
                "latency_ms": round((time.perf_counter() - self.started) * 1000, 3), "tokens": self.tokens}


def request_id(headers: dict) -> str:
    """The caller's ``x-request-id`` when it is a sane one, else a new id."""
    given = headers.get(b"x-request-id", b"")[:_REQUEST_ID_CHARS]
    if given and all(33 <= c < 127 for c in given):
        return given.decode()
    return uuid.uuid4().hex


def begin_request(scope) -> tuple[RequestRecord, contextvars.Token]:
    record = RequestRecord(request_id(dict(scope["headers"])), scope.get("method", ""), scope["path"])
    return record, _current.set(record)


def end_request(record: RequestRecord, token: contextvars.Token, tracer: Tracer | None) -> None:
    """Close the record: its spans, its log line."""
    try:
        if tracer is not None:
            tracer.finish(record)
        access_log.info("%s %s %d", record.method, record.path, record.status, extra=record.fields())
    finally:
        _current.reset(token)


def note_work(tokenize: float, queue: float, inference: float, tokens: int) -> None:
    """One engine task of the current request is done: its tokens and phase times join the request's record."""
    record = _current.get()
    if record is None:
        return
    now = time.perf_counter()
    record.tokens += tokens
    record.engine_done = now
    ends = now - inference, now - inference - queue  # laid back from when the engine answered
    record.phases += [("tokenize", tokenize, ends[1]), ("queue", queue, ends[0]), ("inference", inference, now)]


# ---------------------------------------------------------------- logs
class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, target (the logger), message, the request's fields when the
    line is about one, the trace and span ids when tracing (unless ``spans`` is off), an exception's text."""

    FIELDS = ("request_id", "method", "route", "status", "latency_ms", "tokens")

    def __init__(self, spans: bool = True) -> None:
        super().__init__()
        self.spans = spans

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="microseconds")
        entry = {"timestamp": stamp.replace("+00:00", "Z"), "level": record.levelname, "target": record.name,
                 "message": record.getMessage()}
        entry.update({name: getattr(record, name) for name in self.FIELDS if hasattr(record, name)})
        current = _current.get()
        if self.spans and current is not None and current.span is not None:
            context = current.span.get_span_context()
            entry["trace_id"], entry["span_id"] = f"{context.trace_id:032x}", f"{context.span_id:016x}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, json_output: bool, spans: bool = True) -> None:
    """Every log line of the process (the toolkit's, Litestar's, uvicorn's) through one handler on stderr,
    JSON or text; the loggers that bring their own handlers lose them and propagate to it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(spans) if json_output else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    for name in ("", "toolkit", "litestar", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if name:
            for old in list(logger.handlers):
                logger.removeHandler(old)
            logger.propagate = True
        logger.setLevel(level.upper())


# ---------------------------------------------------------------- traces
def traces_url(endpoint: str) -> str:
    """OTLP/HTTP's traces URL for ``endpoint``: a bare ``http://host:4318`` gets ``/v1/traces``."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--otlp-endpoint must be an http(s) URL of an OTLP/HTTP receiver (got {endpoint!r}), "
                          "as http://localhost:4318")
    return endpoint if parts.path not in ("", "/") else endpoint.rstrip("/") + "/v1/traces"


def check_otlp(endpoint: str) -> None:
    """``--otlp-endpoint`` is usable: an http(s) URL, and the [otel] extra installed (ConfigError otherwise)."""
    traces_url(endpoint)
    require_extra("otel", "--otlp-endpoint (request spans over OTLP/HTTP)")


class Tracer:
    """A span per request (``METHOD /path``, a child of the caller's W3C ``traceparent`` when it sends a valid
    one), with the engine's phases as child spans (tokenize, queue, inference, encode), exported over OTLP/HTTP
    in batches by the OpenTelemetry SDK."""

    def __init__(self, endpoint: str, service_name: str) -> None:
        check_otlp(endpoint)
        url = traces_url(endpoint)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url), schedule_delay_millis=1000))
        self.tracer = self.provider.get_tracer("toolkit.server")
        self.propagator = TraceContextTextMapPropagator()
        self.server_kind, self.in_context = SpanKind.SERVER, set_span_in_context

    def start(self, record: RequestRecord, scope) -> None:
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"traceparent", b"tracestate")}
        parent = self.propagator.extract(carrier)  # a malformed traceparent is ignored: a new trace starts
        record.span = self.tracer.start_span(f"{record.method} {record.path}", context=parent, kind=self.server_kind,
                                             start_time=record.started_ns, attributes={
                                                 "http.request.method": record.method, "url.path": record.path,
                                                 "toolkit.request_id": record.id})

    def finish(self, record: RequestRecord) -> None:
        span = record.span
        if span is None:
            return
        now, now_ns = time.perf_counter(), time.time_ns()

        def ns(at: float) -> int:  # a perf_counter instant as wall-clock nanoseconds
            return now_ns - int((now - at) * 1e9)

        context = self.in_context(span)
        for name, seconds, end in record.phases:
            if seconds > 0:
                self.tracer.start_span(name, context=context, start_time=ns(end - seconds)).end(end_time=ns(end))
        if record.engine_done is not None:
            self.tracer.start_span("encode", context=context, start_time=ns(record.engine_done)).end(end_time=now_ns)
        span.set_attribute("http.response.status_code", record.status)
        span.set_attribute("toolkit.tokens", record.tokens)
        span.end(end_time=now_ns)

    def close(self) -> None:
        """Flush what is queued and stop exporting."""
        self.provider.shutdown()
