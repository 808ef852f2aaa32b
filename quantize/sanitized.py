"""A family's parameters as mlx-lm's own `sanitize` makes them from its published layout
(gpt_oss's fused gate_up, DeepSeek's and PhiMoE's per-expert tensors, GraniteMoE's
input_linear/output_linear, ...): what `mlx_lm.convert` quantizes, built lazily so that a
tensor is read from the source when its module is written."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

LAYER = re.compile(r"model\.layers\.\d+\.")


def sanitized_parameters(
    model: Any, get: Any, shapes: dict[str, tuple[int, ...]]
) -> list[tuple[str, tuple[int, ...], list[Any], Callable[[], Any]]]:
    """[(parameter, shape, source refs it is read from, a loader of its lazy mx.array)] for
    mlx-lm `model` over a source's tensors (`get`: quantize.sources._Lookup, which checks the
    shape of a tensor kept by name). A parameter renamed or assembled by sanitize is
    attributed to its layer's source tensors not kept by name (the writing order, progress)."""
    tensors = get.tensors
    get.used.update(tensors)  # every source tensor is read
    import mlx.core as mx

    sanitized: dict[str, Any] = {}

    def build(name: str) -> Any:
        if name not in sanitized:  # the first time, or a tensor read again (`compare`)
            weights: dict[str, Any] = {}
            for file in sorted({ref.file for ref in tensors.values()}):
                weights.update(mx.load(str(file)))
            sanitized.clear()
            sanitized.update(model.sanitize(weights))
        return sanitized.pop(name)  # not kept once written

    def layer(name: str) -> str:
        m = LAYER.match(name)
        return m.group(0) if m else ""

    renamed: dict[str, list[Any]] = {}
    for name, ref in tensors.items():
        if name not in shapes:
            renamed.setdefault(layer(name), []).append(ref)
    first = list(tensors.values())[:1]
    out = []
    for name, shape in shapes.items():
        refs = [get(name, shape)] if name in tensors else renamed.get(layer(name)) or first
        out.append((name, shape, refs, lambda name=name: build(name)))
    return out
