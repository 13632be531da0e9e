"""Vision-language families: one registry entry each, naming the module of its export half and of its runtime half.

A family is the manifest's ``vision_language.family`` (the checkpoint's ``config.model_type``). Its two halves are
modules found by name (``importlib``), so this ground module imports neither engine, and a serving install never
loads the torch side:

- the export half (torch; ``export.qwen_vl``, ``export.llava_next``):
  ``build_spec(resolved, cfg, tokenizer, token, token_id, resample) -> VisionLanguage``: the family's manifest facts
  (``cfg``: preprocessor_config.json, the checks every family shares already made by
  ``export.vision_language.vision_language_spec``); ``export_vision(model, resolved, spec, *, opset, path)``: its
  vision graph; ``POSITION_AXES``: the language graph's position axes (3 for M-RoPE, 1 for a plain decoder);
  ``load_processor(resolved, spec, tokenizer)``: transformers' processor for the reference;
  ``run_reference(model, spec, tokenizer, processor, item) -> torch.Tensor``: the model's last hidden state for
  one probe item (1, seq, hidden).
- the runtime half (numpy, no torch; ``runtime.qwen_vl``, ``runtime.llava_next``): ``Images``, a class built from
  the manifest's facts (``Images(spec)``) with ``outputs`` (the vision graph's), ``prepare(image, index) ->
  (feeds, feature rows, grid)`` and ``positions(is_image, grids) -> (axes, seq)``.

Families that differ only by facts (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) share their halves; the facts are decided
in the export half's ``build_spec`` and read from the manifest at serving time.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

from toolkit.errors import ConfigError

__all__ = ["FAMILIES", "Family", "FamilyView", "load_half"]

Side = Literal["export", "runtime"]


@dataclass(frozen=True)
class Family:
    """The modules of one family's two halves (see the module docstring for what each provides)."""

    export: str
    runtime: str


_QWEN = Family(export="toolkit.export.qwen_vl", runtime="toolkit.runtime.qwen_vl")

FAMILIES: dict[str, Family] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,  # its tower attends within windows (the manifest's window_size)
    "qwen3_vl": _QWEN,  # a learned position table, DeepStack, videos (position_grid, deepstack, video)
    "llava_next": Family(export="toolkit.export.llava_next", runtime="toolkit.runtime.llava_next"),
    "paligemma": Family(export="toolkit.export.paligemma", runtime="toolkit.runtime.paligemma"),  # ColPali's base
}


def load_half(family: str, side: Side) -> ModuleType:
    """The module of ``family``'s ``side`` half; ConfigError naming the known families for another one (an
    artifact from a newer toolkit)."""
    entry = FAMILIES.get(family)
    if entry is None:
        raise ConfigError(f"vision-language family '{family}' is not one of: {', '.join(FAMILIES)} "
                          "(an artifact from a newer toolkit?)")
    return importlib.import_module(getattr(entry, side))


class FamilyView:
    """The registry seen from one side as family -> one attribute of that side's half (the runtime's
    ``FAMILIES``: family -> its ``Images`` class). Membership and iteration read the registry's keys and import
    nothing; a lookup imports the half (``load_half``)."""

    def __init__(self, side: Side, attribute: str) -> None:
        self.side, self.attribute = side, attribute

    def __contains__(self, family: object) -> bool:
        return family in FAMILIES

    def __iter__(self) -> Iterator[str]:
        return iter(FAMILIES)

    def __len__(self) -> int:
        return len(FAMILIES)

    def __getitem__(self, family: str):
        return getattr(load_half(family, self.side), self.attribute)
