"""A family's parameters as mlx-lm's own `sanitize` makes them from its published layout
(gpt_oss's fused gate_up, DeepSeek's and PhiMoE's per-expert tensors, GraniteMoE's
input_linear/output_linear, ...): what `mlx_lm.convert` quantizes, built lazily so that a
tensor is read from the source when its module is written. gpt-oss's published MXFP4 experts
(`*_blocks`/`*_scales`) stay as they are, as mlx_lm.convert keeps them: weight and scales
written unchanged, the MXFP4 mode the config's default (mlx-lm's load of `quant_method: mxfp4`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

LAYER = re.compile(r"model\.layers\.\d+\.")
# Bytes per element of the safetensors dtypes a source may hold (MXFP4 blocks and scales: U8)
ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}
# Sources already quantized that mlx_lm.convert keeps so: model_type -> quant_method -> the
# config's quantization as mlx-lm's load sets it
PACKED = {"gpt_oss": {"mxfp4": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}}


def packed_quantization(config: dict) -> dict | None:
    """The quantization of an already quantized source that mixchat converts as mlx-lm does
    (gpt-oss in MXFP4); None for a float source. Raises ValueError for other quantized ones."""
    method = (config.get("quantization_config") or {}).get("quant_method")
    if not (config.get("quantization") or config.get("quantization_config")):
        return None
    choice = PACKED.get(config.get("model_type"), {}).get(method)
    if choice is None:
        raise ValueError("already quantized")
    return dict(choice)


def sanitized_parameters(
    model: Any, get: Any, shapes: dict[str, tuple[int, ...]], before: Callable | None = None
) -> list[tuple[str, tuple[int, ...], list[Any], Callable[[], Any], str | None]]:
    """[(parameter, shape, source refs it is read from, a loader of its lazy mx.array, its kept
    dtype)] for mlx-lm `model` over a source's tensors (`get`: quantize.sources._Lookup, which
    checks the shape of a tensor kept by name); `before`: the family's fix of the published
    names ahead of sanitize (model.families.BEFORE_SANITIZE). A parameter renamed or assembled
    by sanitize is attributed to its layer's source tensors not kept by name (the writing
    order, progress). A module sanitize returns already quantized (its `.scales`: MXFP4
    experts) gives its packed weight and scales, their dtype kept (e.g. "uint32", "uint8")."""
    tensors = get.tensors
    get.used.update(tensors)  # every source tensor is read
    import mlx.core as mx

    def sanitize() -> dict[str, Any]:
        weights: dict[str, Any] = {}
        for file in sorted({ref.file for ref in tensors.values()}):
            weights.update(mx.load(str(file)))  # lazy: nothing is read until evaluated
        return model.sanitize(before(weights) if before else weights)

    sanitized = sanitize()  # names, shapes and dtypes; the values are read when written
    packed = {n.rpartition(".")[0] for n in sanitized if n.endswith(".scales")}

    def build(name: str) -> Any:
        if name not in sanitized:  # a tensor read again (`compare`)
            sanitized.clear()
            sanitized.update(sanitize())
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
        module, _, part = name.rpartition(".")
        if module in packed and part == "weight":
            for kept in (name, f"{module}.scales"):
                value = sanitized[kept]
                dtype = str(value.dtype).rpartition(".")[2]
                out.append((kept, tuple(value.shape), refs, lambda n=kept: build(n), dtype))
            continue
        out.append((name, shape, refs, lambda name=name: build(name), None))
    return out
