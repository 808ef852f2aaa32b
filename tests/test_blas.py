"""model.blas: many-row products (and attention) through numpy's BLAS equal MLX's
dequantize-then-multiply, forward and backward (MLX's own autograd)."""

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


def test_small_weights_take_the_route_from_fewer_rows():
    """The default model's projections (576 x 1536) dequantize in cache: a few rows gain."""
    assert blas.applies(blas.MIN_ROWS_SMALL, 1536, 576, mx.uint32)
    assert blas.applies(blas.MIN_ROWS_SMALL, 192, 576, mx.uint32)
    assert not blas.applies(1, 1536, 576, mx.uint32)  # decode stays with MLX
    assert not blas.applies(blas.MIN_ROWS_SMALL - 1, 1536, 576, mx.uint32)
    assert not blas.applies(blas.MIN_ROWS - 1, 14336, 4096, mx.uint32)  # large: MIN_ROWS
    q = mx.zeros((1, 9, blas.MIN_QUERIES, 64))
    assert blas.attention_applies(q, mx.zeros((1, 3, 2000, 64)))
    assert not blas.attention_applies(q[:, :, :1], mx.zeros((1, 3, 2000, 64)))  # decode
    assert not blas.attention_applies(q, mx.zeros((1, 3, 8, 64)))  # a short prompt
    assert not blas.attention_applies(q, (mx.zeros((1, 3, 2000, 8)),) * 3)  # quantized cache


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


def _weights(bits: int | None, out_features: int, in_features: int, seed: int) -> tuple:
    """matmul_t's parts and the float weight MLX's reference multiplies by."""
    rng = np.random.default_rng(seed)
    w = mx.array(rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.1)
    if bits is None:
        return (w, None, None, 64, None, "affine"), w
    q, s, b = mx.quantize(w, group_size=32, bits=bits)
    return (q, s, b, 32, bits, "affine"), mx.dequantize(q, s, b, group_size=32, bits=bits)


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_linear_gradient_equals_mlx_autograd(monkeypatch, bits):
    """d(input) through BLAS (the custom VJP) equals MLX's dequantize-then-matmul autograd."""
    monkeypatch.setattr(blas, "BLOCK_ELEMENTS", 64 * 96)  # several blocks, a ragged last
    parts, dense = _weights(bits, 200, 96, seed=5)
    x = mx.array(np.random.default_rng(6).standard_normal((2, 9, 96)).astype(np.float32))
    target = mx.array(np.random.default_rng(7).standard_normal((2, 9, 200)).astype(np.float32))

    def loss(h, product):
        return ((product(mx.tanh(h)) - target) ** 2).mean()

    ours, d_ours = mx.value_and_grad(loss)(x, lambda h: blas.linear(h, *parts))
    want, d_want = mx.value_and_grad(loss)(x, lambda h: h @ dense.T)
    assert abs(ours.item() - want.item()) <= 1e-5 * abs(want.item())
    np.testing.assert_allclose(np.array(d_ours), np.array(d_want), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bits", [None, 4])
def test_swiglu_gradient_equals_mlx_autograd(bits):
    import mlx.nn as nn

    (gate, g), (up, u), (down, d) = (_weights(bits, *shape, seed=i) for i, shape in
                                     enumerate([(96, 64), (96, 64), (64, 96)]))  # fmt: skip
    x = mx.array(np.random.default_rng(8).standard_normal((11, 64)).astype(np.float32))

    def loss(h, mlp):
        return (mlp(h) ** 2).sum()

    ours, d_ours = mx.value_and_grad(loss)(x, lambda h: blas.swiglu(h, gate, up, down))
    want, d_want = mx.value_and_grad(loss)(x, lambda h: (nn.silu(h @ g.T) * (h @ u.T)) @ d.T)
    np.testing.assert_allclose(ours.item(), want.item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(d_ours), np.array(d_want), rtol=1e-4, atol=1e-6)


def _reference_attention(q, k, v, scale, mask):
    """Grouped-query attention written out in MLX ops (their autograd is the reference)."""
    rep = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if isinstance(mask, str):
        L, S = q.shape[2], k.shape[2]
        mask = mx.arange(S)[None] <= (S - L + mx.arange(L))[:, None]
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    return mx.softmax(scores, axis=-1, precise=True) @ v


@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
def test_attention_equals_mlx_forward_and_backward(mask):
    """Scores and values through BLAS equal MLX's SDPA; their gradients (q, k, v) equal MLX's
    autograd of the same attention. 6 heads over 2 kv heads, 5 new queries after 7 cached."""
    rng = np.random.default_rng(9)
    q, k, v = (mx.array(rng.standard_normal(shape).astype(np.float32))
               for shape in [(2, 6, 5, 16), (2, 2, 12, 16), (2, 2, 12, 16)])  # fmt: skip
    if mask == "bool":
        mask = mx.array(rng.random((2, 6, 5, 12)) < 0.7) | (mx.arange(12) == 0)
    elif mask == "additive":
        mask = mx.array(rng.standard_normal((2, 1, 5, 12)).astype(np.float32))
    scale = 0.3
    got = blas.attention(q, k, v, scale, mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)

    def loss(q, k, v, attend):
        return (attend(q, k, v) * mx.arange(16)).sum()

    grads = mx.grad(loss, argnums=(0, 1, 2))
    ours = grads(q, k, v, lambda *a: blas.attention(*a, scale, mask))
    theirs = grads(q, k, v, lambda *a: _reference_attention(*a, scale, mask))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


def test_swiglu_by_expert_gradient_equals_mlx_autograd(monkeypatch):
    """Experts with many rows through BLAS, the others through gather_qmm: d(x) equals MLX's
    autograd of its own kernels."""
    rng = np.random.default_rng(10)
    E, H, F = 3, 64, 96

    def stacked(out, inp):
        w = mx.array(rng.standard_normal((E, out, inp)).astype(np.float32) * 0.1)
        return Projection(*mx.quantize(w, group_size=32, bits=4), 32, 4)

    w = {"gate_proj": stacked(F, H), "up_proj": stacked(F, H), "down_proj": stacked(H, F)}
    counts = [blas.MIN_ROWS + 2, 5, blas.MIN_ROWS]
    inds = mx.array(np.repeat(np.arange(E), counts).astype(np.uint32))
    x = mx.array(rng.standard_normal((sum(counts), 1, H)).astype(np.float32))

    def loss(h):
        return (swiglu(h, w, inds, sorted_inds=True) ** 2).sum()

    want = mx.grad(loss)(x)  # MIN_WEIGHTS keeps this small case in MLX
    calls = []
    _forced(monkeypatch, calls)
    got = mx.grad(loss)(x)
    assert calls
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-3, atol=1e-5)


