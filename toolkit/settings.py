"""Frozen option sets, built once at the edge (CLI or server start-up) and passed down."""

from __future__ import annotations

import enum
import os
from pathlib import Path

import msgspec

from toolkit.cards import Pooling
from toolkit.errors import ConfigError

__all__ = ["HF_OVERRIDE_KEYS", "split_named", "Device", "ExportOptions", "Precision", "RuntimeOptions", "ServerOptions", "Target",
           "default_threads", "parse_device", "parse_hf_overrides"]


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Target(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


class Device(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


def parse_device(value: str | Device) -> Device:
    """A device name as a :class:`Device`; ConfigError naming the valid ones when it is not one."""
    try:
        return Device(value)
    except ValueError:
        raise ConfigError(f"device '{value}' is not one of: {', '.join(d.value for d in Device)}") from None


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class ExportOptions(msgspec.Struct, frozen=True, kw_only=True):
    output: Path | None = None
    revision: str | None = None  # Hub models: a branch, tag or commit (None: the default branch)
    precision: Precision = Precision.FP32
    target: Target = Target.CPU
    opset: int = 18
    max_seq_len: int | None = None
    pooling: Pooling | None = None
    normalize: bool | None = None
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_any: bool = False
    trust_remote_code: bool = False
    skip_parity: bool = False
    allow_low_accuracy: bool = False
    int8_form: str | None = None  # int8: one of export.optimize.INT8_FORMS (None: each measured, the fastest passing)
    optimize: bool = True
    fp16_embedding_table: bool = True  # CPU: store the word-embedding table in fp16 (-22 MiB for MiniLM)
    adapters: tuple[str, ...] = ()  # PEFT LoRA adapters as NAME=DIR (``--adapter``), each picked per request


class RuntimeOptions(msgspec.Struct, frozen=True, kw_only=True):
    device: Device = Device.AUTO
    intra_op_threads: int | None = None  # None: the cores available
    # batches run at once (AsyncEmbedder's workers, Embedder.run's batches); each session then runs
    # intra_op_threads // batch_workers onnxruntime threads (at least 1). None: the server's default for the device
    # (runtime.session.default_batch_workers: 2 on a CPU with 2+ threads, chosen by `toolkit serve` and by each Ray
    # replica), 1 where nothing resolves it
    batch_workers: int | None = 1
    spin: bool = True  # onnxruntime's intra-op threads spin between ops (lower latency; burns CPU others could use)
    graph_optimization: str = "all"  # disable | basic | extended | all
    enable_mem_arena: bool = True
    max_batch_tokens: int = 16384
    max_batch_size: int = 256
    io_binding: bool | None = None  # None: on for CUDA, off for CPU (measured no gain)
    max_queue: int = 4096  # AsyncEmbedder: queued inputs before OverloadedError
    # chunked processing (opt-in): inputs up to this many tokens are embedded by window-sized chunks whose
    # un-normalized embeddings are averaged by token count (vLLM's enable_chunked_processing); None: off
    max_embed_len: int | None = None
    auto_truncate: bool = False  # an input past the window is cut to it unless the call asks otherwise (TEI's flag)
    default_prompt_name: str | None = None  # the card's prompt applied where a call names none (TEI's flag)
    default_prompt: str | None = None  # a prompt text applied where a call names none (TEI's flag)
    # the serve-time Matryoshka switch (vLLM's hf_overrides is_matryoshka / matryoshka_dimensions), for a model
    # trained for it whose card says nothing: None: the card decides; True: any size 1..dim (cut, then normalized),
    # or only matryoshka_dims when given (given alone, they imply True); False: no size below the model's
    matryoshka: bool | None = None
    matryoshka_dims: tuple[int, ...] | None = None
    # LoRA adapter files (onnxruntime's format) added to the artifact's own, as NAME=FILE (``--adapter``)
    adapters: tuple[str, ...] = ()


def split_named(text: str, flag: str, value: str) -> tuple[str, str]:
    """A ``NAME=VALUE`` option (an adapter and its folder or file) as (name, value), both stripped; ConfigError
    naming ``flag`` and the form, ``value`` saying what goes after the ``=``."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ConfigError(f"{flag} {text!r}: give NAME={value}")
    return name.strip(), rest.strip()


HF_OVERRIDE_KEYS = ("is_matryoshka", "matryoshka_dimensions")


def parse_hf_overrides(value: str) -> dict:
    """``--hf-overrides`` (vLLM's flag, its two Matryoshka keys) as RuntimeOptions fields: ``{"matryoshka": ...,
    "matryoshka_dims": ...}``. ConfigError for invalid JSON, another key, or a value of the wrong type."""
    import json

    example = '\'{"is_matryoshka": true}\' or \'{"matryoshka_dimensions": [64, 128]}\''
    try:
        overrides = json.loads(value)
    except ValueError as exc:
        raise ConfigError(f"--hf-overrides is not valid JSON ({exc}): expected an object like {example}") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"--hf-overrides must be a JSON object like {example}, got {json.dumps(overrides)}")
    unknown = [key for key in overrides if key not in HF_OVERRIDE_KEYS]
    if unknown:
        raise ConfigError(f"--hf-overrides key {', '.join(map(repr, unknown))} is not accepted; accepted keys: "
                          f"{', '.join(HF_OVERRIDE_KEYS)}")
    on, dims = overrides.get("is_matryoshka"), overrides.get("matryoshka_dimensions")
    if on is not None and not isinstance(on, bool):
        raise ConfigError(f"--hf-overrides is_matryoshka must be true or false, got {json.dumps(on)}")
    if dims is not None and (not isinstance(dims, list) or not dims
                             or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims)):
        raise ConfigError(f"--hf-overrides matryoshka_dimensions must be a non-empty list of positive integers, "
                          f"got {json.dumps(dims)}")
    if on is False and dims is not None:
        raise ConfigError("--hf-overrides: matryoshka_dimensions goes with is_matryoshka true (or alone), not false")
    return {"matryoshka": True if dims is not None else on, "matryoshka_dims": None if dims is None else tuple(dims)}


class ServerOptions(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    allow_runtime_lora_updating: bool = False  # vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter
    port: int = 8000
    api_key: str | None = None
    max_concurrent_requests: int = 512  # requests in flight before 429
    max_client_batch_size: int = 2048  # inputs per request
    max_request_tokens: int = 300_000  # tokens per request
    payload_limit: int = 2 * 1024 * 1024  # body bytes before 413 (TEI's default, 2 MiB)
    read_timeout_s: float = 10.0  # a request's headers and body must arrive within this (slow clients are cut off)
    max_connections: int = 1024  # open connections before uvicorn answers 503
    shutdown_grace_s: int = 30  # SIGTERM: in-flight requests get this long, then a 503
    allow_request_chat_template: bool = False  # accept a caller's `chat_template` (a Jinja program) at all
    chat_template: str | None = None  # --chat-template: renders `messages` in place of the model's own template
    allow_priority_boost: bool = False  # accept negative `priority` (ahead of everyone else's default 0)
    allow_image_urls: list[str] = []  # hosts whose http(s) image and video URLs may be fetched (host, host:port, *.domain)
    image_url_timeout_s: float = 10.0  # one image fetch, connect to last byte
    image_url_max_bytes: int = 16 * 1024 * 1024
    video_url_max_bytes: int = 64 * 1024 * 1024  # one fetched video file (the same hosts and time limit as images)
    log_level: str = "info"
    json_output: bool = False  # one JSON object per log line (TEI's --json-output)
    cors_allow_origins: list[str] = []  # browser origins allowed ("*": any); empty: no CORS headers at all
    cors_allow_methods: tuple[str, ...] = ("*",)
    cors_allow_headers: tuple[str, ...] = ("*",)
    cors_allow_credentials: bool = False
    ssl_keyfile: str | None = None  # TLS by uvicorn itself: both files, or neither
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None  # ask clients for a certificate signed by these CAs (mutual TLS)
    otlp_endpoint: str | None = None  # OTLP/HTTP receiver for request spans (the [otel] extra)
    otlp_service_name: str = "onnx-embed-toolkit"
    disable_spans: bool = False  # JSON log lines without trace / span ids
    uds_path: str | None = None  # also listen on this Unix domain socket
    prometheus_port: int | None = None  # also serve /metrics, without the API key, on this port
    # the Batch API (/v1/files, /v1/batches): its files and batches live in this directory; None: the routes are off
    batch_dir: str | None = None
    batch_max_file_bytes: int = 200 * 1024 * 1024  # one uploaded file (OpenAI's limit, 200 MB)
    batch_max_requests: int = 50_000  # request lines in one batch (OpenAI's limit)
    batch_concurrency: int = 2  # a batch's lines in flight at once, each queued behind every online request
