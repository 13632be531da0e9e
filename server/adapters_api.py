"""vLLM's runtime LoRA updating: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

Registered only with ``--allow-runtime-lora-updating`` (or vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``), as
vLLM registers them; otherwise these paths are unknown (404). As in vLLM, success is 200 with a plain-text line;
an adapter name already served is a 400 unless ``load_inplace``; an unknown name to unload, or no adapter file at
``lora_path``, a 404. ``lora_path`` is an onnxruntime adapter file (``toolkit export BASE --adapter NAME=DIR``
writes one per adapter): the server runs without torch, so a PEFT folder needs that export first.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
from litestar import Request, post

from toolkit.errors import ConfigError, ObjectNotFoundError, RequestError

__all__ = ["ADAPTER_ROUTES", "LoadLoraAdapterRequest", "UnloadLoraAdapterRequest"]


class LoadLoraAdapterRequest(msgspec.Struct, kw_only=True):
    lora_name: str = ""
    lora_path: str = ""
    load_inplace: bool = False  # replace an adapter of the same name (vLLM's field)
    base_model_name: str | None = None  # which served base it adapts (needed only where several are served)


class UnloadLoraAdapterRequest(msgspec.Struct, kw_only=True):
    lora_name: str = ""
    lora_int_id: int | None = None  # vLLM's; adapters are named here, so it is accepted and not read


@post("/v1/load_lora_adapter", status_code=200, media_type="text/plain", tags=["vLLM"],
      summary="Load a LoRA adapter file as a served model name (vLLM's runtime LoRA updating)")
async def load_lora_adapter(request: Request, data: LoadLoraAdapterRequest) -> str:
    registry = request.app.state.registry
    if not data.lora_name or not data.lora_path:
        raise RequestError("Both 'lora_name' and 'lora_path' must be provided.")
    existing = registry.models.get(data.lora_name)
    if existing is not None and existing.parent is None:
        raise RequestError(f"'{data.lora_name}' is a base model's name; an adapter needs a name of its own",
                           param="lora_name")
    if existing is not None and not data.load_inplace:
        raise RequestError(f"The lora adapter '{data.lora_name}' has already been loaded. If you want to load the "
                           "adapter in place, set 'load_inplace' to True.", param="lora_name")
    base = registry.base(data.base_model_name if existing is None else existing.parent)
    path = Path(data.lora_path).expanduser()
    if not path.is_file():
        raise ObjectNotFoundError(f"No adapter found at {data.lora_path}: give an .onnx_adapter file (toolkit export "
                                  "BASE --adapter NAME=DIR writes one per adapter)", param="lora_path")
    try:
        loaded = await asyncio.to_thread(base.embedder.context.session.load_adapter, data.lora_name, path)
    except ConfigError as exc:  # a file that is no adapter, or one for another base: the caller's to fix
        raise RequestError(exc.message, param="lora_path") from None
    registry.add_adapter(base, loaded)
    return f"Success: LoRA adapter '{data.lora_name}' added successfully."


@post("/v1/unload_lora_adapter", status_code=200, media_type="text/plain", tags=["vLLM"],
      summary="Stop serving a LoRA adapter (vLLM's runtime LoRA updating)")
async def unload_lora_adapter(request: Request, data: UnloadLoraAdapterRequest) -> str:
    if not data.lora_name:
        raise RequestError("'lora_name' must be provided.", param="lora_name")
    registry = request.app.state.registry
    served = registry.models.get(data.lora_name)
    if served is None or served.parent is None:
        raise ObjectNotFoundError(f"The lora adapter '{data.lora_name}' cannot be found.", param="lora_name")
    registry.remove_adapter(data.lora_name)
    return f"Success: LoRA adapter '{data.lora_name}' removed successfully."


ADAPTER_ROUTES = [load_lora_adapter, unload_lora_adapter]
