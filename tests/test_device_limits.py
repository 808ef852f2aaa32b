"""The budget on an Apple GPU: the wired limit (as mlx-lm sets it) and MLX's buffer cache bounded
by the memory plan, checked with a fake Metal device (MLX runs on its CPU backend here, where
nothing may be set); half precision on a GPU."""

from __future__ import annotations

import gc
from dataclasses import replace

import mlx.core as mx
import pytest

from model import Engine, load, weights
from model.device_limits import plan_limits
from model.memory_plan import MemoryDecision, memory_plan
from model.sizes import parse_budget
from tests.checkpoints import quantized_moe

CONTEXT = 256
GIB = 2**30


class FakeMetal:
    """Records the limits set, as MLX's functions would (each returns the previous value)."""

    def __init__(self, working_set: int = 16 * GIB):
        self.info = {"device_name": "Apple M-fake", "max_recommended_working_set_size": working_set}
        self.wired, self.cache = 0, 8 * GIB  # MLX's limits before anything is set
        self.calls: list[tuple[str, int]] = []

    def install(self, monkeypatch):
        monkeypatch.setattr(mx.metal, "is_available", lambda: True)
        monkeypatch.setattr(mx, "device_info", lambda: dict(self.info))
        monkeypatch.setattr(mx, "set_wired_limit", self.set_wired_limit)
        monkeypatch.setattr(mx, "set_cache_limit", self.set_cache_limit)
        return self

    def set_wired_limit(self, n: int) -> int:
        self.calls.append(("wired", n))
        old, self.wired = self.wired, n
        return old

    def set_cache_limit(self, n: int) -> int:
        self.calls.append(("cache", n))
        old, self.cache = self.cache, n
        return old


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    """A 2-layer, 8-expert top-2 Mixtral quantized to 4 bits (experts can stream)."""
    return quantized_moe(tmp_path_factory.mktemp("metal"), 2, "float16")


@pytest.fixture(scope="module")
def plan(tiny_q4):
    return memory_plan(weights.locate(tiny_q4), 4, CONTEXT)


def test_a_model_that_fits_gets_the_wired_limit_and_keeps_the_cache(tiny_q4, monkeypatch):
    metal = FakeMetal().install(monkeypatch)
    engine = Engine.load(str(tiny_q4), memory_budget="none", max_context=CONTEXT)
    assert metal.calls == [("wired", 16 * GIB)]  # mlx-lm's: the recommended working set
    limits = engine.model.device_limits
    assert limits.cache_limit is None and limits.warning == ""
    assert engine.memory_notice == ""
    assert limits.model_bytes == engine.model.memory.plan.full_bytes
    del engine
    gc.collect()  # an unloaded model gives the limit back, as mlx-lm's generator does
    assert metal.calls[-1] == ("wired", 0) and metal.wired == 0


def test_under_a_budget_freed_buffers_stay_within_it(tiny_q4, plan, monkeypatch):
    metal = FakeMetal().install(monkeypatch)
    budget = plan.minimum_budget + 3 * plan.expert_bytes  # a few experts of cache: they stream
    engine = Engine.load(str(tiny_q4), memory_budget=budget, max_context=CONTEXT)
    assert engine.offload is not None
    limits = engine.model.device_limits
    assert [name for name, _ in metal.calls] == ["wired", "cache"]
    assert metal.wired == 16 * GIB and metal.cache == limits.cache_limit
    # weights in memory + the expert cache (its capacity with an empty KV cache, which it
    # gives up as the KV cache grows) + what MLX may keep of freed buffers: the budget
    resident = engine.model.memory.plan.resident_bytes
    assert resident + engine.offload.capacity + limits.cache_limit <= budget
    # an evicted expert's buffers can be kept for the next read instead of reallocated
    assert limits.cache_limit >= plan.expert_bytes
    assert limits.model_bytes == budget
    text = "".join(c.text for c in engine.stream_text("Hello", _greedy()))
    assert text  # decoding works with the limits in place
    del engine
    gc.collect()
    assert metal.wired == 0 and metal.cache == 8 * GIB  # both restored


