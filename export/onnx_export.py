"""Step 2b and 6: torch -> ONNX with the dynamo exporter, and writing the one-file artifact."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from toolkit.cards import PaddingSide
from toolkit.errors import ExportError
from toolkit.export.graph import EmbeddingModule, output_names
from toolkit.export.resolve import ResolvedModel
from toolkit.manifest import MANIFEST_KEY, MODEL_CARD_KEY, TOKENIZER_KEY, Manifest, encode_manifest

__all__ = ["export_graph", "torch_onnx_boundary", "write_artifact"]

_TWO_GB = 2**31 - 1


def _example_inputs(resolved: ResolvedModel, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """A padded (2, 8) batch: dynamic axes must not specialize on 1 or on equal lengths."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(vocab_size, 1000), (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.int64)
    if resolved.card.padding_side == PaddingSide.LEFT:
        mask[1, :3] = 0
    else:
        mask[1, 5:] = 0
    inputs = [ids, mask] if "attention_mask" in resolved.arch.inputs else [ids]
    if resolved.arch.token_type_ids:
        inputs.append(torch.zeros(2, 8, dtype=torch.int64))
    return tuple(inputs)


@contextlib.contextmanager
def torch_onnx_boundary(what: str) -> Iterator[None]:
    """torch.onnx's one boundary: its logger and warnings quiet, no autograd, and any failure inside an
    ExportError naming ``what``."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - torch.onnx raises anything
            raise ExportError(f"torch.onnx.export {what} failed: {type(exc).__name__}: {str(exc)[:500]}") from None


def export_graph(module: EmbeddingModule, resolved: ResolvedModel, *, opset: int, path: Path,
                 exporter: str = "dynamo") -> Path:
    """Export ``module`` with dynamic (batch, sequence) axes; returns ``path``.

    ``exporter``: "dynamo" (torch.export, the default) or "legacy" (the
    TorchScript exporter, whose graphs onnxruntime's transformer fusions match;
    the pipeline times both). Inputs are passed positionally: ``input_names``
    renames graph inputs by position, and keyword inputs would come out in
    dict order, silently swapping attention_mask and token_type_ids.
    """
    inputs = _example_inputs(resolved, int(resolved.config.get("vocab_size", 1000)))
    names = list(resolved.arch.inputs)
    outputs = output_names(resolved)
    with torch_onnx_boundary(f"({exporter})"):
        if exporter == "legacy":
            axes = {name: {0: "batch", 1: "sequence"} for name in names}
            torch.onnx.export(module, inputs, str(path), input_names=names, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, verbose=False)
            return path
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic = {name: {0: batch, 1: seq} for name in names}
        program = torch.onnx.export(module, inputs, input_names=names, output_names=outputs, dynamic_shapes=dynamic,
                                    dynamo=True, opset_version=opset, verbose=False, external_data=True)
        program.save(str(path), external_data=True)
    return path


def _size(model: onnx.ModelProto) -> int:
    """The model's serialized size, counted tensor by tensor: protobuf cannot measure (or write) a message past
    2 GB, which is exactly the case this tells apart (measured: a 2.6 GB vision tower raised EncodeError)."""
    parts = (*model.graph.initializer, *model.graph.node, *model.metadata_props, *model.graph.value_info)
    return sum(part.ByteSize() for part in parts) + 2**20  # inputs, outputs, opsets: well under 1 MiB


def write_artifact(graph_path: Path, out: Path, manifest: Manifest, tokenizer: str, model_card: str, *,
                   self_contained: bool = True) -> Path:
    """ONE file: graph + weights + manifest + tokenizer; external data only past 2 GB.

    ``self_contained=False`` (the export's own candidate, beside ``graph_path``): weights that the graph keeps in
    external data stay in those files, so writing it holds no copy of them."""
    if not self_contained and out.parent.resolve() != graph_path.parent.resolve():
        raise ValueError("a candidate that shares external data must be written beside its graph")
    model = onnx.load(str(graph_path), load_external_data=self_contained)
    del model.metadata_props[:]
    for key, value in ((MANIFEST_KEY, encode_manifest(manifest)), (TOKENIZER_KEY, tokenizer), (MODEL_CARD_KEY, model_card)):
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "onnx-embed-toolkit"
    out.parent.mkdir(parents=True, exist_ok=True)
    large = self_contained and _size(model) > _TWO_GB
    onnx.save_model(model, str(out), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=out.name + ".data" if large else None)
    return out
