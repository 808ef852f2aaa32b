"""MoE families under a memory budget (issue 21, item 2): their experts stream through the
same offload package as Mixtral's (model/offload/), and greedy tokens are identical with and
without a budget. The checkpoints are tiny mlx-community-style 4-bit directories
(`mlx_lm.convert -q` of the published layout), built as tests/test_families.py builds them."""

from __future__ import annotations

import json

import pytest

from model import Engine
from model.errors import MixchatError
from model.memory_plan import memory_plan
from model.offload import runtime_of
from model.weights import locate
from tests.test_families import FAMILIES, _reply, family_dirs  # noqa: F401 (a fixture)

CONTEXT = 64  # a KV cache small beside the experts (4 of them)


@pytest.fixture(scope="session")
def family_4bit(family_dirs, tmp_path_factory):  # noqa: F811
    import mlx_lm

    root = tmp_path_factory.mktemp("families-4bit")
    out = {}
    for family, path in family_dirs.items():
        out[family] = root / family
        mlx_lm.convert(str(path), str(out[family]), quantize=True, q_bits=4, q_group_size=64)
    return out


def tight_budget(path, experts: int = 3) -> tuple[int, object]:
    """A budget whose expert cache holds `experts` experts beyond one layer's top-k: fewer than
    a token's (2 layers x top-2 of 8), so experts are evicted while decoding."""
    plan = memory_plan(locate(path), 4, context=CONTEXT)
    return plan.minimum_budget + experts * plan.expert_bytes, plan


@pytest.mark.parametrize("family", list(FAMILIES))
def test_budgeted_greedy_tokens_equal_unbudgeted(family_4bit, family):
    path = family_4bit[family]
    whole = Engine.load(str(path), memory_budget="none", max_context=CONTEXT)
    assert runtime_of(whole.model) is None
    _, expected = _reply(whole)
    budget, plan = tight_budget(path)
    engine = Engine.load(str(path), memory_budget=budget, max_context=CONTEXT)
    runtime = runtime_of(engine.model)
    assert runtime is not None, "the experts should stream under this budget"
    assert runtime.num_experts == 8 and runtime.top_k == 2
    prompt = " ".join(["Once upon a time, in a land far away,"] * 3)  # a layer-by-layer prompt
    _, tokens = _reply(engine)
    assert tokens == expected and len(tokens) >= 9
    counters = runtime.snapshot()
    assert counters.misses > 0 and counters.reads > 2 * 8  # evicted, and read again
    assert runtime.cache.capacity < plan.total_expert_bytes
    _, long_whole = _reply(whole, prompt)
    _, long_budgeted = _reply(engine, prompt)
    assert long_budgeted == long_whole


def test_shared_experts_and_routers_stay_resident(family_4bit):
    """Qwen2-MoE's shared expert (and its gate) are resident weights, not streamed experts."""
    checkpoint = locate(family_4bit["qwen2_moe"])
    plan = memory_plan(checkpoint, 4, context=CONTEXT)
    shared = sum(s.nbytes for n, s in checkpoint.tensors.items() if ".shared_expert" in n)
    assert shared and plan.resident_bytes > shared
    assert plan.offloadable and plan.num_experts == 8 and plan.top_k == 2 and plan.moe_layers == 2
    budget, _ = tight_budget(family_4bit["qwen2_moe"])
    engine = Engine.load(str(family_4bit["qwen2_moe"]), memory_budget=budget, max_context=CONTEXT)
    layer = engine.model.layers[0]
    assert "shared_expert" in layer.mlp and "weight" in layer.mlp.shared_expert.gate_proj
    assert runtime_of(engine.model).describe().startswith("experts stream from disk")


def test_a_published_directory_under_a_budget_is_told_to_convert(family_dirs):  # noqa: F811
    budget, _ = tight_budget(family_dirs["olmoe"])
    with pytest.raises(MixchatError) as e:
        Engine.load(str(family_dirs["olmoe"]), memory_budget=budget, max_context=CONTEXT)
    message = str(e.value)
    assert f"mixchat quantize {family_dirs['olmoe']} DIR" in message  # it converts olmoe exactly
    assert "\n" not in message


def test_info_predicts_what_loading_decides(family_4bit, capsys):
    """`mixchat info` under the budget: the family's expert count, top-k and expert bytes, the
    cache loading gives the experts, and a hit rate replayed with the family's 8 / top-2."""
    from app.cli import main
    from model.routing_trace import expected_hit_rate

    path = family_4bit["qwen2_moe"]
    budget, plan = tight_budget(path)
    code = main(["info", str(path), "--memory-budget", str(budget), "--max-context",
                 str(CONTEXT), "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    memory = json.loads(out)["memory"]
    engine = Engine.load(str(path), memory_budget=budget, max_context=CONTEXT)
    runtime = runtime_of(engine.model)
    predicted = memory["plan"]
    assert (predicted["num_experts"], predicted["top_k"], predicted["moe_layers"]) == (8, 2, 2)
    assert predicted["expert_bytes"] == runtime.store.expert_bytes(0)
    assert predicted["resident_bytes"] == plan.resident_bytes  # shared expert included
    runtime.set_kv_bytes(predicted["kv_bytes"])  # info plans for a full context
    assert not memory["fits"] and memory["cache_bytes"] == runtime.cache.capacity
    share = memory["prediction"]["cached_fraction"]
    assert 0 < share < 1
    assert memory["prediction"]["expected_hit_rate"] == expected_hit_rate(share, 8, 2, 2)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_a_prompt_reads_each_expert_at_most_once_per_layer(family_4bit, family):
    """The layer-by-layer prompt under a budget (attention in chunks, then the layer's experts
    over the whole window): each expert read at most once per layer, whatever the chunk, and
    the same last hidden state as the whole model's pass."""
    import mlx.core as mx
    import numpy as np

    path = family_4bit[family]
    budget, _ = tight_budget(path)
    engine = Engine.load(str(path), memory_budget=budget, max_context=CONTEXT)
    model, runtime = engine.model, runtime_of(engine.model)
    ids = mx.array([engine.prompt_ids(prompt="Once upon a time, in a land far away, " * 3)])
    before = runtime.snapshot()
    model.routing = []
    last = model.prefill_layerwise(ids, model.make_cache(), chunk=7)
    routing, model.routing = model.routing, None
    delta = runtime.snapshot().minus(before)
    used = sum(len(np.unique(np.array(r))) for r in routing)  # distinct experts, per layer
    assert len(routing) == 2 and routing[0].shape == (*ids.shape, 2) and ids.shape[1] > 20
    # each routed expert demanded once per layer; reads (prefetches of the next layer's
    # included) at most once per expert per layer, though the cache holds 2 of the 16
    assert 8 < used == delta.demanded and delta.reads <= 2 * 8 and delta.hits < used
    whole = Engine.load(str(path), memory_budget="none", max_context=CONTEXT).model
    expected = whole.hidden_states(ids, whole.make_cache())[:, -1:]
    np.testing.assert_allclose(np.array(last), np.array(expected), atol=1e-4)
