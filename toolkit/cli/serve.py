"""``toolkit serve``: models over every peer's HTTP dialect."""

from __future__ import annotations

from typing import Annotated

import typer

from toolkit.cli.app import app, one_line_errors, parse_device
from toolkit.cli.sources import (
    PrecisionOption,
    RemoteCodeOption,
    RevisionOption,
    TargetOption,
    artifact_for,
    export_options_for_sources,
)
from toolkit.errors import ConfigError
from toolkit.settings import split_named

__all__ = ["serve"]


def _env(name: str) -> list[str]:
    """The environment variables of a flag: ``TOOLKIT_NAME`` first, then TEI's own ``NAME``."""
    return [f"TOOLKIT_{name}", name]


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _origins(values: list[str]) -> list[str]:
    """Origins from repeated flags, comma lists (TEI) or a JSON list (vLLM's ``--allowed-origins '["*"]'``)."""
    import json

    origins: list[str] = []
    for value in values:
        if value.strip().startswith("["):
            try:
                listed = json.loads(value)
            except ValueError:
                raise ConfigError(f"--allowed-origins {value!r} is not a JSON list of origins") from None
            origins += [str(v) for v in listed]
        else:
            origins += _items(value)
    return origins


def lora_module(text: str) -> str:
    """``--adapter`` as NAME=FILE: vLLM's ``--lora-modules`` forms, ``name=path`` or its JSON object
    (``{"name": ..., "path": ...}``); ConfigError naming them."""
    text = text.strip()
    if text.startswith("{"):
        import json

        try:
            item = json.loads(text)
            return f"{item['name']}={item['path']}"
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"--adapter {text!r}: the JSON form needs \"name\" and \"path\"") from None
    return "=".join(split_named(text, "--adapter", 'FILE (an .onnx_adapter file) or {"name": ..., "path": ...}'))


