"""onnxruntime sessions: execution-provider choice, options, IO binding.

onnxruntime's exceptions are translated into BackendError here and nowhere else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from toolkit.errors import BackendError, ConfigError
from toolkit.settings import Device, RuntimeOptions, default_threads, parse_device

__all__ = ["OrtSession", "usable_devices"]

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
        so.intra_op_num_threads = options.intra_op_threads or default_threads()
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

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._session.get_modelmeta().custom_metadata_map)

    def run(self, outputs: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; raise BackendError on any onnxruntime failure."""
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        try:
            if not self._binding:
                return self._session.run(list(outputs), feeds)
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
