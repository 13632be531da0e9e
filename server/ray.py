"""Ray Serve: the same Litestar app as the ingress of a replicated, autoscaled deployment.

Each replica builds the app ``toolkit serve`` builds in one process (``load_models`` + ``create_app``: every
route, dialect, API key, limit, CORS, JSON logs, OTLP) and Ray Serve's HTTP proxy spreads requests over the
replicas. Three ways in:

- ``toolkit serve MODEL... --engine ray [--replicas N | --min-replicas A --max-replicas B]``;
- ``serve run toolkit.server.ray:app models=a.onnx,b.onnx replicas=2`` (``app`` is Ray Serve's app builder);
- a KubeRay ``RayService`` whose ``import_path`` is ``toolkit.server.ray:app`` (``deploy/rayservice.yaml``).

Overload stays a fast answer: each replica keeps its own admission bound (429 past
``max_concurrent_requests``), Ray Serve's ``max_ongoing_requests`` is that bound, so the proxy never queues in
front of a replica that would still admit, and ``max_queued_requests`` bounds the proxy's own queue (past it
Ray answers 503 at once). Ray Serve calls ``check_health`` every few seconds: it runs the app's ``/ready``
probe, so a replica whose inference worker died is replaced.

Nothing here imports torch: a replica needs onnxruntime, tokenizers, numpy, litestar and ``ray[serve]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from toolkit.errors import ConfigError
from toolkit.server.remote_artifacts import is_uri, local_path
from toolkit.settings import Device, RuntimeOptions, ServerOptions

__all__ = ["ScaleOptions", "app", "build_app", "parse_args", "require_ray_serve", "run_ray"]

DEPLOYMENT = "toolkit"


class ScaleOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How many replicas, of what size. ``replicas`` fixes the count; ``min_replicas`` / ``max_replicas`` (with
    ``target_ongoing_requests`` per replica) autoscale instead, as Ray Serve's ``autoscaling_config``."""

    replicas: int | None = 1  # with min_replicas / max_replicas: only 1 (the default) or None, and unused
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 32.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0  # the window Ray Serve averages ongoing requests over
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_queued_requests: int | None = None  # the proxy's queue when every replica is full [default: the admission bound]
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    models_per_replica: int | None = None  # several models: each replica holds at most this many (LRU closed)

    def autoscaling(self) -> dict[str, Any] | None:
        if self.min_replicas is None and self.max_replicas is None:
            return None
        low = 1 if self.min_replicas is None else self.min_replicas
        high = max(low, 1) if self.max_replicas is None else self.max_replicas
        return {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s}

    def check(self) -> None:
        """ConfigError for counts and sizes that cannot be deployed."""
        autoscaling = self.min_replicas is not None or self.max_replicas is not None
        if autoscaling and self.replicas not in (None, 1):
            raise ConfigError("--replicas fixes the count; --min-replicas / --max-replicas autoscale: give one form")
        if not autoscaling and (self.replicas is None or self.replicas < 1):
            raise ConfigError(f"--replicas must be at least 1 (got {self.replicas})")
        low, high = self.min_replicas or 0, self.max_replicas
        if self.min_replicas is not None and self.min_replicas < 0:
            raise ConfigError(f"--min-replicas must be 0 or more (got {self.min_replicas})")
        if high is not None and (high < 1 or high < low):
            raise ConfigError(f"--max-replicas must be at least 1 and at least --min-replicas (got {high}, min {low})")
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"--target-ongoing-requests must be above 0 (got {self.target_ongoing_requests})")
        if self.models_per_replica is not None and self.models_per_replica < 1:
            raise ConfigError(f"--models-per-replica must be at least 1 (got {self.models_per_replica})")
        if self.replica_cpus <= 0 or self.replica_gpus < 0:
            raise ConfigError(f"--replica-cpus must be above 0 and --replica-gpus 0 or more (got {self.replica_cpus}, "
                              f"{self.replica_gpus})")


def require_ray_serve() -> None:
    """ConfigError (one line, exit 2) when Ray Serve is not installed."""
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise ConfigError("--engine ray needs Ray Serve: pip install 'onnx-embed-toolkit[serve]'") from None


class _Replica:
    """One replica: the models opened, the Litestar app built over them (as ``run_server`` does), ``/ready`` as
    Ray Serve's health check. Wrapped by ``serve.ingress()`` in ``build_app``."""

    def __init__(self, paths: list[str], names: list[str], server: ServerOptions, runtime: RuntimeOptions,
                 batches=None) -> None:
        from toolkit.server.app import create_logged_app, load_models
        from toolkit.server.metrics import Metrics
        from toolkit.server.telemetry import configure_logging

        configure_logging(server.log_level, server.json_output, spans=not server.disable_spans)
        metrics = Metrics()
        registry = load_models([local_path(p) for p in paths], names, runtime, metrics)
        # ``batches``: the batch deployment's handle (--batch-dir): the Batch API's requests go there
        self._app = create_logged_app(registry, server, metrics, batch_forward=batches)

    async def batch_line(self, endpoint: str, body: bytes, headers: list) -> tuple[int, dict, bytes]:
        """A batch line from the batch deployment, answered by this replica's route, in its batch lane."""
        from toolkit.server.ray_batches import answer_line

        return await answer_line(self._app, endpoint, body, headers)

    def __serve_build_asgi_app__(self):  # Ray Serve: the ASGI app of this replica, after __init__
        return self._app

    async def check_health(self) -> None:
        """Ray Serve's health check: the app's readiness probe (a dead inference worker, or a probe inference that
        fails or stalls)."""
        from toolkit.server.app import check_ready

        await check_ready(self._app)


