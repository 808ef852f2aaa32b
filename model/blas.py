"""Many-row matrix products on MLX's CPU backend, through numpy's BLAS.

MLX's CPU kernels cost the same per row whatever the number of rows: a quantized product
(`quantized_matmul`, `gather_qmm`) dequantizes the weights again for every row, and the Linux
wheel's float products go through the reference BLAS it bundles (netlib's, ~1 GFLOP/s). So a
prompt token costs as much as a decoded one, and a 200-token prompt costs 200 decode steps of
expert work. numpy's BLAS (OpenBLAS on Linux, Accelerate on macOS) multiplies the same float32
matrices 100-250x faster here (BENCHMARKS.md, "Many-row products on the CPU").

So on the CPU, a product of at least MIN_ROWS rows with a weight of at least MIN_WEIGHTS
elements is computed here: the weight is dequantized in blocks of BLOCK_ELEMENTS (4-bit affine
through a byte lookup table, other formats through `mx.dequantize`), and each block is one
float32 BLAS product. Dequantizing costs about as much as MLX's product of ~10 rows, so the
gain grows with the rows (5x at 50 rows per weight). Fewer rows, a GPU, or half precision stay
with MLX's kernels. The numbers equal MLX's dequantize-then-multiply to float32 rounding
(tests/test_blas.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

MIN_ROWS = 32  # from this many rows on, dequantizing once beats MLX's per-row kernels (2 streams)
MIN_WEIGHTS = 1 << 20  # smaller weights stay with MLX (graph stays lazy; tiny models)
BLOCK_ELEMENTS = 1 << 23  # dequantized weight block: 32 MB of float32

_held_off = 0  # > 0 inside `held_off()`

_NIBBLES = np.array([[i & 15, i >> 4] for i in range(256)], dtype=np.float32)  # byte -> 2 q


def applies(rows: int, out_features: int, in_features: int, dtype: mx.Dtype) -> bool:
    """Whether a [rows, in] x [out, in]^T product with weights stored as `dtype` (uint32 when
    quantized) is computed here rather than by MLX."""
    return (
        not _held_off
        and rows >= MIN_ROWS
        and out_features * in_features >= MIN_WEIGHTS
        and dtype in (mx.float32, mx.uint32)
        and mx.default_device() == mx.cpu
    )


@contextmanager
def held_off() -> Iterator[None]:
    """Every product stays with MLX inside: gradients (model/tune) cannot pass through numpy."""
    global _held_off
    _held_off += 1
    try:
        yield
    finally:
        _held_off -= 1


def matmul_t(
    x: np.ndarray,
    weight: mx.array,
    scales: mx.array | None = None,
    biases: mx.array | None = None,
    group_size: int = 64,
    bits: int | None = None,
    mode: str = "affine",
) -> np.ndarray:
    """x [rows, in] float32 @ W.T -> [rows, out] float32, W = weight [out, in] (float32), or
    weight [out, in * bits / 32] uint32 with scales/biases [out, in / group_size] (quantized)."""
    out_features = weight.shape[0]
    in_features = x.shape[-1]
    step = max(1, BLOCK_ELEMENTS // in_features)
    y = np.empty((x.shape[0], out_features), dtype=np.float32)
    if bits is None:
        w = np.asarray(weight)
        for a in range(0, out_features, step):
            y[:, a : a + step] = x @ w[a : a + step].T
        return y
    packed = np.asarray(weight)
    s = np.asarray(scales.astype(mx.float32))
    b = None if biases is None else np.asarray(biases.astype(mx.float32))
    for a in range(0, out_features, step):
        e = min(a + step, out_features)
        if bits == 4 and mode == "affine" and b is not None:
            q = _NIBBLES[packed[a:e].view(np.uint8)].reshape(e - a, -1, group_size)
            q *= s[a:e, :, None]
            q += b[a:e, :, None]
            block = q.reshape(e - a, in_features)
        else:
            block = np.asarray(
                mx.dequantize(
                    weight[a:e], scales[a:e], None if biases is None else biases[a:e],
                    group_size=group_size, bits=bits, mode=mode,
                ).astype(mx.float32)
            )  # fmt: skip
        y[:, a:e] = x @ block.T
    return y


def linear(
    x: mx.array,
    weight: mx.array,
    scales: mx.array | None = None,
    biases: mx.array | None = None,
    group_size: int = 64,
    bits: int | None = None,
    mode: str = "affine",
) -> mx.array:
    """matmul_t for MLX arrays: x [..., in] -> [..., out] in x's dtype."""
    rows = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])
    y = matmul_t(rows, weight, scales, biases, group_size, bits, mode)
    return mx.array(y).astype(x.dtype).reshape(*x.shape[:-1], -1)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), as mlx.nn.silu (exp overflows to inf for x << 0: the result is -0)."""
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))
