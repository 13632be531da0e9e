"""onnxruntime sessions: execution-provider choice, options, IO binding.

onnxruntime's exceptions are translated into BackendError here and nowhere else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from toolkit.errors import BackendError, ConfigError, RequestError
from toolkit.settings import Device, RuntimeOptions, default_threads, parse_device

__all__ = ["LoadedAdapter", "OrtSession", "default_batch_workers", "refuse_adapter", "usable_devices"]

_PROVIDERS = {
    Device.TENSORRT: "TensorrtExecutionProvider",
    Device.CUDA: "CUDAExecutionProvider",
    Device.CPU: "CPUExecutionProvider",
}
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _loadable(*names: str) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            found = ctypes.util.find_library(name.removeprefix("lib").split(".so")[0])
            if found:
                return True
    return False


def usable_devices() -> list[Device]:
    """Devices whose provider is built in AND whose driver libraries load.

    onnxruntime-gpu lists the CUDA and TensorRT providers even on machines
    without a GPU, so the listing alone is not enough.
    """
    built = set(ort.get_available_providers())
    devices = [Device.CPU]
    if sys.platform.startswith("linux") or sys.platform == "win32":
        driver = _loadable("libcuda.so.1", "nvcuda.dll")
        if driver and _PROVIDERS[Device.CUDA] in built:
            devices.insert(0, Device.CUDA)
            if _PROVIDERS[Device.TENSORRT] in built and _loadable("libnvinfer.so.10", "libnvinfer.so"):
                devices.insert(0, Device.TENSORRT)
    return devices


def default_batch_workers(device: Device, threads: int | None) -> int:
    """Batches a server runs at once by default: 2 on a CPU with 2 or more threads (each batch on half of them),
    else 1. Measured on 2 cores (all-MiniLM-L6-v2, benchmarks/README.md): two single-thread batches at once outrun
    one batch on two threads by 26-40% from 2 concurrent clients up; one client alone waits about 1.3 ms more."""
    resolved = usable_devices()[0] if device == Device.AUTO else device
    return 2 if resolved == Device.CPU and (threads or default_threads()) >= 2 else 1


@dataclass(frozen=True, eq=False)
class LoadedAdapter:
    """A LoRA adapter file opened against one session: the shapes of the graph's LoRA slots it fills, and the run
    options that activate it (onnxruntime's ``LoraAdapter``, which holds its parameters once)."""

    name: str
    path: Path
    shapes: dict[str, tuple[int, ...]]
    run_options: ort.RunOptions
    handle: ort.LoraAdapter  # kept alive here: the run options hold only a pointer to it

    @property
    def size(self) -> int:
        """Its own numbers (the base model's are shared)."""
        return sum(int(np.prod(shape)) for shape in self.shapes.values())


def refuse_adapter(adapter: LoadedAdapter | None, graph: str) -> None:
    """A graph without LoRA slots takes no adapter (RequestError)."""
    if adapter is not None:
        raise RequestError(f"adapter '{adapter.name}' applies to the text graph; the {graph} has no LoRA slots",
                           param="adapter")


class OrtSession:
    """One inference session on one device; ``run`` returns only the asked-for outputs."""

    def __init__(self, path: str | Path, options: RuntimeOptions | None = None) -> None:
        self.options = options = options or RuntimeOptions()
        usable = usable_devices()
        requested = parse_device(options.device)
        if requested == Device.AUTO:
            self.device = usable[0]
        elif requested in usable:
            self.device = requested
        else:
            raise ConfigError(
                f"device '{requested.value}' is not available here; available: "
                f"{', '.join(d.value for d in usable)}"
            )
        providers = [_PROVIDERS[d] for d in usable[usable.index(self.device):]]
        so = ort.SessionOptions()
        # each of the batch workers' runs on its share of the threads (onnxruntime's pool is the session's)
        self.threads = max(1, (options.intra_op_threads or default_threads()) // (options.batch_workers or 1))
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            so.graph_optimization_level = _LEVELS[options.graph_optimization]
        except KeyError:
            raise ConfigError(
                f"graph_optimization '{options.graph_optimization}' is not one of: {', '.join(_LEVELS)}"
            ) from None
        so.enable_cpu_mem_arena = options.enable_mem_arena
        so.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's one boundary at load
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{path}: cannot load as an ONNX model: {first}") from None
        active = self._session.get_providers()
        if requested != Device.AUTO and active[0] != _PROVIDERS[self.device]:
            raise ConfigError(f"device '{requested.value}' failed to start; onnxruntime fell back to {active[0]}")
        self.device = next(d for d, p in _PROVIDERS.items() if p == active[0])
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        use_binding = options.io_binding if options.io_binding is not None else self.device != Device.CPU
        self._binding = use_binding

    @property
    def providers(self) -> list[str]:
        """onnxruntime's execution providers for this session, the one it runs on first."""
        return self._session.get_providers()

    def output_shape(self, name: str) -> list[int | str | None]:
        """The graph's declared shape of output ``name`` (a symbolic axis as its name)."""
        return next(list(o.shape) for o in self._session.get_outputs() if o.name == name)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._session.get_modelmeta().custom_metadata_map)

    def load_adapter(self, name: str, path: str | Path) -> LoadedAdapter:
        """The onnxruntime adapter file ``path`` as ``name``, checked against this graph's LoRA slots (its
        overridable initializers): ConfigError when it is not one or does not fit (another base, another shape)."""
        path = Path(path)
        slots = {arg.name: arg for arg in self._session.get_overridable_initializers()}
        if not slots:
            raise ConfigError(f"adapter '{name}': {path.name} needs an artifact exported with LoRA slots "
                              "(toolkit export BASE --adapter NAME=DIR); this one has none")
        try:  # the parameters' shapes and types only: their values stay in onnxruntime's LoraAdapter
            parameters = {key: (tuple(value.shape()), value.data_type()) for key, value in
                          ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}
            lora = ort.LoraAdapter()
            lora.Load(str(path))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's boundary for adapter files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"adapter '{name}': {path} is not an onnxruntime adapter file: {first}") from None
        for key, (shape, kind) in parameters.items():
            slot = slots.get(key)
            if slot is None:
                raise ConfigError(f"adapter '{name}': its parameter {key} is no LoRA slot of this artifact "
                                  "(an adapter exported from another base model?)")
            fixed = [(axis, dim) for axis, dim in enumerate(slot.shape) if isinstance(dim, int)]
            if len(shape) != len(slot.shape) or any(shape[axis] != dim for axis, dim in fixed) or slot.type != kind:
                raise ConfigError(f"adapter '{name}': {key} is {kind}{list(shape)}; this artifact's slot takes "
                                  f"{slot.type}{slot.shape}")
        if not parameters:
            raise ConfigError(f"adapter '{name}': {path} holds no parameters")
        options = ort.RunOptions()
        options.add_active_adapter(lora)
        return LoadedAdapter(name, path, {key: shape for key, (shape, _) in parameters.items()}, options, lora)

    def run(self, outputs: Sequence[str], feeds: Mapping[str, np.ndarray],
            adapter: LoadedAdapter | None = None) -> list[np.ndarray]:
        """Run one batch (with ``adapter``'s LoRA parameters active); raise BackendError on any onnxruntime
        failure."""
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        try:
            # onnxruntime applies no active adapter to a bound run, nor binds its slots (overridable initializers)
            # as inputs: a run with an adapter is a plain run (its inputs copied to the device as needed)
            if not self._binding or adapter is not None:
                return self._session.run(list(outputs), feeds, adapter.run_options if adapter else None)
            binding = self._session.io_binding()
            device = "cuda" if self.device != Device.CPU else "cpu"
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            for name in outputs:  # only these cross back to the host
                binding.bind_output(name, device)
            self._session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        except Exception as exc:  # noqa: BLE001 - onnxruntime's one boundary at run time
            raise BackendError(f"inference failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