def replica_runtime(runtime: RuntimeOptions, scale: ScaleOptions) -> RuntimeOptions:
    """``runtime`` as a replica runs it: onnxruntime's threads default to the replica's CPUs, and its batch workers
    (None) to `toolkit serve`'s choice on those threads and the replica's device (a GPU when it reserves one)."""
    if runtime.intra_op_threads is None:
        runtime = msgspec.structs.replace(runtime, intra_op_threads=max(1, int(scale.replica_cpus)))
    if runtime.batch_workers is None:
        from toolkit.runtime.session import default_batch_workers

        device = runtime.device
        if device == Device.AUTO:
            device = Device.CUDA if scale.replica_gpus > 0 else Device.CPU
        runtime = msgspec.structs.replace(runtime,
                                          batch_workers=default_batch_workers(device, runtime.intra_op_threads))
    return runtime


def build_app(paths: list[str | Path], names: list[str], server: ServerOptions, runtime: RuntimeOptions,
              scale: ScaleOptions):
    """The Ray Serve application: ``serve.run(build_app(...))`` deploys it.

    ``paths``: artifact paths every node can read (one machine, or a filesystem every node mounts), or URIs
    pyarrow reads (``s3://``, ``gs://``, ``hdfs://``, ``file://``), copied once per node into its cache.
    ``runtime.intra_op_threads`` defaults to the replica's CPUs (Ray pins no cores: onnxruntime would otherwise
    start a thread per core of the node in every replica).
    """
    from ray import serve

    scale.check()
    runtime = replica_runtime(runtime, scale)
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": scale.replica_cpus, "num_gpus": scale.replica_gpus},
        "max_ongoing_requests": server.max_concurrent_requests,
        "max_queued_requests": scale.max_queued_requests or server.max_concurrent_requests,
        "health_check_period_s": scale.health_check_period_s,
        "health_check_timeout_s": scale.health_check_timeout_s,
        "graceful_shutdown_timeout_s": float(server.shutdown_grace_s),
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    autoscaling = scale.autoscaling()
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = scale.replicas
    if scale.models_per_replica is not None:
        if server.batch_dir:
            raise ConfigError("--batch-dir does not go with --models-per-replica yet: serve the models of a batch "
                              "on every replica")
        from toolkit.server.ray_multiplex import build_multiplexed

        return build_multiplexed(_named(paths, names), server, runtime, options, scale.models_per_replica)
    batches = None
    if server.batch_dir:  # one deployment holds the files and batches; the lines come back to the replicas
        from toolkit.server.ray_batches import BATCH_DEPLOYMENT, BatchApi

        batches = serve.deployment(name=BATCH_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
                                   max_ongoing_requests=server.max_concurrent_requests,
                                   health_check_period_s=scale.health_check_period_s)(BatchApi).bind(server,
                                                                                                      DEPLOYMENT)
    replica = serve.deployment(**options)(serve.ingress()(_Replica))
    return replica.bind([str(p) for p in paths], list(names), server, runtime, batches)


def _named(paths: list[Path], names: list[str]) -> dict[str, str]:
    """{served name: path}: the names given, else each card's name, read from the artifact without opening it."""
    from toolkit.manifest import MANIFEST_KEY, decode_manifest
    from toolkit.runtime.artifact import read_metadata

    if names and len(names) != len(paths):
        raise ConfigError(f"--served-model-name given {len(names)} times for {len(paths)} artifacts: give one per artifact")
    named: dict[str, str] = {}
    for i, path in enumerate(paths):
        meta = read_metadata(local_path(str(path))) if not names else {}
        if not names and MANIFEST_KEY not in meta:
            raise ConfigError(f"{path}: not a toolkit artifact (no manifest); create one with `toolkit export`")
        name = names[i] if names else decode_manifest(meta[MANIFEST_KEY], source=str(path)).card.name
        if name in named:
            raise ConfigError(f"two artifacts are served as '{name}': set --served-model-name")
        named[name] = str(path)
    return named


