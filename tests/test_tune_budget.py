"""mixchat tune under a memory budget: experts stream, layer by layer (model/tune/streamed.py).
The budgeted run learns the same adapter as the resident one, reading experts from disk; a
budget below training's minimum is refused in one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from app.cli import main
from model import load, weights
from model.memory_plan import memory_plan, training_minimum
from model.offload import runtime_of
from model.tune.data import load_dataset
from model.tune.lora import apply_lora, lora_config
from model.tune.streamed import StreamedTrainer, prepare
from model.tune.train import TrainConfig, Trainer
from tests.checkpoints import quantized_moe

SEQ = 64  # max_context the models are loaded with (rows are shorter)
CHATS = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                  {"role": "assistant", "content": f"It is {2 * i}, of course."}]}
    for i in range(6)
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    """A 4-layer, 8-expert top-2 Mixtral quantized to 4 bits by `mixchat quantize`."""
    return quantized_moe(tmp_path_factory.mktemp("tune_budget"), 4, "float32")


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(c) for c in CHATS) + "\n")
    (tmp_path / "valid.jsonl").write_text("\n".join(json.dumps(c) for c in CHATS[:2]) + "\n")
    return tmp_path


def train(path: Path, data_dir: Path, out: Path, budget) -> tuple[dict, object]:
    """Three steps of LoRA on all layers (seed 3); (the adapter, the model)."""
    model, tokenizer = load(str(path), memory_budget=budget, max_context=SEQ)
    streamed = prepare(model)
    data = load_dataset(str(data_dir), tokenizer, SEQ, True)
    config = lora_config(model, -1, 4)
    mx.random.seed(3)
    apply_lora(model, config)
    trainer_class = StreamedTrainer if streamed else Trainer
    trainer = trainer_class(model, data, TrainConfig(iters=3, batch_size=2, learning_rate=1e-2,
                            seed=3, steps_per_eval=2, save_every=3), out, config)  # fmt: skip
    if streamed:  # the smallest expert cache: one layer's experts (every layer read again)
        runtime = runtime_of(model)
        runtime.cache.resize(model.args.num_local_experts * runtime.store.expert_bytes(0))
    trainer.run()
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}, model


def test_budgeted_run_learns_the_same_adapter_reading_experts(tiny_q4, data_dir, tmp_path):
    plan = memory_plan(weights.locate(tiny_q4), 4, SEQ)
    resident, model = train(tiny_q4, data_dir, tmp_path / "whole", "none")
    assert runtime_of(model) is None
    budget = plan.minimum_budget + plan.expert_bytes  # below the whole model: experts stream
    streamed, model = train(tiny_q4, data_dir, tmp_path / "streamed", budget)
    runtime = runtime_of(model)
    assert runtime is not None
    # every step: each layer read in the forward pass and again in the backward pass
    assert runtime.counters.reads >= 3 * 2 * 4 * 2
    assert runtime.cache.peak <= 8 * runtime.store.expert_bytes(0)
    assert set(streamed) == set(resident)
    assert any("switch_mlp.down_proj.lora_b" in k for k in streamed)
    for name, value in resident.items():
        assert np.abs(value).max() > 0 or "lora_b" not in name  # it learned something
        scale = np.abs(value).max() + 1e-6
        assert np.abs(streamed[name] - value).max() <= 1e-4 * scale, name
    saved = mx.load(str(tmp_path / "streamed" / "adapters.safetensors"))
    assert set(saved) == set(streamed)


def test_budget_below_the_training_minimum_is_refused_naming_it(tiny_q4, data_dir, tmp_path,
                                                               capsys):  # fmt: skip
    plan = memory_plan(weights.locate(tiny_q4), 4, SEQ)
    model, _ = load(str(tiny_q4), memory_budget="none", max_context=SEQ)
    parts = training_minimum(plan, model.args, 4, 20, 8, -1, 4)
    minimum = sum(parts.values())
    assert plan.minimum_budget < minimum  # training needs more than inference
    budget = plan.minimum_budget + plan.expert_bytes
    assert budget < minimum
    code = main(["tune", "--model", str(tiny_q4), "--data", str(data_dir), "--memory-budget",
                 str(budget), "--num-layers", "-1", "--iters", "1", "--max-seq-length", str(SEQ),
                 "--adapter-path", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "below the minimum of" in err and "for training" in err
    assert "LoRA + optimizer" in err and "experts" in err


def test_a_training_backward_holds_one_block_of_float32_weights_not_the_weight(monkeypatch):
    """Training's backward through a quantized many-row product (model/blas.py, the streamed
    experts' route) dequantizes the weight block by block; inside the VJP (an MLX transform)
    those blocks must be freed as they go, not kept until the layer's backward ends: that kept
    ~4 GB for one full-size Mixtral layer (BENCHMARKS.md)."""
    from model import blas

    out_features, in_features = 2048, 1024
    float32_bytes = out_features * in_features * 4  # 8 MB dequantized
    monkeypatch.setattr(blas, "BLOCK_ELEMENTS", out_features * in_features // 16)
    w = mx.random.normal((out_features, in_features)) * 0.02
    weight, scales, biases = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((64, in_features))
    mx.eval(weight, scales, biases, x)

    def loss(x):
        return blas.linear(x, weight, scales, biases, 64, 4).sum()

    base = mx.get_active_memory()
    mx.reset_peak_memory()
    dx = mx.grad(loss)(x)
    mx.eval(dx)
    assert mx.get_peak_memory() - base < float32_bytes / 4
    expected = mx.ones((64, out_features)) @ mx.dequantize(weight, scales, biases, 64, 4)
    assert np.allclose(np.array(dx), np.array(expected), atol=1e-4)


def test_a_moe_layers_lora_backward_keeps_one_experts_intermediates_not_all():
    """Past BOUNDED_BACKWARD_BYTES the layer's LoRA experts (one numpy op, its VJP written
    out) keep only rank-sized products for the backward, gate and up outputs recomputed there:
    MLX's autograd kept every expert's [rows, FFN] intermediates (~22 per row) until the
    layer's backward ended, ~1.3 GB for a 512-token Mixtral step
    (benchmarks/bench_tune_backward.py)."""
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.tuner.lora import LoRASwitchLinear

    from model.experts import PROJECTIONS, RowGroups, lora_swiglu_by_expert

    D, F, E, R = 256, 1024, 8, 2048
    mx.random.seed(0)
    shapes = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    mods = {n: LoRASwitchLinear.from_base(SwitchLinear(i, o, E, bias=False).to_quantized(64, 4),
                                          r=8) for n, (i, o) in shapes.items()}  # fmt: skip
    inds = np.arange(R) % E
    groups = RowGroups.of(inds[:, None])
    order = mx.array(groups.order)
    rows, flat = mx.random.normal((R, D))[order], mx.array(inds)[order]
    mx.eval([m.parameters() for m in mods.values()], rows, flat)

    def loss(params, rows):
        for n in PROJECTIONS:
            mods[n].update(params[n])
        return lora_swiglu_by_expert(rows, mods, groups, flat).sum()

    params = {n: m.trainable_parameters() for n, m in mods.items()}
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    grads = mx.grad(loss, argnums=(0, 1))(params, rows)
    mx.eval(grads)
    all_rows_ffn = R * F * 4  # one [rows, FFN] float32 array over all the layer's rows
    assert mx.get_peak_memory() - base < 8 * all_rows_ffn  # before: 23x; now: 5.4x
    assert np.isfinite(np.array(grads[1])).all()


@pytest.mark.parametrize("recompute", [False, True])
def test_the_numpy_lora_experts_vjp_equals_mlx_autograd(monkeypatch, recompute):
    """The LoRA experts' one numpy op (experts.numpy_lora_swiglu: its VJP written out, gate and
    up outputs kept, or recomputed past BOUNDED_BACKWARD_BYTES) gives the output, d(rows) and
    every lora_a/lora_b gradient of MLX's autograd through the same experts (_plain_expert)."""
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.tuner.lora import LoRASwitchLinear

    import model.experts as experts

    D, F, E, R = 64, 128, 4, 64
    mx.random.seed(1)
    shapes = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    mods = {n: LoRASwitchLinear.from_base(SwitchLinear(i, o, E, bias=False).to_quantized(64, 4),
                                          r=4) for n, (i, o) in shapes.items()}  # fmt: skip
    for m in mods.values():
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1  # nonzero: gradients reach lora_a
    inds = np.arange(R) % E
    inds[:2] = E - 1  # expert 0 gets 14 rows, the last 18: spans of unequal length
    groups = experts.RowGroups.of(inds[:, None])
    order = mx.array(groups.order)
    rows, flat = mx.random.normal((R, D))[order], mx.array(inds)[order]
    cotangent = mx.random.normal((R, D))
    monkeypatch.setattr(experts.blas, "MIN_WEIGHTS", 0)  # these small weights through BLAS too
    monkeypatch.setattr(experts, "BOUNDED_BACKWARD_BYTES", 0 if recompute else 1 << 40)
    calls = []
    monkeypatch.setattr(experts, "numpy_lora_swiglu",
                        lambda *a, f=experts.numpy_lora_swiglu: calls.append(a[-1]) or f(*a))  # fmt: skip

    def vjp():
        def f(params, x):
            for n in experts.PROJECTIONS:
                mods[n].update(params[n])
            return experts.lora_swiglu_by_expert(x, mods, groups, flat)

        params = {n: m.trainable_parameters() for n, m in mods.items()}
        out = f(params, rows)
        grads, dx = mx.grad(lambda p, x: (f(p, x) * cotangent).sum(), argnums=(0, 1))(params, rows)
        mx.eval(out, grads, dx)
        return out, grads, dx

    got = vjp()
    assert calls == [recompute, recompute]
    monkeypatch.setattr(experts, "numpy_lora_applies", lambda *a: False)
    monkeypatch.setattr(experts, "BOUNDED_BACKWARD_BYTES", 1 << 40)  # MLX's autograd as it stands
    want = vjp()
    assert len(calls) == 2
    def close(a: mx.array, b: mx.array) -> bool:  # float32 rounding of sums of ~100 terms
        a, b = np.array(a), np.array(b)
        return np.abs(a - b).max() <= 1e-5 * np.abs(b).max() and np.abs(b).max() > 1e-3

    assert close(got[0], want[0]) and close(got[2], want[2])
    for n in experts.PROJECTIONS:
        for part in ("lora_a", "lora_b"):  # every gradient non-trivial and equal
            assert close(got[1][n][part], want[1][n][part]), (n, part)
