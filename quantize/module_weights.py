"""One module's weights, as the streamed evaluation (quantize/evaluate.py, quantize/family_eval.py)
loads them: quantized matrices dequantized into the compute dtype, names and shapes checked."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from model.config import ModelArgs
from model.errors import CheckpointError
from model.weights import _quantization_predicate


def as_compute(
    weights: dict[str, mx.array], module: nn.Module, prefix: str, args: ModelArgs, dtype: mx.Dtype
) -> dict[str, mx.array]:
    """`weights` (full names) for `module` rooted at `prefix`, with quantized matrices
    dequantized and every floating tensor in `dtype` (still lazy)."""
    predicate = _quantization_predicate(args, weights)
    out: dict[str, mx.array] = {}
    for rel, sub in module.named_modules():
        full = ".".join(p for p in (prefix, rel) if p)
        if f"{full}.scales" not in weights:
            continue
        q = predicate(full, sub)
        if not isinstance(q, dict):
            raise CheckpointError(f"{full} has quantization scales but cannot be quantized")
        biases, scales = weights.get(f"{full}.biases"), weights[f"{full}.scales"]
        if mx.issubdtype(scales.dtype, mx.floating):  # not mxfp4's E8M0 exponents (uint8)
            scales = scales.astype(dtype)
        out[f"{full}.weight"] = mx.dequantize(
            weights[f"{full}.weight"],
            scales,
            None if biases is None else biases.astype(dtype),
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
        )
    for name, w in weights.items():
        if name in out or (
            name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in out
        ):
            continue
        out[name] = w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w
    return out


def load_module(
    module: nn.Module, prefix: str, weights: dict[str, mx.array], args: ModelArgs, dtype: mx.Dtype
) -> nn.Module:
    """Fill `module` (rooted at `prefix`) from `weights`, checking names and shapes; evaluated."""
    ready = as_compute(weights, module, prefix, args, dtype)
    weights.clear()
    strip = len(prefix) + 1 if prefix else 0
    expected = dict(tree_flatten(module.parameters()))
    for rel, param in expected.items():
        full = ".".join(p for p in (prefix, rel) if p)
        if full not in ready:
            raise CheckpointError(
                f"checkpoint lacks tensor {full} (expected shape {tuple(param.shape)})"
            )
        if tuple(ready[full].shape) != tuple(param.shape):
            raise CheckpointError(
                f"tensor {full} has shape {tuple(ready[full].shape)}, but the config implies "
                f"{tuple(param.shape)}"
            )
    unexpected = sorted(n for n in ready if n[strip:] not in expected)
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected tensor {unexpected[0]}")
    module.update(tree_unflatten([(n[strip:], w) for n, w in ready.items()]))
    try:
        mx.eval(module.parameters())
    except Exception as e:
        raise CheckpointError(f"cannot read weights of {prefix or 'the model'}: {e}") from None
    return module
