"""The families added after Qwen-MoE/OLMoE under a memory budget (issue 21, item 2): gpt-oss
(biased experts, clamped SwiGLU; MXFP4 as mlx-community publishes it and 4-bit affine),
DeepSeek-V3 and V2 (shared experts resident, dense first layer, MoEGate router), GraniteMoE
(its stacked input_linear/output_linear, which mlx-lm makes a SwitchGLU) and PhiMoE stream
their experts through the same offload package, with greedy tokens identical to the
unbudgeted model's while experts are evicted. The checkpoints are `mlx_lm.convert -q` of the
tiny published-layout fixtures of tests/test_family_gptoss.py, test_family_deepseek.py and
test_family_more.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from model import Engine
from model.families import FamilyModel
from model.memory_plan import memory_plan
from model.offload import runtime_of
from model.weights import locate
from tests.test_families import _reply
from tests.test_family_budget import CONTEXT, tight_budget
from tests.test_family_deepseek import FAMILIES as DEEPSEEK
from tests.test_family_deepseek import MLA, build_checkpoint, deepseek_config
from tests.test_family_gptoss import build_gptoss
from tests.test_family_more import COMMON, published
from tests.test_family_more import FAMILIES as MORE

FORMS = ["gpt_oss-mxfp4", "gpt_oss-4bit", "deepseek_v3", "deepseek_v2", "granitemoe", "phimoe"]
LONG = " ".join(["Once upon a time, in a land far away,"] * 3)  # a layer-by-layer prompt


@pytest.fixture(scope="session")
def budget_dirs(tmp_path_factory):
    """Each family as mlx-community publishes it: `mlx_lm.convert` output, 4-bit."""
    import mlx_lm

    root = tmp_path_factory.mktemp("family-budget-more")
    gptoss = build_gptoss(root / "gptoss")
    out = {"gpt_oss-mxfp4": root / "gpt_oss-mxfp4", "gpt_oss-4bit": root / "gpt_oss-4bit"}
    mlx_lm.convert(str(gptoss["mxfp4"]), str(out["gpt_oss-mxfp4"]))  # experts stay MXFP4
    mlx_lm.convert(str(gptoss["mxfp4"]), str(root / "gpt_oss-float"), dequantize=True)
    mlx_lm.convert(str(root / "gpt_oss-float"), str(out["gpt_oss-4bit"]), quantize=True,
                   q_bits=4, q_group_size=32)  # fmt: skip
    sources = {f: build_checkpoint(root / f"{f}-hf", prefix, {**MLA, **extra},
                                   fix=deepseek_config) for f, (prefix, extra) in DEEPSEEK.items()}  # fmt: skip
    # GraniteMoE's experts 64 wide: mlx-lm quantizes their down_proj to 8 bits in groups of 64
    sources |= {f: build_checkpoint(root / f"{f}-hf", prefix, {**COMMON, **extra,
                                    "intermediate_size": 64}, fix=published)
                for f, (prefix, extra) in MORE.items()}  # fmt: skip
    for family, source in sources.items():
        out[family] = root / family
        mlx_lm.convert(str(source), str(out[family]), quantize=True, q_bits=4, q_group_size=32)
    return out


@pytest.mark.parametrize("form", FORMS)
def test_budgeted_greedy_tokens_equal_unbudgeted(budget_dirs, form):
    path = budget_dirs[form]
    whole = Engine.load(str(path), memory_budget="none", max_context=CONTEXT)
    assert runtime_of(whole.model) is None
    _, expected = _reply(whole)
    _, long_whole = _reply(whole, LONG)
    budget, plan = tight_budget(path)
    engine = Engine.load(str(path), memory_budget=budget, max_context=CONTEXT)
    runtime = runtime_of(engine.model)
    assert runtime is not None, "the experts should stream under this budget"
    assert runtime.num_experts == plan.num_experts == 8
    assert len(runtime.specs) == plan.moe_layers  # DeepSeek's dense first layer is not one
    specs = runtime.specs[max(runtime.specs)]
    if form == "gpt_oss-mxfp4":  # the published MXFP4 experts, streamed as such
        assert {s[2] for s in specs.values()} == {"mxfp4"}
    if form == "granitemoe":  # mlx-lm's 8-bit down_proj beside 4-bit gate/up
        assert specs["down_proj"][:2] == (64, 8) and specs["gate_proj"][:2] == (32, 4)
    if form.startswith("deepseek"):  # dense first layer; shared experts and router resident
        assert min(runtime.specs) == 1 and "shared_experts" in engine.model.layers[1].mlp
        gate = engine.model.layers[1].mlp.gate
        assert form == "deepseek_v2" or gate.e_score_correction_bias.dtype == mx.float32
    _, tokens = _reply(engine)
    assert tokens == expected and len(tokens) >= 9
    counters = runtime.snapshot()
    assert counters.misses > 0 and counters.reads > plan.moe_layers * plan.top_k  # evicted
    assert runtime.cache.capacity < plan.total_expert_bytes
    _, long_budgeted = _reply(engine, LONG)
    assert long_budgeted == long_whole


@pytest.mark.parametrize("form", FORMS)
def test_the_layer_by_layer_prompt_is_the_whole_models(budget_dirs, form, monkeypatch):
    """`prefill_layerwise` (attention in chunks of 7, then the layer's MoE block over the
    window; PhiMoE whole over the window, its documented fallback): each routed expert
    demanded once per layer, and the same last hidden state as the unbudgeted pass."""
    path = budget_dirs[form]
    whole = Engine.load(str(path), memory_budget="none", max_context=CONTEXT)
    ids = mx.array([whole.prompt_ids(prompt=LONG)])
    expected = whole.model.hidden_states(ids, whole.model.make_cache())[:, -1:]
    budget, plan = tight_budget(path)
    engine = Engine.load(str(path), memory_budget=budget, max_context=CONTEXT)
    model, runtime = engine.model, runtime_of(engine.model)
    passes = []
    whole_pass = FamilyModel.hidden_states
    monkeypatch.setattr(FamilyModel, "hidden_states",
                        lambda *a, **k: passes.append(1) or whole_pass(*a, **k))  # fmt: skip
    before = runtime.snapshot()
    model.routing = []
    last = model.prefill_layerwise(ids, model.make_cache(), chunk=7)
    assert len(passes) == (form == "phimoe")  # every other family split layer by layer
    routing, model.routing = model.routing, None
    delta = runtime.snapshot().minus(before)
    used = sum(len(np.unique(np.array(r))) for r in routing)
    assert len(routing) == plan.moe_layers and routing[0].shape == (*ids.shape, plan.top_k)
    assert ids.shape[1] > 3 * 7 and used == delta.demanded and delta.reads <= plan.moe_layers * 8
    np.testing.assert_allclose(np.array(last), np.array(expected), atol=1e-4)


@pytest.mark.parametrize("form", ["deepseek_v3", "deepseek_v2", "gpt_oss-4bit"])
def test_the_planned_kv_cache_is_what_mlx_lm_allocates(budget_dirs, form):
    """`info`'s KV cache per family, measured on mlx-lm's own caches: DeepSeek-V3 caches its
    latent (kv_lora_rank + qk_rope_head_dim per token per layer), DeepSeek-V2 (in mlx-lm)
    per-head keys and values of its MLA dimensions, gpt-oss's sliding layers at most their
    window; every cache 256 token slots at a time."""
    from model.info import model_info

    path = budget_dirs[form]
    checkpoint = locate(path)
    plan = memory_plan(checkpoint, 4, context=CONTEXT)
    per_layer = {"deepseek_v3": MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"],
                 "deepseek_v2": MLA["num_attention_heads"] * (MLA["qk_nope_head_dim"]
                                + MLA["qk_rope_head_dim"] + MLA["v_head_dim"])}  # fmt: skip
    layers = checkpoint.args.num_hidden_layers
    expected = layers * per_layer.get(form, 2 * 2 * 16) * 4  # gpt-oss: 2 KV heads of 16
    assert plan.kv_bytes_per_token == model_info(checkpoint, form).kv_bytes_per_token == expected
    engine = Engine.load(str(path), memory_budget="none", max_context=CONTEXT)
    model = engine.model
    cache = model.make_cache()
    model(mx.array([[1]]), cache)
    mx.eval([c.state for c in cache])
    assert sum(c.nbytes for c in cache) == plan.kv_bytes_at(1) == plan.kv_bytes
    for token in range(2, 260):  # past one step of 256 slots, past gpt-oss's window of 4
        model(mx.array([[token]]), cache)
    mx.eval([c.state for c in cache])
    assert sum(c.nbytes for c in cache) == plan.kv_bytes_at(259) > plan.kv_bytes_at(1)
    if form.startswith("gpt_oss"):  # the sliding layer holds its window, the full one 512
        assert plan.kv_bytes_at(259) == expected // 2 * (512 + 4)


def test_a_short_context_plans_the_kv_cache_mlx_lm_allocates(budget_dirs):
    """A 64-token context still allocates 256 token slots: the plan reserves them, so the
    expert cache loading gives is not squeezed when the first token enters the KV cache."""
    path = budget_dirs["granitemoe"]
    budget, plan = tight_budget(path)
    assert plan.kv_bytes == 256 * plan.kv_bytes_per_token
    engine = Engine.load(str(path), memory_budget=budget, max_context=CONTEXT)
    runtime = runtime_of(engine.model)
    _reply(engine)
    assert 0 < runtime.kv_bytes <= plan.kv_bytes
    assert runtime.cache.capacity == plan.cache_bytes(budget) > runtime.top_k * plan.expert_bytes


def test_a_budget_close_to_the_whole_model_keeps_every_expert_as_the_kv_cache_grows(budget_dirs):
    """A budget just short of the whole model, with a long context: the KV cache of a short
    chat takes from the room the budget leaves, not from the expert cache's capacity (capped
    at every expert), so the cache keeps every expert and decoding hits it every time."""
    path = budget_dirs["granitemoe"]
    plan = memory_plan(locate(path), 4, context=512)
    budget = plan.full_bytes - 1
    engine = Engine.load(str(path), memory_budget=budget, max_context=512)
    runtime = runtime_of(engine.model)
    assert runtime is not None and runtime.capacity == plan.total_expert_bytes
    _reply(engine)
    assert runtime.kv_bytes > plan.total_expert_bytes // 2  # a KV cache as big as the experts
    assert runtime.cache.capacity == plan.total_expert_bytes
    before = runtime.snapshot()
    _reply(engine)  # every expert was read by the first reply
    delta = runtime.snapshot().minus(before)
    assert delta.misses == 0 and delta.hits > 0
