"""model.blas: many-row products through numpy's BLAS equal MLX's dequantize-then-multiply."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from model import blas
from model.experts import Projection, swiglu


def _reference(x: np.ndarray, weight, scales=None, biases=None, group_size=64, bits=None,
               mode="affine") -> np.ndarray:  # fmt: skip
    if bits is not None:
        weight = mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits, mode=mode)
    return np.array(mx.array(x) @ weight.astype(mx.float32).T)


@pytest.mark.parametrize("bits", [None, 4, 8, 3])
def test_matmul_t_equals_mlx(monkeypatch, bits):
    monkeypatch.setattr(blas, "BLOCK_ELEMENTS", 64 * 128 * 3)  # several blocks, a ragged last
    rng = np.random.default_rng(bits or 0)
    w = mx.array(rng.standard_normal((200, 128)).astype(np.float32))
    x = rng.standard_normal((20, 128)).astype(np.float32)
    parts = (w,) if bits is None else (*mx.quantize(w, group_size=32, bits=bits), 32, bits)
    got = blas.matmul_t(x, *parts)
    want = _reference(x, *parts)
    assert got.shape == (20, 200)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fp16_scales_are_widened():
    rng = np.random.default_rng(1)
    w = mx.array(rng.standard_normal((64, 256)).astype(np.float32))
    q, s, b = mx.quantize(w, group_size=64, bits=4)
    s, b = s.astype(mx.float16), b.astype(mx.float16)
    x = rng.standard_normal((17, 256)).astype(np.float32)
    got = blas.matmul_t(x, q, s, b, 64, 4)
    # fp16 scales are exact in float32: the product is that of the widened scales, not of a
    # float16 dequantization (which rounds every weight to 11 bits)
    wide = _reference(x, q, s.astype(mx.float32), b.astype(mx.float32), 64, 4)
    np.testing.assert_allclose(got, wide, rtol=1e-5, atol=1e-5)


def test_applies_only_to_many_rows_of_large_float32_or_packed_weights():
    assert blas.applies(blas.MIN_ROWS, 4096, 4096, mx.uint32)
    assert blas.applies(64, 1024, 1024, mx.float32)
    assert not blas.applies(blas.MIN_ROWS - 1, 4096, 4096, mx.uint32)  # decode, short prompts
    assert not blas.applies(64, 64, 64, mx.float32)  # tiny weights stay lazy in MLX
    assert not blas.applies(64, 4096, 4096, mx.bfloat16)


def test_swiglu_by_expert_equals_mlx_kernels(monkeypatch):
    """Rows grouped by expert: those with many rows through BLAS, the rest through gather_qmm;
    the result equals MLX's kernels for every row, in the callers' row order."""
    rng = np.random.default_rng(2)
    E, H, F = 4, 128, 256

    def stacked(out, inp):
        w = mx.array(rng.standard_normal((E, out, inp)).astype(np.float32) * 0.1)
        q, s, b = mx.quantize(w, group_size=64, bits=4)
        return Projection(q, s, b, 64, 4)

    w = {"gate_proj": stacked(F, H), "up_proj": stacked(F, H), "down_proj": stacked(H, F)}
    counts = [blas.MIN_ROWS + 4, 3, 0, blas.MIN_ROWS]  # experts 0 and 3 through BLAS, 1 not
    inds = mx.array(np.repeat(np.arange(E), counts).astype(np.uint32))
    x = mx.array(rng.standard_normal((sum(counts), 1, H)).astype(np.float32))
    want = swiglu(x, w, inds, sorted_inds=True)  # MIN_WEIGHTS keeps this small case in MLX
    calls = []
    _forced(monkeypatch, calls)
    got = swiglu(x, w, inds, sorted_inds=True)
    assert len(calls) == 6  # two experts x three projections went through BLAS
    assert got.shape == want.shape
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)


def _forced(monkeypatch, calls: list) -> None:
    """Route even a tiny model's products through BLAS, counting them."""
    monkeypatch.setattr(blas, "MIN_WEIGHTS", 1)
    monkeypatch.setattr(blas, "matmul_t", lambda *a, _f=blas.matmul_t: calls.append(1) or _f(*a))


def test_prompt_through_blas_matches_transformers(tiny_mixtral, monkeypatch):
    """A float model's prompt (attention, experts, head) through BLAS equals transformers."""
    from model import load
    from tests.checkpoints import reference_logits

    ids = np.random.RandomState(3).randint(3, 32000, size=(1, 40))
    calls = []
    _forced(monkeypatch, calls)
    model, _ = load(tiny_mixtral)
    ours = np.array(model(mx.array(ids)))
    assert calls  # the route was taken
    assert np.abs(ours - reference_logits(tiny_mixtral, ids)).max() <= 1e-4


def test_quantized_prompt_through_blas_equals_mlx_kernels(tiny_mixtral, monkeypatch):
    """4-bit weights: a prompt through BLAS gives MLX's logits, and the decode step after it
    (one row: MLX's kernels) continues from the same cache."""
    import mlx.nn as nn

    from model import load

    model, _ = load(tiny_mixtral)
    nn.quantize(model, group_size=32, bits=4)
    ids = mx.array(np.random.RandomState(4).randint(3, 32000, size=(1, 40)))
    want = np.array(model(ids))
    calls = []
    _forced(monkeypatch, calls)
    cache = model.make_cache()
    got = np.array(model(ids[:, :39], cache=cache))
    last = np.array(model(ids[:, 39:], cache=cache))
    assert calls
    np.testing.assert_allclose(got, want[:, :39], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(last[0, -1], want[0, -1], rtol=1e-3, atol=1e-4)
