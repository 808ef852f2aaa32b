"""Memory budgets: sizes, what a checkpoint needs, `mixchat info` fit and speed predictions on a
synthetic (header-only, sparse) Mixtral 8x7B, and bad budgets at the command line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from model import budget as B
from model import weights
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


def synthetic_mixtral(path: Path, expert_bits: int = 4) -> Path:
    """An MLX 4-bit Mixtral 8x7B directory whose safetensors file is a real header over a sparse
    (unwritten) body: `locate` and `info` work on it, nothing can be computed with it."""
    c = MIXTRAL_8X7B
    h, f, v, kv = c["hidden_size"], c["intermediate_size"], c["vocab_size"], 8 * 128
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


# --- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("12GB", 12 * 10**9), ("800MB", 800 * 10**6), ("1.5GiB", int(1.5 * 2**30)),
     ("4096", 4096), (" 2 gb ", 2 * 10**9), ("512M", 512 * 10**6), ("auto", "auto"),
     ("AUTO", "auto")],
)  # fmt: skip
def test_parse_budget(text, value):
    assert B.parse_budget(text) == value


@pytest.mark.parametrize("text", ["", "lots", "12XB", "-1GB", "0", "GB", "1e9", "12 G B x"])
def test_parse_budget_rejects_garbage(text):
    with pytest.raises(ValueError, match="memory"):
        B.parse_budget(text)


def test_auto_is_a_safe_share_of_memory(monkeypatch):
    monkeypatch.setattr(B, "physical_memory", lambda: 16 * 10**9)
    monkeypatch.setattr(B, "available_memory", lambda: 14 * 10**9)
    assert B.auto_budget()[0] == int(16e9 * B.AUTO_SHARE)
    monkeypatch.setattr(B, "available_memory", lambda: 6 * 10**9)  # a busy machine
    budget, why = B.auto_budget()
    assert budget == int(6e9 * 0.9) and "available" in why
    assert B.resolve_budget("auto") == budget and B.resolve_budget(None) is None
    with pytest.raises(B.BudgetError):
        B.resolve_budget("twelve")


# --- what Mixtral 8x7B needs, and the prediction arithmetic -----------------------------------


def test_mixtral_8x7b_sizes(mixtral):
    checkpoint = weights.locate(mixtral)
    on_disk = B.memory_plan(checkpoint, compute_bytes=2)  # a Mac GPU: half precision
    assert on_disk.offloadable and on_disk.moe_layers == 32 and on_disk.expert_bits == 4
    assert 25.3e9 < on_disk.total_expert_disk_bytes < 25.5e9  # "about 25.4 GB of experts"
    assert 0.85e9 < on_disk.resident_bytes < 0.95e9  # "about 0.9 GB everything else"
    assert on_disk.total_expert_bytes == on_disk.total_expert_disk_bytes  # f16 scales stay f16
    assert on_disk.expert_bytes * 8 * 32 == on_disk.total_expert_bytes
    assert on_disk.minimum_budget == (
        on_disk.resident_bytes + on_disk.reserve_bytes + 32 * 2 * on_disk.expert_bytes
    )
    # The arithmetic estimate `info` uses for re-quantization options agrees with the headers.
    estimate = B.estimate_plan(checkpoint.args, 2, bits=4)
    assert estimate.total_expert_disk_bytes == on_disk.total_expert_disk_bytes
    assert abs(estimate.resident_bytes - on_disk.resident_bytes) < 0.01 * on_disk.resident_bytes


def test_prediction_matches_the_arithmetic(mixtral):
    plan = B.memory_plan(weights.locate(mixtral), compute_bytes=2)
    budget, disk, memory = 12 * 10**9, 3e9, 68e9
    p = B.predict(plan, budget, disk, memory)
    cache = budget - plan.resident_bytes - plan.reserve_bytes
    cached = cache / plan.total_expert_bytes
    miss_bytes = 32 * 2 * plan.expert_disk_bytes * (1 - cached)
    memory_bytes = plan.resident_active_bytes + 32 * 2 * plan.expert_bytes
    assert p.cached_fraction == pytest.approx(cached) and p.feasible and not p.fits
    assert p.disk_bytes_per_token == pytest.approx(miss_bytes)
    assert p.memory_bytes_per_token == pytest.approx(memory_bytes)
    assert p.tps == pytest.approx(min(memory / memory_bytes, disk / miss_bytes))
    assert p.bound == "disk" and 0.7 < p.tps < 1.3  # "bounded near 1 tok/s on a 16 GB M1"
    assert B.predict(plan, 40 * 10**9, disk, memory).tps == pytest.approx(memory / memory_bytes)
    assert not B.predict(plan, 10**9, disk, memory).feasible


def test_info_predicts_fit_and_speed(mixtral):
    env = {
        "MIXCHAT_DISK_BANDWIDTH": "3",
        "MIXCHAT_MEMORY_BANDWIDTH": "68",
        "MIXCHAT_DTYPE": "float16",
    }
    result = mixchat("info", str(mixtral), "--memory-budget", "12GB", "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    memory = json.loads(result.stdout)["memory"]
    plan = B.memory_plan(weights.locate(mixtral), compute_bytes=2)
    expected = B.predict(plan, 12 * 10**9, 3e9, 68e9)
    assert memory["budget"] == 12 * 10**9 and not memory["fits"] and memory["feasible"]
    assert memory["minimum_budget"] == plan.minimum_budget
    assert memory["prediction"]["tps"] == pytest.approx(expected.tps)
    assert memory["prediction"]["bound"] == "disk"
    assert memory["disk_method"] == "given by MIXCHAT_DISK_BANDWIDTH"
    options = [o["option"] for o in memory["options"]]
    assert "mixchat quantize SRC DST --expert-bits 3" in options
    three_bit = memory["options"][options.index("mixchat quantize SRC DST --expert-bits 3")]
    assert three_bit["prediction"]["tps"] > expected.tps  # fewer bytes missed per token
    text = mixchat("info", str(mixtral), "--memory-budget", "12GB", env=env).stdout.decode()
    assert "fits           no: needs" in text and f"≈ {expected.tps:.1f} tok/s" in text
    assert "--expert-bits 3" in text and "disk-bound" in text
    small = mixchat("info", str(mixtral), "--memory-budget", "2GB", env=env).stdout.decode()
    assert f"below the minimum of {B.format_bytes(plan.minimum_budget)}" in small


# --- bad budgets ------------------------------------------------------------------------------


def test_budget_below_the_minimum_is_a_one_line_error(mixtral):
    env = {"MIXCHAT_DTYPE": "float16"}
    plan = B.memory_plan(weights.locate(mixtral), compute_bytes=2)
    result = mixchat("ask", "--model", str(mixtral), "--memory-budget", "4GB", "hi", env=env)
    assert_one_line_error(result, 1, f"minimum of {B.format_bytes(plan.minimum_budget)}")
    assert "--memory-budget" in result.stderr.decode()
    result = mixchat("chat", "--model", str(mixtral), "--memory-budget", "4GB", env=env)
    assert_one_line_error(result, 1, "below the minimum")


def test_garbage_budget_is_a_usage_error(tiny_mixtral):
    for command in (["ask", "--model", str(tiny_mixtral), "hi"], ["info", str(tiny_mixtral)],
                    ["chat"]):  # fmt: skip
        result = mixchat(*command, "--memory-budget", "lots")
        assert_one_line_error(result, 2, "not a memory size")


def test_unquantized_moe_over_budget_asks_for_quantization(tiny_mixtral):
    checkpoint = weights.locate(tiny_mixtral)
    plan = B.memory_plan(checkpoint, 4)
    assert not plan.offloadable
    with pytest.raises(B.BudgetError, match="mixchat quantize"):
        B.check_budget(plan, plan.full_bytes - 1, "tiny")
    assert B.check_budget(plan, plan.full_bytes, "tiny") is False  # fits: loads as usual


def test_disk_bandwidth_is_measured_on_the_experts(tiny_mixtral):
    checkpoint = weights.locate(tiny_mixtral)
    regions = B.expert_regions(checkpoint)
    assert regions and all(start < stop for _, start, stop in regions)
    bandwidth, method = B.measure_disk_bandwidth(regions, max_bytes=1 << 20)
    assert bandwidth > 0 and "read" in method
