"""LoRA adapters (PEFT) on one base artifact: slots in the graph, one onnxruntime adapter file per adapter.

The base graph carries, for every Linear that some adapter adapts, a LoRA *slot*: ``y = W x + b + (x A) B`` with
``A`` (in, r) and ``B`` (r, out) as overridable initializers (graph inputs with a default), rank ``r`` a symbolic
dimension. Their defaults are zeros of rank 1, so the base answers as the base model. An adapter is a file of
those parameters (``onnxruntime.AdapterFormat``): ``A = lora_A.weight.T`` and ``B = lora_B.weight.T * scaling``,
for the modules it adapts; onnxruntime activates one per run (``RunOptions.add_active_adapter``) without a second
copy of the base weights. PEFT itself reads the adapters (its own rules: ``rank_pattern``, ``alpha_pattern``,
rsLoRA scaling) and is the reference each adapter's parity is checked against.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit.errors import ConfigError, ExportError, ParityError
from toolkit.settings import split_named

__all__ = ["LoraSlot", "PeftAdapters", "expose_slots", "insert_slots", "parse_adapter", "write_adapter_file"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SLOT_A, SLOT_B = "lora_a", "lora_b"


def parse_adapter(text: str) -> tuple[str, Path]:
    """``NAME=DIR`` (``--adapter``; vLLM's ``--lora-modules`` form) as (name, folder); ConfigError saying the form."""
    name, folder = split_named(text, "--adapter", "DIR (a PEFT LoRA adapter folder), e.g. support=./lora-support")
    if not _NAME.match(name):
        raise ConfigError(f"--adapter {text!r}: the name must be 1-64 letters, digits, '.', '_' or '-', starting "
                          "with a letter or digit (it becomes a served model name)")
    return name, Path(folder).expanduser()


def read_lora_config(folder: Path) -> dict:
    """The adapter's ``adapter_config.json``, refused where the graph's slots cannot express it."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON: {exc}") from None
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise ConfigError(f"{folder}: a {kind or 'unknown'} adapter; only LoRA adapters (peft_type LORA) are served")
    unsupported = {"use_dora": "DoRA", "modules_to_save": "modules_to_save (whole modules trained beside the LoRA)",
                   "lora_bias": "lora_bias", "layer_replication": "layer_replication"}
    found = [label for key, label in unsupported.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        found.append(f"bias={config['bias']!r}")
    if found:
        raise ConfigError(f"{folder}: {', '.join(found)} cannot be served as a LoRA slot; "
                          "supported: plain LoRA on Linear and Embedding layers (any r, alpha, rank/alpha patterns, "
                          "rsLoRA)")
    return config


class LoraSlot(nn.Module):
    """A Linear with a LoRA slot: ``base_layer(x) + (x @ lora_a) @ lora_b``. The slot's values only mark it at
    export (each slot its own constant, so the exporter cannot merge two equal tensors into one initializer);
    ``expose_slots`` gives the graph zeros as defaults."""

    def __init__(self, base_layer: nn.Linear, mark: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_a = nn.Parameter(torch.full((base_layer.in_features, 1), float(mark)), requires_grad=False)
        self.lora_b = nn.Parameter(torch.full((1, base_layer.out_features), float(mark)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + torch.matmul(torch.matmul(x, self.lora_a), self.lora_b)


class EmbeddingSlot(nn.Module):
    """An Embedding with a LoRA slot: ``base_layer(ids) + lora_a[ids] @ lora_b`` (PEFT's Embedding LoRA: lora_a
    (vocab, r) the rows of ``lora_embedding_A.T``, lora_b (r, dim) ``lora_embedding_B.T * scaling``)."""

    def __init__(self, base_layer: nn.Embedding, mark: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_a = nn.Parameter(torch.full((base_layer.num_embeddings, 1), float(mark)), requires_grad=False)
        self.lora_b = nn.Parameter(torch.full((1, base_layer.embedding_dim), float(mark)), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base_layer(ids) + torch.matmul(nn.functional.embedding(ids, self.lora_a), self.lora_b)


@dataclass(frozen=True)
class Slot:
    module: str  # the Linear's name in the exported module (its graph parameters: module + ".lora_a" / ".lora_b")
    in_features: int
    out_features: int

    @property
    def a(self) -> str:
        return f"{self.module}.{SLOT_A}"

    @property
    def b(self) -> str:
        return f"{self.module}.{SLOT_B}"


def _hf_model(module: nn.Module) -> tuple[str, nn.Module]:
    """(its prefix in ``module``, the transformers model) that PEFT adapters name their modules in."""
    from transformers import PreTrainedModel

    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return (name + "." if name else ""), sub
    raise ExportError("no transformers model inside the exported module to apply the adapters to")


@dataclass
class PeftAdapters:
    """The adapters as PEFT loads them onto the (exported) module's transformers model; their weights by slot."""

    names: list[str]
    configs: dict[str, dict]
    weights: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  # adapter -> module -> (A (in, r), B (r, out))
    peft_model: nn.Module
    peft_names: dict[str, str]  # our name -> PEFT's (a module name: no ".", which ours may hold: "retrieval.query")

    @classmethod
    def load(cls, module: nn.Module, adapters: list[tuple[str, Path]]) -> PeftAdapters:
        """Inject every adapter into ``module`` (in place, PEFT's own layers), none of them active yet."""
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        prefix, model = _hf_model(module)
        configs = {name: read_lora_config(folder) for name, folder in adapters}
        peft_names = {name: f"adapter_{k}" for k, (name, _) in enumerate(adapters)}
        peft_model = None
        for name, folder in adapters:
            try:
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=peft_names[name],
                                                           is_trainable=False)
                else:
                    peft_model.load_adapter(str(folder), adapter_name=peft_names[name], is_trainable=False)
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                raise ConfigError(f"adapter '{name}' ({folder}) does not fit this model: {str(exc)[:300]}") from None
        weights: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {name: {} for name in configs}
        for path, layer in peft_model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            target = prefix + path.removeprefix("base_model.model.")
            for name in configs:
                key = peft_names[name]
                if key not in layer.lora_A and key not in getattr(layer, "lora_embedding_A", {}):
                    continue
                base = layer.get_base_layer()
                if isinstance(base, nn.Embedding) and key in layer.lora_embedding_A:
                    a = layer.lora_embedding_A[key].detach().float().T.numpy()  # (vocab, r)
                    b = (layer.lora_embedding_B[key].detach().float().T * float(layer.scaling[key])).numpy()
                elif isinstance(base, nn.Linear):
                    a = layer.lora_A[key].weight.detach().float().T.numpy()
                    b = (layer.lora_B[key].weight.detach().float().T * float(layer.scaling[key])).numpy()
                else:
                    raise ConfigError(f"adapter '{name}': {target} is a {type(base).__name__}; "
                                      "only LoRA on Linear and Embedding layers is served")
                weights[name][target] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
        empty = [name for name, found in weights.items() if not found]
        if empty:
            raise ConfigError(f"adapter(s) {', '.join(empty)} adapt no Linear or Embedding layer of this model")
        peft_model.eval()
        return cls([name for name, _ in adapters], configs, weights, peft_model, peft_names)

    def activate(self, name: str) -> None:
        self.peft_model.set_adapter(self.peft_names[name])
        self.peft_model.eval()

    def targets(self) -> list[str]:
        """Every module some adapter adapts, in module order."""
        seen: dict[str, None] = {}
        for found in self.weights.values():
            seen.update(dict.fromkeys(found))
        return list(seen)


