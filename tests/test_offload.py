"""Experts streamed under a memory budget: same greedy tokens, exact byte accounting within the
budget, eviction policies on scripted accesses, prefetch."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from model import Engine, GenerationSettings, offload, weights
from model.errors import CheckpointError, MixchatError
from model.memory_plan import memory_plan
from model.offload import (
    POLICIES,
    ExpertCache,
    OffloadedExperts,
    OffloadOptions,
    OffloadRuntime,
    Prefetch,
    runtime_of,
)
from tests.checkpoints import build_hf_checkpoint, quantized_moe

# Long enough (> 32 tokens) that the unbudgeted model takes its prefill (sorted gather) path.
MESSAGES = [{"role": "user", "content": "Explique la différence entre un modèle dense et un "
             "mélange d'experts, puis donne trois exemples concrets en Python, s'il te plaît."}]  # fmt: skip
GREEDY = GenerationSettings(max_tokens=16, temperature=0.0)
ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 256  # every budgeted engine here plans its KV cache for this many tokens


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    """A 4-layer, 8-expert top-2 Mixtral quantized to 4 bits by `mixchat quantize`."""
    return quantized_moe(tmp_path_factory.mktemp("offload"), 4, "float16")


@pytest.fixture(scope="module")
def plan(tiny_q4):
    return memory_plan(weights.locate(tiny_q4), 4, CONTEXT)


@pytest.fixture(scope="module")
def reference(tiny_q4):
    engine = Engine.load(str(tiny_q4))
    chunks = list(engine.stream(MESSAGES, GREEDY))
    assert len(engine.tokenizer.encode_chat(MESSAGES)) * 2 >= 64
    return "".join(c.text for c in chunks), chunks[-1].stats


def run(engine: Engine):
    chunks = list(engine.stream(MESSAGES, GREEDY))
    return "".join(c.text for c in chunks), chunks[-1].stats


def cached_array_bytes(cache: ExpertCache) -> int:
    total = 0
    for key in cache.keys():
        value = cache.get(key)
        for arrays in value.values():
            total += sum(a.nbytes for a in arrays if a is not None)
    return total


def test_greedy_tokens_identical_and_cache_within_budget(tiny_q4, plan, reference):
    budget = plan.minimum_budget + 4 * plan.expert_bytes  # 12 of 32 experts
    engine = Engine.load(str(tiny_q4), memory_budget=budget, max_context=CONTEXT)
    runtime = runtime_of(engine.model)
    assert runtime is not None and engine.offload is runtime
    # The experts are neither parameters of the model nor ever read whole.
    names = [n for n, _ in __import__("mlx.utils").utils.tree_flatten(engine.model.parameters())]
    assert names and not any(".switch_mlp." in n for n in names)
    # With an empty KV cache, the expert cache may use the KV cache's share too...
    assert runtime.cache.capacity == plan.cache_bytes(budget, kv_bytes=0)
    assert runtime.cache.capacity == budget - plan.resident_bytes - plan.reserve_bytes + plan.kv_bytes
    text, stats = run(engine)
    assert text == reference[0]
    # ... and gives it back as the conversation grows: experts + KV never pass their share.
    kv = sum(c.nbytes for c in engine._cache)
    assert 0 < kv <= plan.kv_bytes and runtime.kv_bytes == kv
    assert runtime.cache.capacity == plan.cache_bytes(budget, kv_bytes=kv)
    assert runtime.cache.used + kv <= plan.cache_bytes(budget, kv_bytes=0)
    assert runtime.cache.peak <= runtime.capacity
    assert runtime.cache.used == cached_array_bytes(runtime.cache)  # bytes counted exactly
    assert 0 < stats.expert_hit_rate < 1
    assert stats.bytes_read_per_token > 0 and stats.load_seconds >= 0
    assert stats.compute_seconds > 0
    assert stats.generation_tokens == reference[1].generation_tokens
    # A second turn reuses the KV cache and still matches.
    engine.reset()
    assert run(engine)[0] == reference[0]


def with_options(monkeypatch, chosen: OffloadOptions) -> None:
    """Engines loaded from now on attach their experts with `chosen`, whatever they pass."""
    attach = offload.attach

    def attach_with_options(model, checkpoint, capacity, dtype, options=None):
        return attach(model, checkpoint, capacity, dtype, chosen)

    monkeypatch.setattr(offload, "attach", attach_with_options)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_and_prefetch_gives_the_same_tokens(tiny_q4, plan, reference, monkeypatch,
                                                         policy):  # fmt: skip
    with_options(monkeypatch, OffloadOptions(policy=policy, prefetch=policy == "lru"))
    # The smallest budget: 2 experts in all (a quota of 2 per layer for per-layer policies),
    # so a prompt's layer is computed in groups of experts.
    budget = plan.minimum_budget
    if policy.endswith("-layer"):
        budget += (plan.moe_layers - 1) * plan.top_k * plan.expert_bytes
    if policy == "lru":  # room for prefetched guesses beside the experts in use
        budget += 4 * plan.expert_bytes
    engine = Engine.load(str(tiny_q4), memory_budget=budget, max_context=CONTEXT)
    runtime = runtime_of(engine.model)
    assert runtime.cache.policy == policy and runtime.prefetch_enabled == (policy == "lru")
    seen = []
    original = runtime.cache._add

    def spy(layer, nbytes):
        original(layer, nbytes)
        seen.append(runtime.cache.used - runtime.cache.capacity)  # never above the capacity
        if runtime.cache.per_layer:
            assert runtime.cache.scope_used(layer) <= runtime.cache.quota

    runtime.cache._add = spy
    text, stats = run(engine)
    assert text == reference[0]
    assert seen and max(seen) <= 0
    assert runtime.cache.used == cached_array_bytes(runtime.cache)
    if policy == "lru":
        assert runtime.snapshot().prefetch_reads > 0


def test_budget_that_holds_everything_loads_normally(tiny_q4, plan, reference):
    engine = Engine.load(str(tiny_q4), memory_budget=plan.full_bytes, max_context=CONTEXT)
    assert engine.offload is None
    text, stats = run(engine)
    assert text == reference[0] and stats.expert_hit_rate is None


@pytest.mark.parametrize("route", ["mlx", "blas"])
def test_offloaded_experts_match_stacked_experts(tiny_q4, plan, route, monkeypatch):
    """Prefill-sized batches (sorted path) and decode-sized ones, against `mixtral.Experts`;
    with `blas`, experts with many rows go through model/blas.py in both."""
    if route == "blas":
        from model import blas

        monkeypatch.setattr(blas, "MIN_WEIGHTS", 1)
        monkeypatch.setattr(blas, "MIN_ROWS", 8)
    full = weights.build_model(weights.locate(tiny_q4))
    checkpoint = weights.locate(tiny_q4)
    memory = weights.plan_memory(checkpoint, None, plan.minimum_budget, CONTEXT)
    small = weights.build_model(checkpoint, memory=memory)
    reference = full.layers[1].block_sparse_moe.switch_mlp
    offloaded = small.layers[1].block_sparse_moe.switch_mlp
    assert isinstance(offloaded, OffloadedExperts)
    rng = np.random.default_rng(0)
    for n in (1, 3, 40):
        x = mx.array(rng.standard_normal((n, 64)).astype(np.float32))
        inds = mx.array(np.stack([rng.choice(8, 2, replace=False) for _ in range(n)]))
        expected = np.array(reference(x, inds))
        assert np.array_equal(np.array(offloaded(x, inds)), expected)


@pytest.mark.parametrize("stored", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("target", [mx.float32, mx.float16, mx.bfloat16])
def test_expert_reads_convert_like_astype(stored, target):
    from model.offload.module import _as_float
    from model.offload.store import ExpertStore, _Slice

    rng = np.random.default_rng(0)
    values = (rng.standard_normal(4096) * rng.choice([1e-3, 1, 1e3], 4096)).astype(np.float32)
    reference = {"F32": mx.array(values), "F16": mx.array(values.astype(np.float16)),
                 "BF16": mx.array(values).astype(mx.bfloat16)}[stored]  # fmt: skip
    raw = np.array(reference.view(mx.uint16) if stored == "BF16" else reference).view(np.uint8)
    store = ExpertStore.__new__(ExpertStore)
    store.dtype = target
    converted = _as_float(store._to_array(raw.reshape(-1), _Slice(0, 0, raw.size, stored, (4096,))))
    assert converted.dtype == target
    expected = reference.astype(target)
    assert np.array_equal(
        np.array(converted.astype(mx.float32)), np.array(expected.astype(mx.float32))
    )


# --- the cache, on scripted access sequences ---------------------------------------------------


def access(cache: ExpertCache, keys) -> list[bool]:
    return [cache.access(k, 10) for k in keys]


def test_lru_evicts_the_least_recently_used():
    cache = ExpertCache(30, "lru", layers=[0])
    a, b, c, d = (0, 0), (0, 1), (0, 2), (0, 3)
    assert access(cache, [a, b, c, a, d]) == [False, False, False, True, False]
    assert set(cache.keys()) == {a, c, d}  # b was the least recently used
    assert access(cache, [a, b]) == [True, False]  # b evicts c now
    assert set(cache.keys()) == {a, d, b} and cache.used == 30 and cache.evictions == 2


def test_lfu_evicts_the_least_frequently_used_then_the_oldest():
    cache = ExpertCache(30, "lfu", layers=[0])
    a, b, c, d, e = ((0, i) for i in range(5))
    access(cache, [a, a, b, b, c, d])  # c (1 use, older than d's) goes
    assert set(cache.keys()) == {a, b, d}
    access(cache, [e])  # d and e have 1 use each; d is older
    assert set(cache.keys()) == {a, b, e}
    # Frequencies survive eviction: c comes back with 2 uses and outlives e.
    access(cache, [c])
    access(cache, [c])
    assert (0, 2) in cache.keys() and cache.frequency[(0, 2)] == 3


def test_per_layer_quota_evicts_within_the_layer():
    cache = ExpertCache(40, "lru-layer", layers=[0, 1])  # 20 bytes per layer
    access(cache, [(0, 0), (0, 1), (1, 0)])
    access(cache, [(0, 2)])  # layer 0 is full: its LRU goes, layer 1 untouched
    assert set(cache.keys()) == {(0, 1), (0, 2), (1, 0)}
    global_cache = ExpertCache(40, "lru", layers=[0, 1])  # one pool: any layer's LRU goes
    access(global_cache, [(0, 0), (1, 0), (0, 1), (0, 2), (0, 3)])
    assert set(global_cache.keys()) == {(1, 0), (0, 1), (0, 2), (0, 3)}
    access(global_cache, [(0, 4)])
    assert (1, 0) not in global_cache and global_cache.used == 40


def test_next_use_keeps_hitting_where_lru_cycles_to_nothing():
    """Layers are visited in a cycle: with room for less than one token's experts, LRU always
    evicts the expert needed next; next-use evicts what the cycle reaches last."""
    layers = list(range(4))
    trace = [(layer, 0) for token in range(30) for layer in layers]  # the same expert each time
    hits = {}
    for policy in ("lru", "next-use"):
        cache = ExpertCache(30, policy, layers=layers)  # 3 of the 4 experts one token needs
        hits[policy] = sum(access(cache, trace))
    assert hits["lru"] == 0
    assert hits["next-use"] > len(trace) // 2  # most of what fits stays until it is needed
    auto = ExpertCache(30, "auto", layers=layers)
    auto.working_set = 40  # one token's experts: more than the capacity, so next-use applies
    assert sum(access(auto, trace)) == hits["next-use"]


def test_auto_is_next_use_only_below_one_tokens_experts():
    """The "auto" policy orders as LRU once the capacity holds one token's experts, as next-use
    below, following both the working set and resizes."""
    layers = list(range(4))
    trace = [(layer, 0) for token in range(30) for layer in layers]
    as_lru = ExpertCache(30, "auto", layers=layers)
    as_lru.working_set = 30
    assert sum(access(as_lru, trace)) == 0  # LRU's cycle: nothing stays until it is needed
    shrunk = ExpertCache(50, "auto", layers=layers)
    shrunk.working_set = 40
    shrunk.resize(30)
    next_use = ExpertCache(30, "next-use", layers=layers)
    assert sum(access(shrunk, trace)) == sum(access(next_use, trace)) > 0


def test_options_and_policies_import_without_mlx():
    """app/settings.py builds OffloadOptions before MLX is imported (usage errors stay fast)."""
    code = ("import sys; from model.offload import OffloadOptions, POLICIES; "
            "import model.routing_trace; OffloadOptions(); "
            "assert 'mlx' not in sys.modules, sorted(sys.modules)")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_pinned_and_loading_entries_are_never_evicted():
    cache = ExpertCache(20, "lru", layers=[0])
    assert cache.reserve((0, 0), 10) and cache.reserve((0, 1), 10)  # both still loading
    assert not cache.reserve((0, 2), 10) and cache.used == 20
    cache.fill((0, 0), "x")
    cache.fill((0, 1), "y")
    cache.pin((0, 0))
    cache.pin((0, 1))
    assert not cache.reserve((0, 2), 10)  # all pinned: refused, nothing evicted
    assert cache.evictions == 0
    cache.unpin((0, 0))
    assert cache.reserve((0, 2), 10) and (0, 0) not in cache and cache.used == 20
    assert not cache.reserve((0, 3), 30)  # larger than the capacity
    assert cache.peak <= cache.capacity


# --- prefetch ---------------------------------------------------------------------------------


class FakeStore:
    """Reads that block until released, counting what was read."""

    def __init__(self):
        self.gate = threading.Event()
        self.read_keys: list = []

    def expert_bytes(self, layer: int) -> int:
        return 10

    def read(self, layer: int, expert: int):
        self.gate.wait(5)
        self.read_keys.append((layer, expert))
        return {"expert": (layer, expert)}, 8

    def close(self) -> None:
        pass


def test_prefetch_reads_in_the_background_and_counts_hits():
    store = FakeStore()
    cache = ExpertCache(100, "lru", layers=[0, 1])
    runtime = OffloadRuntime(store, cache, top_k=2, prefetch=True, io_threads=1)
    store.gate.set()
    got = runtime.demand(0, [0, 1], prefetch=Prefetch(1, [2, 3]))
    assert got[0] == {"expert": (0, 0)} and got[1] == {"expert": (0, 1)}
    runtime._pool.submit(lambda: None).result()  # the single I/O thread has drained its queue
    assert (1, 2) in cache and (1, 3) in cache
    runtime.release()
    runtime.demand(1, [2, 5])
    c = runtime.snapshot()
    assert c.demanded == 4 and c.hits == 1 and c.prefetch_hits == 1 and c.misses == 3
    assert c.prefetch_reads == 2 and c.reads == 5 and c.bytes_read == 40
    runtime.release()
    assert cache.used == 50


def test_wrong_guesses_not_yet_read_are_cancelled():
    store = FakeStore()
    cache = ExpertCache(100, "lru", layers=[0, 1])
    runtime = OffloadRuntime(store, cache, top_k=2, prefetch=True, io_threads=1)
    store.gate.set()
    runtime.demand(0, [0])
    runtime.release()
    store.gate.clear()
    blocker = runtime._pool.submit(store.gate.wait, 5)  # the I/O thread is busy
    runtime.demand(0, [0], prefetch=Prefetch(1, [6, 7]))  # queued behind the blocker
    runtime.release()
    assert cache.used == 30  # two placeholders hold their bytes
    threading.Timer(0.2, store.gate.set).start()
    runtime.demand(1, [6])  # cancels the wrong guess 7 (not started yet), then waits for 6
    blocker.result()
    runtime._pool.submit(lambda: None).result()
    assert (1, 6) in cache and (1, 7) not in cache and (1, 7) not in store.read_keys
    assert cache.used == 20
    runtime.close()


# --- prompts under a budget, and the automatic budget -------------------------------------------


def test_a_prompt_reads_each_expert_at_most_once_per_layer(tiny_q4, plan, reference):
    """Layer by layer over the whole prompt: however many chunks the prompt spans, every expert
    of a layer is read once (the cache holds them all here, but not the rest of the model)."""
    budget = plan.full_bytes - 1
    engine = Engine.load(str(tiny_q4), memory_budget=budget, max_context=CONTEXT)
    runtime = engine.offload
    assert runtime is not None and runtime.capacity >= plan.total_expert_bytes
    read = []
    original = runtime.store.read

    def spy(layer, expert):
        read.append((layer, expert))
        return original(layer, expert)

    runtime.store.read = spy
    engine._chunk_override = 8  # many attention chunks per prompt
    chunks = list(engine.stream(MESSAGES, GenerationSettings(max_tokens=1, temperature=0.0)))
    prompt_tokens = chunks[-1].stats.prompt_tokens
    assert prompt_tokens > 5 * 8
    assert len(read) == len(set(read)) <= plan.moe_layers * plan.num_experts
    assert chunks[-1].stats.prompt_bytes_read_per_token == pytest.approx(
        len(read) * plan.expert_disk_bytes / prompt_tokens
    )
    assert "".join(c.text for c in chunks) == reference[0][: len(chunks[0].text)]


def test_no_budget_on_a_small_machine_streams_experts(tiny_q4, plan, reference, monkeypatch):
    """With no --memory-budget, a model that does not fit what this machine has available gets
    the automatic budget, says so in one line, and answers the same."""
    from model import memory_plan as P

    # A busy machine: what is available now is not enough room to load the model whole.
    monkeypatch.setattr(P, "physical_memory", lambda: 2 * plan.full_bytes)
    monkeypatch.setattr(P, "available_memory", lambda: int(1.1 * plan.full_bytes))
    engine = Engine.load(str(tiny_q4), max_context=CONTEXT)
    assert engine.offload is not None
    assert "automatic budget" in engine.memory_notice and "\n" not in engine.memory_notice
    assert run(engine)[0] == reference[0]
    forced = Engine.load(str(tiny_q4), memory_budget="none", max_context=CONTEXT)
    assert forced.offload is None and forced.memory_notice.startswith("warning:")


def test_an_8_bit_kv_cache_is_planned_and_close_to_float(tiny_q4, tmp_path):
    """--kv-bits 8: mlx-lm's QuantizedKVCache, the budget counts it, and the next-token
    distribution stays close to the float cache's."""
    from mlx_lm.models.cache import QuantizedKVCache

    with pytest.raises(MixchatError, match="head dimension"):  # 16: too small to quantize
        Engine.load(str(tiny_q4), kv_bits=8)
    with pytest.raises(CheckpointError, match="head dimension"):
        Engine.load(str(tiny_q4)).model.make_cache(8)
    wide = build_hf_checkpoint(tmp_path, "mixtral", hidden_size=128, num_heads=4)  # head dim 32
    engine = Engine.load(str(wide), kv_bits=8, max_context=CONTEXT)
    assert engine.kv_bits == 8 and engine.model.memory.plan.kv_bits == 8
    model = engine.model
    ids = mx.array(engine.tokenizer.encode_chat(MESSAGES))[None]
    float_cache, eight_bit = model.make_cache(), model.make_cache(8)
    assert isinstance(eight_bit[0], QuantizedKVCache)
    for cache in (float_cache, eight_bit):  # prompt, then one more token through the cache
        model(ids[:, :-1], cache=cache)
    a = model(ids[:, -1:], cache=float_cache)[0, -1]
    b = model(ids[:, -1:], cache=eight_bit)[0, -1]
    pa, pb = mx.softmax(a), mx.softmax(b)
    kl = (pa * (mx.log(pa) - mx.log(pb))).sum().item()
    assert 0 <= kl < 5e-3 and mx.argmax(a).item() == mx.argmax(b).item()
    per_token = engine.model.memory.plan.kv_bytes_per_token
    assert eight_bit[0].nbytes * len(eight_bit) == per_token * 256  # one 256-token allocation
