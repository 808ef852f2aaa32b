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
from model.offload import runtime_of
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