def insert_slots(module: nn.Module, targets: list[str]) -> list[Slot]:
    """Replace each target Linear of ``module`` by a ``LoraSlot`` (in place); ``remove_slots`` undoes it."""
    slots = []
    for mark, target in enumerate(targets, start=1):
        parent, _, child = target.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        layer = getattr(owner, child)
        if isinstance(layer, nn.Embedding):
            setattr(owner, child, EmbeddingSlot(layer, mark))
            slots.append(Slot(target, layer.num_embeddings, layer.embedding_dim))
            continue
        if not isinstance(layer, nn.Linear):
            raise ExportError(f"{target} is a {type(layer).__name__}, not a Linear or an Embedding: it cannot hold "
                              "a LoRA slot")
        setattr(owner, child, LoraSlot(layer, mark))
        slots.append(Slot(target, layer.in_features, layer.out_features))
    return slots


def remove_slots(module: nn.Module, slots: list[Slot]) -> None:
    for slot in slots:
        parent, _, child = slot.module.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, getattr(owner, child).base_layer)


def expose_slots(graph: Path, out: Path, slots: list[Slot]) -> tuple[list[Slot], dict[str, np.dtype]]:
    """``graph`` written to ``out`` with each slot's parameters as overridable initializers: graph inputs of shape
    (in, r_k) and (r_k, out), defaults zeros of rank 1 (the base model). Returns the slots the graph has, and each
    slot parameter's element type (fp16 graphs take fp16 adapters): a module no output reads (BERT's pooler under
    mean pooling) was pruned with its slot, and what an adapter does there changes nothing; a slot lost any other
    way shows as that adapter's parity miss."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(graph))
    initializers = {init.name: init for init in model.graph.initializer}
    kept = [slot for slot in slots if slot.a in initializers and slot.b in initializers]
    # the shapes recorded at export fixed each slot's rank at 1 ((batch, seq, 1) between the two MatMuls), and
    # onnxruntime plans buffers by them: onnxruntime infers them again from the symbolic ranks
    del model.graph.value_info[:]
    dtypes: dict[str, np.dtype] = {}
    for k, slot in enumerate(kept):
        for name, shape, dims in ((slot.a, (slot.in_features, 1), [slot.in_features, f"lora_rank_{k}"]),
                                  (slot.b, (1, slot.out_features), [f"lora_rank_{k}", slot.out_features])):
            init = initializers[name]
            dtypes[name] = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
            init.CopyFrom(numpy_helper.from_array(np.zeros(shape, dtype=dtypes[name]), name))
            model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, dims))
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out.name + ".data")
    return kept, dtypes


def write_adapter_file(path: Path, weights: dict[str, tuple[np.ndarray, np.ndarray]], slots: list[Slot],
                       dtypes: dict[str, np.dtype]) -> int:
    """One adapter's parameters as an onnxruntime adapter file; returns how many numbers it holds."""
    import onnxruntime as ort

    by_module = {slot.module: slot for slot in slots}
    params, count = {}, 0
    for module, (a, b) in weights.items():
        slot = by_module[module]
        for name, array in ((slot.a, a), (slot.b, b)):
            value = np.ascontiguousarray(array.astype(dtypes.get(name, np.float32)))
            params[name] = ort.OrtValue.ortvalue_from_numpy(value)
            count += value.size
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.export_adapter(str(path))
    return count