_ARGS = {  # serve run's key=value arguments: (where it goes, how to read it)
    "models": ("paths", str), "served_model_name": ("names", str), "api_key": ("server", str),
    "max_concurrent_requests": ("server", int), "max_client_batch_size": ("server", int),
    "max_request_tokens": ("server", int), "payload_limit": ("server", int), "log_level": ("server", str),
    "json_output": ("server", "bool"), "shutdown_grace_s": ("server", int), "otlp_endpoint": ("server", str),
    "max_batch_tokens": ("runtime", int), "intra_op_threads": ("runtime", int), "batch_workers": ("runtime", int), "auto_truncate": ("runtime", "bool"),
    "replicas": ("scale", int), "min_replicas": ("scale", int), "max_replicas": ("scale", int),
    "target_ongoing_requests": ("scale", float), "replica_cpus": ("scale", float), "replica_gpus": ("scale", float),
    "upscale_delay_s": ("scale", float), "downscale_delay_s": ("scale", float),
    "models_per_replica": ("scale", int), "batch_dir": ("server", str),
}


def _read(name: str, kind, value: str):
    if kind == "bool":
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{name}={value!r} is not one of: true, false")
        return value.lower() in ("true", "1")
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a {kind.__name__}") from None


def parse_args(args: dict[str, Any], *, check_files: bool = True) -> tuple:
    """``app``'s arguments read and checked: (paths, names, ServerOptions, RuntimeOptions, ScaleOptions)."""
    unknown = sorted(set(args) - set(_ARGS))
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}: valid ones are {', '.join(sorted(_ARGS))}")
    if not args.get("models"):
        raise ConfigError("models=PATH[,PATH...] is required: the artifacts (.onnx) to serve")
    fields: dict[str, dict[str, Any]] = {"server": {}, "runtime": {}, "scale": {}}
    paths = [p.strip() for p in str(args["models"]).split(",") if p.strip()]
    names = [n.strip() for n in str(args.get("served_model_name", "")).split(",") if n.strip()]
    fields["runtime"]["batch_workers"] = None  # unless given: chosen for the replica's device and threads
    for key, raw in args.items():
        where, kind = _ARGS[key]
        if where in fields:
            fields[where][key] = _read(key, kind, str(raw))
    if fields["runtime"]["batch_workers"] is not None and fields["runtime"]["batch_workers"] < 1:
        raise ConfigError(f"batch_workers={fields['runtime']['batch_workers']} is not 1 or more")
    missing = [p for p in paths if not is_uri(p) and not Path(p).is_file()]
    if check_files and missing:
        raise ConfigError(f"no such artifact file: {', '.join(missing)}")
    scale = ScaleOptions(**fields["scale"])
    scale.check()
    return paths, names, ServerOptions(**fields["server"]), RuntimeOptions(**fields["runtime"]), scale


def app(args: dict[str, Any]):
    """Ray Serve's app builder: ``serve run toolkit.server.ray:app models=a.onnx,b.onnx replicas=2 api_key=KEY``
    (or a RayService's ``import_path`` with ``args``). ``models`` and ``served_model_name`` are comma lists;
    the other keys are ``toolkit serve``'s options with ``_`` for ``-`` (``replicas``, ``min_replicas``,
    ``max_replicas``, ``target_ongoing_requests``, ``replica_cpus``, ``models_per_replica``, ...). Models are
    artifact paths every node can read."""
    return build_app(*parse_args(args))


def run_ray(paths: list[str | Path], names: list[str], server: ServerOptions, runtime: RuntimeOptions,
            scale: ScaleOptions, address: str | None = None) -> int:
    """``toolkit serve --engine ray``: start a local Ray (or join ``address``: ``auto``, ``ray://host:10001``),
    deploy behind Ray Serve's proxy on ``server.host:port``, serve until SIGINT / SIGTERM, then take the
    deployment down (in-flight requests get ``shutdown_grace_s``) and stop what this process started."""
    import logging
    import signal
    import threading

    import ray
    from ray import serve

    from toolkit.server.telemetry import configure_logging

    configure_logging(server.log_level, server.json_output, spans=not server.disable_spans)
    log = logging.getLogger("toolkit.server")
    logging.getLogger("ray.serve").setLevel(server.log_level.upper())  # Ray Serve's own lines, at the same level
    application = build_app(paths, names, server, runtime, scale)  # checks the options before Ray starts
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": server.host, "port": server.port, "ssl_keyfile": server.ssl_keyfile,
                                  "ssl_certfile": server.ssl_certfile, "ssl_ca_certs": server.ssl_ca_certs})
        serve.run(application, name=DEPLOYMENT, route_prefix="/")
        replicas = scale.autoscaling() or {"replicas": scale.replicas}
        scheme = "https" if server.ssl_certfile else "http"
        log.info("serving %s on Ray Serve (%s) at %s://%s:%d", ", ".join(Path(str(p)).name for p in paths),
                 ", ".join(f"{k}={v}" for k, v in replicas.items()), scheme, server.host, server.port)
        while not stop.wait(1.0):
            pass
        log.info("stopping: draining the deployment (up to %d s)", server.shutdown_grace_s)
    finally:
        try:
            if address is None:
                serve.shutdown()
            else:
                serve.delete(DEPLOYMENT)  # a cluster we joined keeps its other applications
        finally:
            ray.shutdown()
    return 0
