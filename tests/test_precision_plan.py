"""An export's precision decided once (``export.precision.PrecisionPlan``): what each precision means for the
steps, and the (precision, target) pairs refused before anything is loaded."""

from __future__ import annotations

import pytest

from toolkit.errors import ExportError
from toolkit.export.precision import PrecisionPlan
from toolkit.settings import ExportOptions, Precision


@pytest.mark.parametrize(("precision", "fp16", "int8", "device", "suffix", "noise"), [
    ("fp32", False, False, "cpu", "", True),
    ("fp16", True, False, "auto", "-fp16", False),
    ("int8", False, True, "cpu", "-int8", False),
])
def test_each_precision_plans_every_step(precision, fp16, int8, device, suffix, noise):
    plan = PrecisionPlan.of(precision)
    assert plan == PrecisionPlan.of(Precision(precision)) and plan.name == precision
    assert (plan.converts_fp16, plan.quantizes_int8, plan.parity_device, plan.file_suffix, plan.judges_noise) == \
        (fp16, int8, device, suffix, noise)
    assert plan.allows_low_accuracy(ExportOptions(allow_low_accuracy=True)) is int8
    assert not plan.allows_low_accuracy(ExportOptions())


@pytest.mark.parametrize(("precision", "target", "pairs", "message"), [
    ("int8", "cuda", False, "int8 artifacts are for --target cpu; use fp16 for cuda / tensorrt"),
    ("int8", "tensorrt", False, "int8 artifacts are for --target cpu; use fp16 for cuda / tensorrt"),
    ("int8", "cpu", True, "int8 is not offered for cross-encoders yet: export fp32 (or fp16 for cuda)"),
    ("fp16", "cpu", False, "fp16 artifacts are for --target cuda or tensorrt; the CPU provider runs fp16 slowly"),
])
def test_pairs_that_do_not_fit_are_refused(precision, target, pairs, message):
    with pytest.raises(ExportError) as caught:
        PrecisionPlan.for_export(ExportOptions(precision=precision, target=target), pairs=pairs)
    assert caught.value.message == message


@pytest.mark.parametrize(("precision", "target", "pairs"), [
    ("fp32", "cpu", True), ("fp32", "cuda", False), ("fp16", "cuda", True), ("fp16", "tensorrt", False),
    ("int8", "cpu", False),
])
def test_pairs_that_fit_are_planned(precision, target, pairs):
    plan = PrecisionPlan.for_export(ExportOptions(precision=precision, target=target), pairs=pairs)
    assert plan.name == precision