class AdapterExport:
    """The adapters' part of one export: slots in the exported module, PEFT's reference beside it, the files."""

    def __init__(self, module: nn.Module, reference: nn.Module, peft: PeftAdapters, folders: dict[str, Path]) -> None:
        self.module, self.reference, self.peft, self.folders = module, reference, peft, folders
        self.slots = insert_slots(module, peft.targets())
        self.dtypes: dict[str, np.dtype] = {}

    @staticmethod
    def check(resolved, plan, options) -> list[tuple[str, Path]]:
        """The ``--adapter`` options, refused before any work where this export cannot carry them."""
        adapters = list(resolved.adapters) + [parse_adapter(text) for text in options.adapters]
        names = [name for name, _ in adapters]
        if len(set(names)) != len(names):
            raise ConfigError(f"--adapter names must differ: {', '.join(names)}")
        head = resolved.head
        if head.vision_language or head.image_tower or head.pairs or head.multi_vector or head.parity_metric == "abs":
            raise ConfigError("--adapter: LoRA adapters are served on text embedding models (dense or sparse); "
                              f"this is a {head.spec().label} model")
        if plan.quantizes_int8:
            raise ConfigError("--adapter with --precision int8 is not supported: the int8 gate would quantize the "
                              "adapters' slots too; export fp32 (CPU) or fp16 (--target cuda)")
        for name, folder in adapters:
            if not folder.is_dir():
                raise ConfigError(f"--adapter {name}={folder}: no such folder")
            read_lora_config(folder)
        return adapters

    @classmethod
    def prepare(cls, module: nn.Module, reference: nn.Module, adapters: list[tuple[str, Path]]) -> AdapterExport:
        """PEFT's adapters injected into ``reference`` (a second copy of the model), slots into ``module``."""
        return cls(module, reference, PeftAdapters.load(reference, adapters), dict(adapters))

    def expose(self, final: Path, tmp: Path) -> Path:
        """The exported graph with its slots as overridable inputs; ``module`` is the base model again."""
        remove_slots(self.module, self.slots)
        exposed = tmp / "adapter-slots.onnx"
        self.slots, self.dtypes = expose_slots(final, exposed, self.slots)
        if not self.slots:
            raise ExportError("no LoRA slot is left in the graph: the adapters adapt no module the outputs read")
        kept = {slot.module for slot in self.slots}
        for found in self.peft.weights.values():
            for module in [m for m in found if m not in kept]:
                del found[module]
        return exposed

    def specs(self) -> list:
        from toolkit.manifest import AdapterSpec

        specs = []
        for name in self.peft.names:
            config, weights = self.peft.configs[name], self.peft.weights[name]
            specs.append(AdapterSpec(
                name=name, rank=max(a.shape[1] for a, _ in weights.values()), alpha=float(config.get("lora_alpha", 8)),
                targets=list(weights), parameters=sum(a.size + b.size for a, b in weights.values()),
                source=str(self.folders[name])))
        return specs

    def write_files(self, artifact: Path) -> list[Path]:
        """Each adapter's parameter file beside ``artifact`` (``toolkit.runtime.artifact.adapter_path``)."""
        from toolkit.runtime.artifact import adapter_path

        paths = []
        for name in self.peft.names:
            path = adapter_path(artifact, name)
            write_adapter_file(path, self.peft.weights[name], self.slots, self.dtypes)
            paths.append(path)
        return paths

    def release(self) -> None:
        """The torch modules go (the adapters' weights, as arrays, stay for ``write_files``)."""
        self.module = self.reference = self.peft.peft_model = None

    def verify(self, candidate: Path, resolved, precision: str, specs: list) -> list:
        """Each adapter of ``candidate`` against PEFT's model with that adapter active (the usual parity gate);
        ParityError naming the adapter that misses."""
        import msgspec

        from toolkit.export.parity import check_parity
        from toolkit.export.steps import parity_error

        checked = []
        for spec in specs:
            self.peft.activate(spec.name)
            report = check_parity(candidate, resolved, self.reference, precision, adapter=spec.name)
            if not report.passed:
                error = parity_error(report)
                raise ParityError(f"adapter '{spec.name}': {error.message}", error.report)
            checked.append(msgspec.structs.replace(spec, min_cosine=dict(report.min_cosine), passed=True))
        return checked