def test_loss_through_the_model_trains_through_blas(monkeypatch):
    """mx.value_and_grad of a next-token loss through a tiny 4-bit dense model's forward: with
    every product (projections, MLP, attention, tied head) through BLAS, the loss and the
    gradients of the trainable norms equal those of MLX's kernels. (The experts' backward is
    test_swiglu_by_expert_gradient_equals_mlx_autograd: MLX cannot differentiate the MoE
    layer's routing gathers, with or without BLAS.)"""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from model.config import ModelArgs
    from model.mixtral import Model

    mx.random.seed(11)
    args = ModelArgs("llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     tie_word_embeddings=True)  # fmt: skip
    model = Model(args)
    nn.quantize(model, group_size=32, bits=4)
    model.freeze()
    for _, module in model.named_modules():
        if isinstance(module, nn.RMSNorm):
            module.unfreeze()  # trainable, upstream of every product
    assert len(tree_flatten(model.trainable_parameters())) == 2 * 2 + 1
    ids = mx.array(np.random.RandomState(12).randint(0, 256, size=(2, 48)))

    def loss(m):
        logits = m(ids[:, :-1])
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()

    want, g_want = nn.value_and_grad(model, loss)(model)
    calls = []
    _forced(monkeypatch, calls)
    got, g_got = nn.value_and_grad(model, loss)(model)
    assert calls
    np.testing.assert_allclose(got.item(), want.item(), rtol=1e-5)
    for (name, a), (_, b) in zip(tree_flatten(g_got), tree_flatten(g_want)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-3, atol=1e-5, err_msg=name)
