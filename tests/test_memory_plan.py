"""Memory plans and budgets: what a checkpoint needs, the minimum, the automatic budget, the
context and KV cache inside the budget, and `mixchat info` predictions from measured kernels, on a
synthetic (header-only, sparse) Mixtral 8x7B; bad budgets at the command line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from model import memory_plan as P
from model import predict as R
from model import weights
from model.machine import CACHE_FILE, DecodeTiming, measure_disk_bandwidth
from tests.checkpoints import mistral_tokenizer_file
from tests.test_cli import assert_one_line_error, mixchat

MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
}  # fmt: skip


def quantized(name: str, out: int, inp: int, experts: int = 0, bits: int = 4, group: int = 64):
    lead = (experts,) if experts else ()
    return {
        f"{name}.weight": ("U32", (*lead, out, inp * bits // 32)),
        f"{name}.scales": ("F16", (*lead, out, inp // group)),
        f"{name}.biases": ("F16", (*lead, out, inp // group)),
    }


def synthetic_mixtral(path: Path, expert_bits: int = 4, config: dict = MIXTRAL_8X7B) -> Path:
    """An MLX 4-bit Mixtral 8x7B directory whose safetensors file is a real header over a sparse
    (unwritten) body: `locate` and `info` work on it, nothing can be computed with it."""
    c = config
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    tensors = {**quantized("model.embed_tokens", v, h), **quantized("lm_head", v, h),
               "model.norm.weight": ("F16", (h,))}  # fmt: skip
    quantization = {"group_size": 64, "bits": 4, "mode": "affine"}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = ("F16", (h,))
        tensors[f"{p}.post_attention_layernorm.weight"] = ("F16", (h,))
        tensors[f"{p}.block_sparse_moe.gate.weight"] = ("F16", (8, h))
        quantization[f"{p}.block_sparse_moe.gate"] = False
        for name, out in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            tensors |= quantized(f"{p}.self_attn.{name}", out, h)
        moe = f"{p}.block_sparse_moe.switch_mlp"
        tensors |= quantized(f"{moe}.gate_proj", f, h, 8, expert_bits)
        tensors |= quantized(f"{moe}.up_proj", f, h, 8, expert_bits)
        tensors |= quantized(f"{moe}.down_proj", h, f, 8, expert_bits)
        if expert_bits != 4:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                quantization[f"{moe}.{proj}"] = {"group_size": 64, "bits": expert_bits}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = {"U32": 4, "F16": 2}[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)  # sparse: no data written
    (path / "config.json").write_text(json.dumps(c | {"quantization": quantization}))
    (path / "tokenizer.model").write_bytes(mistral_tokenizer_file("v1").read_bytes())
    return path


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return synthetic_mixtral(tmp_path_factory.mktemp("mixtral-8x7b-q4"))


MIXTRAL_790M = MIXTRAL_8X7B | {"hidden_size": 1024, "intermediate_size": 3584,
                               "num_hidden_layers": 8, "num_attention_heads": 16,
                               "num_key_value_heads": 4}  # fmt: skip


@pytest.fixture(scope="module")
def mixtral_790m(tmp_path_factory):
    """The benchmark shape (benchmarks/make_checkpoint.py), header only: quick to time."""
    return synthetic_mixtral(tmp_path_factory.mktemp("mixtral-790m-q4"), config=MIXTRAL_790M)



GB = 10**9


def small_machine(monkeypatch, total: int, available: int | None = None) -> None:
    """Pretend this machine has `total` bytes of memory, `available` of them free now."""
    monkeypatch.setattr(P, "physical_memory", lambda: total)
    monkeypatch.setattr(P, "available_memory", lambda: total if available is None else available)


# --- what Mixtral 8x7B needs --------------------------------------------------------------------


def test_mixtral_8x7b_sizes(mixtral):
    checkpoint = weights.locate(mixtral)
    on_disk = P.memory_plan(checkpoint, compute_bytes=2)  # a Mac GPU: half precision
    assert on_disk.offloadable and on_disk.moe_layers == 32 and on_disk.expert_bits == 4
    assert 25.3e9 < on_disk.total_expert_disk_bytes < 25.5e9  # "about 25.4 GB of experts"
    assert 0.85e9 < on_disk.resident_bytes < 0.95e9  # "about 0.9 GB everything else"
    assert on_disk.total_expert_bytes == on_disk.total_expert_disk_bytes  # f16 scales stay f16
    assert on_disk.expert_bytes * 8 * 32 == on_disk.total_expert_bytes
    # The arithmetic estimate `info` uses for re-quantization options agrees with the headers.
    estimate = P.estimate_plan(checkpoint.args, 2, bits=4)
    assert estimate.total_expert_disk_bytes == on_disk.total_expert_disk_bytes
    assert abs(estimate.resident_bytes - on_disk.resident_bytes) < 0.01 * on_disk.resident_bytes


def test_the_minimum_is_one_layers_experts(mixtral):
    plan = P.memory_plan(weights.locate(mixtral), compute_bytes=4, context=8192)
    assert plan.minimum_budget == plan.resident_bytes + plan.reserve_bytes + 2 * plan.expert_bytes
    assert plan.reserve_bytes == plan.kv_bytes + plan.activation_bytes + 2 * plan.expert_disk_bytes
    assert plan.minimum_budget < 7 * GB  # an 8 GB Mac less the OS
    assert plan.cache_bytes(7 * GB) == 7 * GB - plan.resident_bytes - plan.reserve_bytes
    # Everything above the minimum is expert cache.
    assert plan.cache_bytes(plan.minimum_budget) == 2 * plan.expert_bytes


def test_the_kv_reserve_follows_the_context(mixtral):
    checkpoint = weights.locate(mixtral)
    args = checkpoint.args
    per_token = 2 * 32 * 8 * 128 * 4  # layers x KV heads x head dim, keys and values, float32
    short, long = (P.memory_plan(checkpoint, 4, context=c) for c in (4096, 32768))
    assert short.kv_bytes == 4096 * per_token and long.kv_bytes == 32768 * per_token
    assert long.minimum_budget - short.minimum_budget >= 0.95 * 28672 * per_token
    assert P.memory_plan(checkpoint, 4).context == args.context_length  # the model's by default
    eight = P.memory_plan(checkpoint, 4, context=32768, kv_bits=8)
    assert eight.kv_bytes_per_token == int(2 * 32 * 8 * 128 * (1 + 2 * 4 / 64))  # + scales
    # The full 32k context of Mixtral 8x7B fits a 12 GB budget with the 8-bit KV cache...
    assert eight.minimum_budget < 12 * GB and P.check_budget(eight, 12 * GB, "8x7B")
    decision = P.decide(checkpoint, 4, 12 * GB, max_context=32768, kv_bits=8)
    assert decision.offload and decision.context == 32768 and decision.cache_bytes > 0
    # ... and with no --max-context, a budget gets the longest context that leaves room.
    chosen = P.decide(checkpoint, 4, 7 * GB)
    assert chosen.offload and 2048 <= chosen.context < 32768
    plan = chosen.plan
    assert plan.kv_bytes + plan.activation_bytes <= (
        7 * GB - plan.resident_bytes - 2 * plan.expert_bytes
    ) / 2
    with pytest.raises(P.BudgetError, match="4 or 8 bits"):
        P.memory_plan(checkpoint, 4, kv_bits=3)


def test_no_budget_streams_experts_when_the_model_does_not_fit(mixtral, monkeypatch):
    checkpoint = weights.locate(mixtral)
    small_machine(monkeypatch, 16 * GB, 12 * GB)  # a 16 GB Mac with 12 GB free
    decision = P.decide(checkpoint, 2)
    assert decision.offload and decision.budget == int(12 * GB * 0.9)
    assert "automatic budget" in decision.notice and "stream" in decision.notice
    assert "\n" not in decision.notice
    forced = P.decide(checkpoint, 2, "none")
    assert not forced.offload and forced.budget is None and "warning" in forced.notice
    small_machine(monkeypatch, 64 * GB)  # a 64 GB Mac: everything resident, nothing said
    whole = P.decide(checkpoint, 2)
    assert not whole.offload and whole.notice == ""


def test_auto_budget_is_a_safe_share_of_memory(monkeypatch):
    small_machine(monkeypatch, 16 * GB, 14 * GB)
    assert P.auto_budget()[0] == int(16e9 * P.AUTO_SHARE)
    small_machine(monkeypatch, 16 * GB, 6 * GB)  # a busy machine
    budget, why = P.auto_budget()
    assert budget == int(6e9 * 0.9) and "available" in why


@pytest.mark.parametrize(
    "text, value",
    [("12GB", 12 * GB), ("auto", "auto"), ("AUTO", "auto"), ("none", "none"), ("800MB", 8 * 10**8)],
)  # fmt: skip
def test_parse_budget(text, value):
    assert P.parse_budget(text) == value


@pytest.mark.parametrize("text", ["", "lots", "12XB", "-1GB", "0", "GB"])
def test_parse_budget_rejects_garbage(text):
    with pytest.raises(ValueError, match="memory size"):
        P.parse_budget(text)


# --- predictions from measured kernels --------------------------------------------------------


def test_prediction_arithmetic_from_a_measured_kernel_rate(mixtral, monkeypatch):
    monkeypatch.setattr(R, "expected_hit_rate", lambda plan, cached: cached)
    plan = P.memory_plan(weights.locate(mixtral), compute_bytes=2, context=4096)
    timing = DecodeTiming(layer_seconds=0.3, head_seconds=0.05, layers=32, streams=2,
                          synced=True, method="test")  # fmt: skip
    budget, disk, memory = 12 * GB, 3e9, 68e9
    p = R.predict(plan, budget, timing, disk, memory)
    cached = plan.cache_bytes(budget) / plan.total_expert_bytes
    miss_bytes = 32 * 2 * plan.expert_disk_bytes * (1 - cached)
    memory_bytes = plan.resident_active_bytes + 32 * 2 * plan.expert_bytes
    step = max(32 * 0.3 + 0.05, memory_bytes / memory) + miss_bytes / disk
    assert p.cached_fraction == pytest.approx(cached) and p.feasible and not p.fits
    assert p.disk_bytes_per_token == pytest.approx(miss_bytes)
    assert p.tps == pytest.approx(1 / step)
    assert p.bound == "compute"  # 9.65 s of kernels against ~4 s of reads
    fast = DecodeTiming(0.001, 0.001, 32, 1, True, "a fast GPU")
    assert R.predict(plan, budget, fast, disk, memory).bound == "disk"
    whole = R.predict(plan, None, fast, disk, memory)
    assert whole.fits and whole.disk_seconds == 0 and whole.bound == "memory"
    assert not R.predict(plan, GB, timing, disk, memory).feasible


def test_info_predicts_from_this_machines_measurements(mixtral_790m, tmp_path, cli):
    """The first `info` measures disk, memory and the model's own layer, and keeps them (the
    second confirms the lone disk figure with a short second measurement); then they are read
    back, and the prediction is the arithmetic on those figures."""
    env = {"MIXCHAT_HOME": str(tmp_path)}
    model = str(mixtral_790m)
    first = mixchat("info", model, "--memory-budget", "400MB", "--json", env=env)
    assert first.returncode == 0, first.stderr.decode()
    kept = json.loads((tmp_path / CACHE_FILE).read_text())
    assert any(k.startswith("disk:") for k in kept) and "memory" in kept
    assert any(k.startswith("decode:") for k in kept)
    first = cli("info", model, "--memory-budget", "400MB", "--json", env=env)
    disk = next(v for k, v in json.loads((tmp_path / CACHE_FILE).read_text()).items()
                if k.startswith("disk:"))  # fmt: skip
    assert len(disk["history"]) == 2
    result = cli("info", model, "--memory-budget", "400MB", "--json", env=env)
    memory, measured = json.loads(result.stdout)["memory"], json.loads(first.stdout)["memory"]
    assert "(measured 20" in memory.pop("disk_method") and measured.pop("disk_method")
    assert memory == measured  # the same figures, read back instead of measured again
    timing = DecodeTiming(**{k: v for k, v in memory["decode_timing"].items()
                             if k != "step_seconds"})  # fmt: skip
    plan = P.memory_plan(weights.locate(mixtral_790m), 4, memory["context"])
    budget = 400 * 10**6
    expected = R.predict(plan, budget, timing, memory["disk_bandwidth"],
                         memory["memory_bandwidth"])  # fmt: skip
    assert memory["budget"] == budget and not memory["fits"] and memory["feasible"]
    assert memory["minimum_budget"] == plan.minimum_budget
    assert memory["prediction"]["tps"] == pytest.approx(expected.tps)
    assert timing.layers == 8 and timing.synced and timing.step_seconds > 0
    # streamed: each of the top-2 experts timed as OffloadedExperts applies it from the cache
    assert timing.experts_per_layer == 2 and timing.expert_seconds > 0
    assert timing.layer_seconds >= 0 and "one by one from the expert cache" in timing.method
    options = [o["option"] for o in memory["options"]]
    assert "mixchat quantize SRC DST --expert-bits 3" in options
    text = cli("info", model, "--memory-budget", "400MB", env=env).stdout.decode()
    assert "fits           no: needs" in text and "tok/s" in text and "-bound" in text
    small = cli("info", model, "--memory-budget", "20MB", env=env).stdout.decode()
    assert "below the minimum" in small


def test_disk_bandwidth_is_measured_on_the_experts(tiny_mixtral):
    regions = R.expert_regions(weights.locate(tiny_mixtral))
    assert regions and all(start < stop for _, start, stop in regions)
    bandwidth = measure_disk_bandwidth(regions, rounds=3, bytes_per_round=1 << 20)
    assert bandwidth.low <= bandwidth.bytes_per_second <= bandwidth.high
    assert bandwidth.bytes_per_second > 0 and "rounds" in bandwidth.method


# --- bad budgets ------------------------------------------------------------------------------


def test_budget_below_the_minimum_is_a_one_line_error(mixtral, cli):
    env = {"MIXCHAT_DTYPE": "float16"}
    result = cli("ask", "--model", str(mixtral), "--memory-budget", "1GB", "hi", env=env)
    assert_one_line_error(result, 1, "below the minimum of")
    assert "--memory-budget" in result.stderr.decode()
    result = mixchat("chat", "--model", str(mixtral), "--memory-budget", "1GB", env=env)
    assert_one_line_error(result, 1, "below the minimum")


def test_garbage_budget_is_a_usage_error(tiny_mixtral, cli):
    for command in (["ask", "--model", str(tiny_mixtral), "hi"], ["info", str(tiny_mixtral)],
                    ["chat"]):  # fmt: skip
        result = cli(*command, "--memory-budget", "lots")
        assert_one_line_error(result, 2, "not a memory size")


def test_unquantized_moe_over_budget_asks_for_quantization(tiny_mixtral):
    plan = P.memory_plan(weights.locate(tiny_mixtral), 4)
    assert not plan.offloadable
    with pytest.raises(P.BudgetError, match="mixchat quantize"):
        P.check_budget(plan, plan.full_bytes - 1, "tiny")
    assert P.check_budget(plan, plan.full_bytes, "tiny") is False  # fits: loads as usual