@app.command()
def serve(
    models: Annotated[list[str] | None, typer.Argument(metavar="[MODEL]...", help="What to serve: artifacts (.onnx), bundled card names (`toolkit cards`), Hub ids or local model directories; anything but an artifact is exported once into TOOLKIT_CACHE and reused [default: the bundled all-MiniLM-L6-v2]")] = None,
    precision: PrecisionOption = "fp32",
    target: TargetOption = "cpu",
    revision: RevisionOption = None,
    trust_remote_code: RemoteCodeOption = False,
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port", min=0, max=65535)] = 8000,
    served_model_name: Annotated[list[str] | None, typer.Option(help="Model name per artifact [default: from the manifest]")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | tensorrt")] = "auto",
    api_key: Annotated[str | None, typer.Option(envvar="TOOLKIT_API_KEY", help="Require 'Authorization: Bearer KEY'")] = None,
    max_batch_tokens: Annotated[int, typer.Option(help="Padded tokens per inference batch")] = 16384,
    max_concurrent_requests: Annotated[int, typer.Option(help="Requests in flight before 429")] = 512,
    max_client_batch_size: Annotated[int, typer.Option(help="Inputs per request")] = 2048,
    max_request_tokens: Annotated[int, typer.Option(help="Tokens per request")] = 300_000,
    payload_limit: Annotated[int, typer.Option(help="Request body bytes before 413 (TEI's default, 2 MiB)")] = 2 * 1024 * 1024,
    read_timeout: Annotated[float, typer.Option(help="Seconds a connection has to send a request's headers and body")] = 10.0,
    max_connections: Annotated[int, typer.Option(help="Open connections before uvicorn answers 503")] = 1024,
    shutdown_grace: Annotated[int, typer.Option(help="SIGTERM: seconds in-flight requests get before a 503")] = 30,
    allow_request_chat_template: Annotated[bool, typer.Option(help="Accept a request's own `chat_template` (a Jinja program, rendered sandboxed with limits)")] = False,
    chat_template: Annotated[str | None, typer.Option(envvar="TOOLKIT_CHAT_TEMPLATE", help="Render chat `messages` with this Jinja template (a file, or the template itself) instead of the model's own, or for a model without one, as vLLM's flag does [default: the model's]")] = None,
    allow_priority_boost: Annotated[bool, typer.Option(help="Accept negative `priority` (ahead of other requests)")] = False,
    allow_image_url: Annotated[list[str] | None, typer.Option("--allow-media-url", "--allow-image-url", help="Fetch http(s) image and video URLs from this host (repeat it; HOST, HOST:PORT or *.DOMAIN; images up to 16 MiB, videos up to 64 MiB). Off by default: only data:image / data:video URIs are read [default: none]")] = None,
    image_url_timeout: Annotated[float, typer.Option("--media-url-timeout", "--image-url-timeout", help="Seconds one image or video fetch may take")] = 10.0,
    max_embed_len: Annotated[int | None, typer.Option(help="Chunked processing (opt-in): embed inputs of up to this many tokens by window-sized chunks, averaged by token count, instead of refusing them [default: off]")] = None,
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads [default: the cores available]")] = None,
    batch_workers: Annotated[int | None, typer.Option(min=1, help="Batches run at once, each on --threads / N onnxruntime threads. Two single-thread batches at once outrun one batch on two threads under concurrent load; a lone request runs on its share only (1: lowest latency for one client) [default: 2 on a CPU with 2 or more threads, else 1]")] = None,
    spin: Annotated[bool, typer.Option(help="Let onnxruntime's threads spin between operators (helps one client's latency, costs throughput when the HTTP side needs the cores)")] = False,
    log_level: Annotated[str, typer.Option(help="critical | error | warning | info | debug")] = "info",
    json_output: Annotated[bool, typer.Option("--json-output", envvar=_env("JSON_OUTPUT"), help="Log one JSON object per line (a line per request: request_id, route, status, latency_ms, tokens)")] = False,
    cors_allow_origin: Annotated[list[str] | None, typer.Option("--cors-allow-origin", "--allowed-origins", envvar=_env("CORS_ALLOW_ORIGIN"), help="Browser origin allowed to call the API (repeat it, or comma-separate; '*' for any). Off by default: no CORS headers [default: none]")] = None,
    cors_allow_methods: Annotated[str, typer.Option("--cors-allow-methods", "--allowed-methods", envvar=_env("CORS_ALLOW_METHODS"), help="With --cors-allow-origin: allowed methods, comma-separated")] = "*",
    cors_allow_headers: Annotated[str, typer.Option("--cors-allow-headers", "--allowed-headers", envvar=_env("CORS_ALLOW_HEADERS"), help="With --cors-allow-origin: allowed request headers, comma-separated")] = "*",
    cors_allow_credentials: Annotated[bool, typer.Option("--cors-allow-credentials", "--allow-credentials", envvar=_env("CORS_ALLOW_CREDENTIALS"), help="With --cors-allow-origin: allow cookies and Authorization from the browser")] = False,
    ssl_keyfile: Annotated[str | None, typer.Option(envvar=_env("SSL_KEYFILE"), help="Serve HTTPS: the private key (PEM), with --ssl-certfile")] = None,
    ssl_certfile: Annotated[str | None, typer.Option(envvar=_env("SSL_CERTFILE"), help="Serve HTTPS: the certificate chain (PEM), with --ssl-keyfile")] = None,
    ssl_ca_certs: Annotated[str | None, typer.Option(envvar=_env("SSL_CA_CERTS"), help="With TLS: require client certificates signed by these CAs (PEM)")] = None,
    otlp_endpoint: Annotated[str | None, typer.Option("--otlp-endpoint", "--otlp-traces-endpoint", envvar=_env("OTLP_ENDPOINT"), help="Export a span per request (with tokenize / queue / inference / encode children) to this OTLP/HTTP receiver, e.g. http://localhost:4318; needs the [otel] extra")] = None,
    otlp_service_name: Annotated[str, typer.Option(envvar=_env("OTLP_SERVICE_NAME"), help="The service.name of the spans")] = "onnx-embed-toolkit",
    disable_spans: Annotated[bool, typer.Option("--disable-spans", envvar=_env("DISABLE_SPANS"), help="Leave trace and span ids out of JSON log lines")] = False,
    auto_truncate: Annotated[bool, typer.Option("--auto-truncate", envvar=_env("AUTO_TRUNCATE"), help="Cut inputs past the model's maximum to it unless the request says otherwise (TEI's truncate: false, Cohere's truncate: NONE), instead of a 400")] = False,
    default_prompt_name: Annotated[str | None, typer.Option(envvar=_env("DEFAULT_PROMPT_NAME"), help="The card's prompt (`toolkit cards`) applied to texts whose request names none")] = None,
    default_prompt: Annotated[str | None, typer.Option(envvar=_env("DEFAULT_PROMPT"), help="A prompt text applied to texts whose request names none")] = None,
    hf_overrides: Annotated[str | None, typer.Option(help="vLLM's Matryoshka switch, for a model trained for it whose card lists no sizes: '{\"is_matryoshka\": true}' accepts any `dimensions` 1..dim (cut, then normalized), '{\"matryoshka_dimensions\": [64, 128]}' only those; no other key [default: the card's sizes]")] = None,
    uds_path: Annotated[str | None, typer.Option("--uds-path", "--uds", envvar=_env("UDS_PATH"), help="Also listen on this Unix domain socket")] = None,
    prometheus_port: Annotated[int | None, typer.Option(envvar=_env("PROMETHEUS_PORT"), min=0, max=65535, help="Also serve /metrics on this port, without the API key (the API port's /metrics then needs the key)")] = None,
    batch_dir: Annotated[str | None, typer.Option(envvar="TOOLKIT_BATCH_DIR", help="Turn on OpenAI's Batch API (/v1/files, /v1/batches for /v1/embeddings, /v1/score, /v1/rerank and /v2/embed) with its files and batches kept in this directory: batches run in this process, queued behind online requests, and a restarted server resumes them; with --engine ray, a deployment of one replica holds them and the model replicas answer the lines [default: off: those paths answer 404]")] = None,
    batch_max_file_mb: Annotated[float, typer.Option(help="With --batch-dir: the largest file /v1/files takes, in MiB (OpenAI's: 200)")] = 200.0,
    batch_max_requests: Annotated[int, typer.Option(help="With --batch-dir: request lines per batch (OpenAI's: 50,000)")] = 50_000,
    batch_concurrency: Annotated[int, typer.Option(help="With --batch-dir: a batch's lines in flight at once; each waits for every online request in the batcher; more: more throughput where batching pays (GPUs), longer waits for online requests")] = 2,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", "--lora-modules", help="Serve this LoRA adapter as NAME=FILE (an .onnx_adapter file that `toolkit export BASE --adapter NAME=DIR` wrote for the same base; repeat it), beside the adapters the artifact carries; each is a served model name on every route (vLLM's --lora-modules name=path form) [default: the artifact's own]")] = None,
    allow_runtime_lora_updating: Annotated[bool, typer.Option("--allow-runtime-lora-updating", envvar="VLLM_ALLOW_RUNTIME_LORA_UPDATING", help="Serve vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter: adapter files loaded and dropped while the server runs (vLLM's environment variable turns it on too) [default: off: those paths are 404]")] = False,
    engine: Annotated[str, typer.Option(help="local: one process | ray: replicas behind Ray Serve's HTTP proxy, on a local Ray or a cluster (the [serve] extra)")] = "local",
    address: Annotated[str | None, typer.Option(help="--engine ray: join this Ray cluster (auto, ray://HOST:10001) [default: start a local Ray]")] = None,
    replicas: Annotated[int | None, typer.Option(help="--engine ray: a fixed number of replicas [default: 1]")] = None,
    min_replicas: Annotated[int | None, typer.Option(help="--engine ray: autoscale, from this many replicas (with --max-replicas)")] = None,
    max_replicas: Annotated[int | None, typer.Option(help="--engine ray: autoscale, up to this many replicas")] = None,
    target_ongoing_requests: Annotated[float, typer.Option(help="--engine ray, autoscaling: requests in flight per replica that Ray Serve aims at")] = 32.0,
    replica_cpus: Annotated[float, typer.Option(help="--engine ray: CPUs each replica reserves (and onnxruntime's threads, unless --threads)")] = 1.0,
    replica_gpus: Annotated[float, typer.Option(help="--engine ray: GPUs each replica reserves")] = 0.0,
    models_per_replica: Annotated[int | None, typer.Option(help="--engine ray: Ray Serve's model multiplexing: each replica opens the models its requests name, at most this many (the least recently used closed first); requests go to replicas that hold their model [default: every model on every replica]")] = None,
) -> None:
    """Serve models over OpenAI /v1/embeddings, Cohere /v2/embed and /v2/rerank, vLLM's and TEI's routes, /metrics."""
    from toolkit.settings import RuntimeOptions, ServerOptions

    with one_line_errors():
        dev = parse_device(device)
        if engine not in ("local", "ray"):
            raise ConfigError(f"--engine must be one of: local, ray (got {engine})")
        if engine == "ray":
            from toolkit.server.ray import ScaleOptions, require_ray_serve

            require_ray_serve()
            for flag, given in (("--uds-path", uds_path is not None), ("--prometheus-port", prometheus_port is not None),
                                ("--read-timeout", read_timeout != 10.0), ("--max-connections", max_connections != 1024)):
                if given:
                    raise ConfigError(f"{flag} is not available with --engine ray: Ray Serve's proxy owns the listener")
            scale = ScaleOptions(replicas=1 if replicas is None else replicas,  # ignored when autoscaling
                                 min_replicas=min_replicas, max_replicas=max_replicas,
                                 target_ongoing_requests=target_ongoing_requests, replica_cpus=replica_cpus,
                                 replica_gpus=replica_gpus, models_per_replica=models_per_replica)
            scale.check()
            if batch_dir is not None:  # the batch deployment opens it: a bad directory is one line here, first
                from toolkit.server.batch_store import BatchStore

                BatchStore(batch_dir)
            if allow_runtime_lora_updating:
                raise ConfigError("--allow-runtime-lora-updating goes with --engine local: a load would reach one "
                                  "replica")
        elif any(v is not None for v in (address, replicas, min_replicas, max_replicas, models_per_replica)):
            raise ConfigError("--address and the replica flags go with --engine ray")
        if batch_max_file_mb <= 0 or batch_max_requests < 1 or batch_concurrency < 1:
            raise ConfigError("--batch-max-file-mb, --batch-max-requests and --batch-concurrency must be positive")
        from toolkit.server.process import LOG_LEVELS

        if log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of: {', '.join(LOG_LEVELS)} (got {log_level})")
        from toolkit.server.process import bind_listener

        if auto_truncate and max_embed_len is not None:
            raise ConfigError("--auto-truncate and --max-embed-len both decide what happens to long inputs: give one")
        from toolkit.server.process import check_tls

        check_tls(ssl_keyfile, ssl_certfile, ssl_ca_certs)
        if otlp_endpoint:
            from toolkit.server.telemetry import check_otlp

            check_otlp(otlp_endpoint)
        if chat_template is not None:
            from toolkit.runtime.chat import load_template

            chat_template = load_template(chat_template)
        from toolkit.settings import parse_hf_overrides

        matryoshka = parse_hf_overrides(hf_overrides) if hf_overrides is not None else {}
        listener = bind_listener(host, port)  # a taken port fails here, before any export or banner
        if engine == "ray":
            listener.close()  # Ray Serve's proxy binds it
        export_options = export_options_for_sources(precision, target, revision, trust_remote_code)
        paths = [model if engine == "ray" and model and "://" in model else artifact_for(model, export_options)
                 for model in (models or [None])]  # a URI is read by each Ray node (server.remote_artifacts)
        server = ServerOptions(host=host, port=port, api_key=api_key or None,
                               max_concurrent_requests=max_concurrent_requests,
                               max_client_batch_size=max_client_batch_size, max_request_tokens=max_request_tokens,
                               payload_limit=payload_limit, read_timeout_s=read_timeout, max_connections=max_connections,
                               shutdown_grace_s=shutdown_grace, allow_request_chat_template=allow_request_chat_template,
                               chat_template=chat_template,
                               allow_priority_boost=allow_priority_boost, allow_image_urls=list(allow_image_url or []),
                               image_url_timeout_s=image_url_timeout, log_level=log_level.lower(),
                               json_output=json_output, cors_allow_origins=_origins(cors_allow_origin or []),
                               cors_allow_methods=tuple(_items(cors_allow_methods)), cors_allow_headers=tuple(_items(cors_allow_headers)),
                               cors_allow_credentials=cors_allow_credentials, ssl_keyfile=ssl_keyfile,
                               ssl_certfile=ssl_certfile, ssl_ca_certs=ssl_ca_certs, otlp_endpoint=otlp_endpoint,
                               otlp_service_name=otlp_service_name, disable_spans=disable_spans, uds_path=uds_path,
                               prometheus_port=prometheus_port, batch_dir=batch_dir,
                               batch_max_file_bytes=int(batch_max_file_mb * 1024 * 1024),
                               batch_max_requests=batch_max_requests, batch_concurrency=batch_concurrency,
                               allow_runtime_lora_updating=allow_runtime_lora_updating)
        if adapter and len(paths) != 1:
            raise ConfigError("--adapter names a LoRA adapter of one base model: serve one artifact with it")
        runtime = RuntimeOptions(device=dev, max_batch_tokens=max_batch_tokens, intra_op_threads=threads, spin=spin,
                                 batch_workers=batch_workers,  # None: the server's default for the device
                                 max_embed_len=max_embed_len, auto_truncate=auto_truncate,
                                 default_prompt_name=default_prompt_name, default_prompt=default_prompt,
                                 adapters=tuple(lora_module(text) for text in adapter or []), **matryoshka)
        if engine == "ray":
            from toolkit.server.ray import run_ray

            code = run_ray(paths, served_model_name or [], server, runtime, scale, address)
        else:
            from toolkit.server.process import run_server

            code = run_server(paths, served_model_name or [], server, runtime, listener)
    raise typer.Exit(code)


