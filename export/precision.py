"""What an export's precision means for each of its steps, decided once (``PrecisionPlan``).

The steps (graph optimization, int8 search, fp16 conversion, the parity check, the output's name, the accuracy
gate's escape hatch) read the plan's fields instead of comparing the precision themselves. The gate thresholds
stay in each check's own table (``export.parity.THRESHOLDS``, ``export.towers.IMAGE_THRESHOLDS``,
``export.vision_language_parity.THRESHOLDS``), keyed by ``PrecisionPlan.name`` and read when the check runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.errors import ConfigError, ExportError
from toolkit.settings import ExportOptions, Precision, Target

__all__ = ["PrecisionPlan"]


@dataclass(frozen=True)
class PrecisionPlan:
    """One precision's consequences for the export's steps."""

    precision: Precision
    converts_fp16: bool = False  # the graphs' weights and compute to fp16 (inputs and outputs stay fp32)
    quantizes_int8: bool = False  # int8 MatMuls, chosen against the accuracy gate (CPU kernels)
    parity_device: str = "cpu"  # where parity runs: fp16 where it will run (the GPU where there is one: "auto")
    judges_noise: bool = False  # fp32: an output missing the cosine gate is judged against the rounding noise
    file_suffix: str = ""  # the default output's name: model-fp16.onnx, model-int8.onnx

    @classmethod
    def of(cls, precision: Precision | str) -> PrecisionPlan:
        """The plan of ``precision`` (a member or its value), its target unchecked (``for_export`` checks it)."""
        value = Precision(precision)
        match value:
            case Precision.FP32:
                return cls(value, judges_noise=True)
            case Precision.FP16:
                return cls(value, converts_fp16=True, parity_device="auto", file_suffix="-fp16")
            case Precision.INT8:
                return cls(value, quantizes_int8=True, file_suffix="-int8")
        raise ValueError(f"precision {value!r} has no plan")

    @classmethod
    def for_export(cls, options: ExportOptions, *, pairs: bool = False, multi_vector: bool = False,
                   towers: bool = False) -> PrecisionPlan:
        """The export's plan; ExportError where the precision does not fit the target or the model (int8 is CPU,
        fp16 GPU; no int8 cross-encoders: ``pairs``, nor late-interaction artifacts: ``multi_vector``); ConfigError for
        an ``int8_form`` that is not one, on another precision, or where int8 has one form (``towers``: an image
        tower or a vision-language graph)."""
        plan, target = cls.of(options.precision), Target(options.target)
        if plan.quantizes_int8 and target != Target.CPU:
            raise ExportError("int8 artifacts are for --target cpu; use fp16 for cuda / tensorrt")
        if plan.quantizes_int8 and pairs:
            raise ExportError("int8 is not offered for cross-encoders yet: export fp32 (or fp16 for cuda)")
        if plan.quantizes_int8 and multi_vector:
            raise ExportError("int8 is not offered for late-interaction (ColBERT) artifacts yet: export fp32 (or fp16 "
                              "for cuda)")
        if options.int8_form is not None:
            from toolkit.export.optimize import INT8_FORMS

            if options.int8_form not in INT8_FORMS:
                raise ConfigError(f"--int8-form must be one of: auto, {', '.join(INT8_FORMS)} (got "
                                  f"'{options.int8_form}')")
            if not plan.quantizes_int8:
                raise ConfigError(f"--int8-form applies to --precision int8 only (got --precision {plan.name})")
            if towers:
                raise ConfigError("--int8-form applies to text models; image towers and vision-language graphs are "
                                  "quantized in one form (int8 weights, export.int8_weights): leave it out")
        if plan.converts_fp16 and target == Target.CPU:
            raise ExportError("fp16 artifacts are for --target cuda or tensorrt; the CPU provider runs fp16 slowly")
        return plan

    @property
    def name(self) -> str:
        """The precision's value: the manifest's ``precision`` and the key of every gate table."""
        return self.precision.value

    def allows_low_accuracy(self, options: ExportOptions) -> bool:
        """Whether a missed accuracy gate may still be written (``--allow-low-accuracy``: int8 only)."""
        return self.quantizes_int8 and options.allow_low_accuracy
