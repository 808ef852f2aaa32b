"""Many-row matrix products on MLX's CPU backend, through numpy's BLAS, forward and backward.

MLX's CPU kernels cost the same per row whatever the number of rows: a quantized product
(`quantized_matmul`, `gather_qmm`) dequantizes the weights again for every row, and the Linux
wheel's float products go through the reference BLAS it bundles (netlib's, ~1-4 GFLOP/s). So a
prompt token costs as much as a decoded one. numpy's BLAS (OpenBLAS on Linux, Accelerate on
macOS) multiplies the same float32 matrices 25-250x faster here (BENCHMARKS.md, "Many-row
products on the CPU" and "Prompt speed of small models on the CPU").

So on the CPU, a product of enough rows (`applies`) is computed here: the weight is dequantized
in blocks of BLOCK_ELEMENTS (`mx.dequantize`, scales widened to float32), and each block is one
float32 BLAS product. A weight that fits in the CPU's cache (SMALL_WEIGHTS) dequantizes at
about 1 ns an element, as cheap as ~1-2 rows of MLX's kernel, so from MIN_ROWS_SMALL rows on
it gains; a large one (an 8x7B expert) costs ~10 rows of MLX's kernel, so from MIN_ROWS on. A
prompt's attention (`attention`) and a dense SwiGLU MLP (`swiglu`) run here too: MLX's CPU
softmax and silu are 8-20x slower than numpy's. One row (decode), a GPU, or half precision
stay with MLX's kernels.

Every route is an MLX op with its own VJP (`through_numpy`), so training gets the same
products backward: d(input) = d(output) @ W through BLAS. Weights are constants of these ops:
frozen base weights, as LoRA trains them; no gradient reaches them. The numbers equal MLX's
dequantize-then-multiply (and its autograd) to float32 rounding (tests/test_blas.py).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

MIN_ROWS = 32  # large weights: from this many rows on, dequantizing once beats MLX's kernels
SMALL_WEIGHTS = 1 << 22  # weights up to this many elements dequantize in cache (~1 ns each)
MIN_ROWS_SMALL = 4  # ... so from this many rows on, BLAS beats MLX's kernels (2 streams) 2-10x
MIN_WEIGHTS = 1 << 16  # smaller weights stay with MLX (per-call cost; tiny models stay lazy)
MIN_QUERIES = 4  # attention of this many query tokens: BLAS beats MLX's CPU SDPA 2-4x
BLOCK_ELEMENTS = 1 << 23  # dequantized weight block: 32 MB of float32

Parts = tuple  # matmul_t's weight arguments: (weight, scales, biases, group_size, bits, mode)


def applies(rows: int, out_features: int, in_features: int, dtype: mx.Dtype) -> bool:
    """Whether a [rows, in] x [out, in]^T product with weights stored as `dtype` (uint32 when
    quantized) is computed here rather than by MLX."""
    weights = out_features * in_features
    return (
        rows >= (MIN_ROWS_SMALL if weights <= SMALL_WEIGHTS else MIN_ROWS)
        and weights >= MIN_WEIGHTS
        and dtype in (mx.float32, mx.uint32)
        and mx.default_device() == mx.cpu
    )


def attention_applies(queries: mx.array, keys: object) -> bool:
    """Whether attention of queries [B, heads, L, head_dim] over keys [B, kv_heads, S,
    head_dim] (an array: not a quantized KV cache's tuple) is computed here: many queries,
    and keys as large as a weight of MIN_WEIGHTS for all heads (short prompts stay in MLX)."""
    _, heads, queries_count, head_dim = queries.shape
    return (
        isinstance(keys, mx.array)
        and queries.dtype == mx.float32
        and queries_count >= MIN_QUERIES
        and heads * head_dim * keys.shape[-2] >= MIN_WEIGHTS
        and mx.default_device() == mx.cpu
    )


@functools.cache
def one_blas_thread() -> bool:
    """Run numpy's bundled OpenBLAS on one thread (once; False where there is none, e.g.
    Accelerate). Its worker threads spin while waiting for work: on a CPU that other processes
    share, each of a prompt's thousands of small products waited for a descheduled worker, and
    the default model read a 2,000-token prompt at 10 tok/s instead of 155 (BENCHMARKS.md)."""
    numpy_dir = Path(np.__file__).parent
    bundled = [*numpy_dir.parent.glob("numpy.libs/*openblas*"), *numpy_dir.glob(".dylibs/*blas*")]
    for path in bundled:
        lib = ctypes.CDLL(str(path))
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):  # fmt: skip
            if hasattr(lib, name):
                getattr(lib, name)(1)
                return True
    return False


def host(a: mx.array | np.ndarray | None) -> np.ndarray | None:
    """`a` as a numpy array without making an MLX array: an evaluated MLX array's own buffer
    (no copy); bfloat16, which numpy lacks, widened to float32 in numpy (exact).

    Inside a training step's VJP (an MLX transform) every MLX array made and evaluated stays
    alive until the transform ends, inputs included: a slice `weight[e]` or a widened copy of
    the scales, made per product, kept ~2.3 MB per expert projection of the 790M benchmark
    model, forward and backward: 0.9 GB of a 2 x 24-token step (BENCHMARKS.md, "Fine-tuning").
    So weights are sliced and widened here, in numpy, where temporaries are freed at once."""
    if a is None or isinstance(a, np.ndarray):
        return a
    if a.dtype == mx.bfloat16:
        bits = np.asarray(a.view(mx.uint16)).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)
    return np.asarray(a)


def numpy_route(bits: int | None, mode: str, biases: object) -> bool:
    """Whether a weight of this kind is dequantized in numpy (`_dequantize`): float weights and
    affine 2/4/8-bit blocks with biases; other formats go through mx.dequantize."""
    return bits is None or (mode == "affine" and 32 % bits == 0 and biases is not None)


def stacked_parts(weight: mx.array, scales: mx.array | None, biases: mx.array | None,
                  group_size: int, bits: int | None, mode: str, e: int) -> Parts:  # fmt: skip
    """matmul_t's arguments for expert e of stacked weights [E, out, ...]: numpy views where
    numpy dequantizes them (no MLX array made: see `host`), else MLX slices."""
    if numpy_route(bits, mode, biases):
        def one(a):
            return None if a is None else host(a)[e]
    else:
        def one(a):
            return None if a is None else a[e]
    return one(weight), one(scales), one(biases), group_size, bits, mode


def _blocks(
    weight: mx.array | np.ndarray,
    scales: mx.array | np.ndarray | None = None,
    biases: mx.array | np.ndarray | None = None,
    group_size: int = 64,
    bits: int | None = None,
    mode: str = "affine",
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(a, e, W[a:e] as float32 [e - a, in]) over the weight's output rows."""
    one_blas_thread()
    if bits is None:
        yield 0, weight.shape[0], host(weight)
        return
    out_features, in_features = weight.shape[0], _in_features(weight, bits=bits)
    step = max(1, BLOCK_ELEMENTS // in_features)
    if numpy_route(bits, mode, biases):
        weight, scales, biases = host(weight), host(scales), host(biases)
        for a in range(0, out_features, step):
            e = min(a + step, out_features)
            yield a, e, _dequantize(weight[a:e], scales[a:e], biases[a:e], group_size, bits)
        return
    for a in range(0, out_features, step):
        e = min(a + step, out_features)
        block = mx.dequantize(
            weight[a:e], scales[a:e], None if biases is None else biases[a:e],
            group_size=group_size, bits=bits, mode=mode,
        )  # fmt: skip
        yield a, e, np.asarray(block.astype(mx.float32))


def _dequantize(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int,
                bits: int) -> np.ndarray:
    """mx.dequantize's affine result (scale * q + bias, float32, bit for bit) computed in numpy.
    Inside a training step's VJP (an MLX transform) the blocks MLX dequantizes stay alive until
    the transform ends: a layer's backward held every float32 expert projection it read, ~4 GB
    for a full-size Mixtral layer (benchmarks/bench_tune_layer.py). numpy's are freed at once,
    at the same speed."""
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    q = ((weight[..., None] >> shifts) & np.uint32((1 << bits) - 1)).astype(np.float32)
    q = q.reshape(weight.shape[0], -1, group_size)
    q *= scales.astype(np.float32, copy=False)[..., None]
    q += biases.astype(np.float32, copy=False)[..., None]
    return q.reshape(weight.shape[0], -1)


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
    y = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
    for a, e, block in _blocks(weight, scales, biases, group_size, bits, mode):
        y[:, a:e] = x @ block.T
    return y


def matmul(dy: np.ndarray, *parts) -> np.ndarray:
    """dy [rows, out] float32 @ W -> [rows, in] float32: matmul_t's input gradient."""
    dx = np.zeros((dy.shape[0], _in_features(*parts)), dtype=np.float32)
    for a, e, block in _blocks(*parts):
        dx += dy[:, a:e] @ block
    return dx


def _in_features(weight: mx.array, scales=None, biases=None, group_size=64, bits=None,
                 mode="affine") -> int:  # fmt: skip
    return weight.shape[1] if bits is None else weight.shape[1] * 32 // bits


def through_numpy(forward: Callable, backward: Callable, *inputs: mx.array) -> mx.array:
    """An MLX op computed in numpy: forward(*float32 inputs) -> ndarray, in inputs[0]'s dtype;
    its VJP is backward(*float32 inputs, cotangent) -> one ndarray per input."""
    dtype = inputs[0].dtype

    @mx.custom_function
    def op(*xs: mx.array) -> mx.array:
        return mx.array(forward(*(_float32(x) for x in xs))).astype(dtype)

    @op.vjp
    def op_vjp(primals, cotangent: mx.array, output: mx.array) -> tuple:
        primals = tuple(primals) if isinstance(primals, (tuple, list)) else (primals,)
        grads = backward(*(_float32(p) for p in primals), _float32(cotangent))
        return tuple(mx.array(g).astype(p.dtype) for g, p in zip(grads, primals))

    return op(*inputs)


def _float32(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def linear(
    x: mx.array,
    weight: mx.array,
    scales: mx.array | None = None,
    biases: mx.array | None = None,
    group_size: int = 64,
    bits: int | None = None,
    mode: str = "affine",
) -> mx.array:
    """matmul_t for MLX arrays: x [..., in] -> [..., out] in x's dtype, differentiable in x."""
    parts = (weight, scales, biases, group_size, bits, mode)

    def forward(xs: np.ndarray) -> np.ndarray:
        return matmul_t(xs.reshape(-1, xs.shape[-1]), *parts).reshape(*xs.shape[:-1], -1)

    def backward(xs: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray]:
        return (matmul(dy.reshape(-1, dy.shape[-1]), *parts).reshape(xs.shape),)

    return through_numpy(forward, backward, x)


def swiglu(x: mx.array, gate: Parts, up: Parts, down: Parts) -> mx.array:
    """down(silu(gate(x)) * up(x)) for x [..., hidden], differentiable in x."""

    def forward(xs: np.ndarray) -> np.ndarray:
        rows = xs.reshape(-1, xs.shape[-1])
        return swiglu_rows(rows, gate, up, down).reshape(*xs.shape[:-1], -1)

    def backward(xs: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray]:
        rows, dy = xs.reshape(-1, xs.shape[-1]), dy.reshape(-1, dy.shape[-1])
        return (swiglu_rows_grad(rows, dy, gate, up, down).reshape(xs.shape),)

    return through_numpy(forward, backward, x)


def swiglu_rows(x: np.ndarray, gate: Parts, up: Parts, down: Parts) -> np.ndarray:
    """down(silu(gate(x)) * up(x)) for rows x [rows, hidden] float32."""
    return matmul_t(silu(matmul_t(x, *gate)) * matmul_t(x, *up), *down)


def swiglu_rows_grad(x: np.ndarray, dy: np.ndarray, gate: Parts, up: Parts,
                     down: Parts) -> np.ndarray:  # fmt: skip
    """d(input) of swiglu_rows for rows x, given d(output) dy [rows, hidden]."""
    g, u = matmul_t(x, *gate), matmul_t(x, *up)
    dh = matmul(dy, *down)
    with np.errstate(over="ignore"):
        sig = 1.0 / (1.0 + np.exp(-g))
    du = dh * g * sig  # d/du of silu(g) * u
    dh *= u
    dh *= sig * (1.0 + g * (1.0 - sig))  # d silu(g) / dg
    dx = matmul(dh, *gate)
    dx += matmul(du, *up)
    return dx


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), as mlx.nn.silu (exp overflows to inf for x << 0: the result is -0)."""
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
              mask: mx.array | str | None) -> mx.array:  # fmt: skip
    """softmax(scale * q k^T + mask) v as mx.fast.scaled_dot_product_attention: queries
    [B, heads, L, D], keys/values [B, kv_heads, S, D] (grouped-query: head h reads kv head
    h // (heads / kv_heads)); mask None, "causal" (the last L of S positions) or an array
    (bool: keep, else added) broadcasting to [B, heads, L, S]. Differentiable in q, k, v."""
    B, H, L, D = queries.shape
    kv_heads, S = keys.shape[1], keys.shape[2]
    bias = _mask_bias(mask, B, H, kv_heads, L, S)

    def probabilities(q: np.ndarray, k: np.ndarray) -> np.ndarray:
        """[B, kv_heads, rep * L, S]: each kv head's query rows, all its heads together."""
        scores = q.reshape(B, kv_heads, -1, D) @ k.swapaxes(-1, -2)
        scores *= scale
        if bias is not None:
            by_head = scores.reshape(B, kv_heads, -1, L, S)  # a view: adds in place
            by_head += bias
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        return scores

    def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        return (probabilities(q, k) @ v).reshape(B, H, L, -1)

    def backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, d_out: np.ndarray) -> tuple:
        p = probabilities(q, k)
        d_out = d_out.reshape(B, kv_heads, -1, v.shape[-1])
        dv = p.swapaxes(-1, -2) @ d_out
        dp = d_out @ v.swapaxes(-1, -2)
        dp -= (dp * p).sum(axis=-1, keepdims=True)
        dp *= p  # d(scores)
        dp *= scale
        dq = (dp @ k).reshape(q.shape)
        dk = dp.swapaxes(-1, -2) @ q.reshape(B, kv_heads, -1, D)
        return dq, dk, dv

    return through_numpy(forward, backward, queries, keys, values)


def _mask_bias(mask: mx.array | str | None, B: int, H: int, kv_heads: int, L: int,
               S: int) -> np.ndarray | None:  # fmt: skip
    """The mask as float32 added to scores viewed as [B, kv_heads, rep, L, S] (-inf: masked)."""
    if mask is None:
        return None
    if isinstance(mask, str):  # "causal": query i sits at position S - L + i
        hidden = np.arange(S)[None, :] > (S - L + np.arange(L))[:, None]
        return np.where(hidden, np.float32(-np.inf), np.float32(0))
    m = np.array(mask)
    if m.dtype == np.bool_:
        m = np.where(m, np.float32(0), np.float32(-np.inf))
    m = m.astype(np.float32).reshape((1,) * (4 - m.ndim) + m.shape)
    if m.shape[1] == H and H != kv_heads:
        return m.reshape(m.shape[0], kv_heads, H // kv_heads, *m.shape[2:])
    return m[:, :, None]