def test_limits_are_restored_after_the_last_model_only(tiny_q4, plan, monkeypatch):
    metal = FakeMetal().install(monkeypatch)
    first, _ = load(tiny_q4, memory_budget="none", max_context=CONTEXT)
    second, _ = load(tiny_q4, memory_budget=plan.minimum_budget, max_context=CONTEXT)
    del first
    gc.collect()
    assert metal.wired == 16 * GIB  # the second model still runs with it
    del second
    gc.collect()
    assert metal.wired == 0 and metal.cache == 8 * GIB


def test_a_model_close_to_the_working_set_is_warned(tiny_q4, plan, monkeypatch):
    working_set = int(plan.full_bytes * 1.05)  # the model needs over 90% of it
    metal = FakeMetal(working_set).install(monkeypatch)
    engine = Engine.load(str(tiny_q4), memory_budget="none", max_context=CONTEXT)
    notice = engine.memory_notice
    assert "\n" not in notice and notice.startswith("warning: q4 needs")
    assert "expect it to be slow" in notice
    # this tiny model's prompt activations alone take most of it: no budget would help
    assert "--memory-budget" not in notice
    assert metal.calls == [("wired", working_set)]


def test_a_large_moe_is_told_the_budget_that_keeps_it_within_the_gpu(plan):
    """A 30 GB MoE on a GPU with a 16 GB working set: loaded whole it is warned, with a budget
    that streams its experts within 90% of the working set; under an 8 GB budget it is not,
    and freed buffers are bounded to what the budget leaves."""
    big = replace(plan, total_expert_bytes=30 * GIB, expert_bytes=30 * GIB // 256)
    whole = plan_limits(16 * GIB, MemoryDecision(big, None, False, CONTEXT), name="big")
    assert whole.cache_limit is None and whole.model_bytes == big.full_bytes
    assert whole.warning.startswith("warning: big needs")
    suggested = parse_budget(whole.warning.split("--memory-budget ")[1].split()[0])
    assert big.minimum_budget <= suggested <= 0.9 * 16 * GIB
    assert big.needs_offload(suggested)

    budget = 8 * GIB
    streamed = plan_limits(16 * GIB, MemoryDecision(big, budget, True, CONTEXT), name="big")
    assert streamed.warning == "" and streamed.wired_limit == 16 * GIB
    held = big.resident_bytes + big.cache_bytes(budget) + big.kv_bytes
    assert 0 < streamed.cache_limit and held + streamed.cache_limit <= budget


def test_on_the_cpu_nothing_is_set(tiny_q4, plan, monkeypatch):
    assert not mx.metal.is_available()  # this machine: MLX's CPU backend
    calls = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(("wired", n)) or 0)
    monkeypatch.setattr(mx, "set_cache_limit", lambda n: calls.append(("cache", n)) or 0)
    engine = Engine.load(str(tiny_q4), memory_budget=plan.minimum_budget, max_context=CONTEXT)
    assert engine.offload is not None
    assert calls == [] and getattr(engine.model, "device_limits", None) is None


def test_half_precision_on_a_gpu(tiny_q4, tiny_mistral_windowed, monkeypatch):
    """Weights, quantization scales and compute stay in the checkpoint's half precision on a
    GPU (float32 only on MLX's CPU backend)."""

    class Gpu:
        type = mx.DeviceType.gpu

    assert weights.compute_dtype(weights.locate(tiny_q4)) == mx.float32  # here, a CPU
    monkeypatch.setattr(mx, "default_device", lambda: Gpu())
    assert weights.compute_dtype(weights.locate(tiny_q4)) == mx.float16
    assert weights.compute_dtype(weights.locate(tiny_mistral_windowed)) == mx.bfloat16


def _greedy():
    from model import GenerationSettings

    return GenerationSettings(max_tokens=4, temperature=0.0)
