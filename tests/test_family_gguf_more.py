"""GGUF files of GraniteMoE and PhiMoE as llama.cpp's converter (convert_hf_to_gguf.py) writes them, read by
mixchat: names from gguf-py's TensorNameMap, metadata under the writer's gguf.Keys methods,
the converter's transformations redone here (GraniteMoE's fused `input_linear` split into
ffn_gate_exps and ffn_up_exps, Q and K rows permuted for adjacent-pair RoPE; PhiMoE's experts
stacked, its LongRoPE factors as rope_factors_long/short tensors), on the tiny
checkpoints of tests/test_family_more.py. Reference: transformers on the values the file holds."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from model import Engine
from tests.checkpoints import mistral_tokenizer_file
from tests.gguf_files import sentencepiece_metadata
from tests.test_families import PROMPT, TOKENS, _reply, transformers_model
from tests.test_family_deepseek import build_checkpoint
from tests.test_family_more import COMMON, FAMILIES, published

GGUF_ARCH = {"granitemoe": "GRANITE_MOE", "phimoe": "PHIMOE"}


@pytest.fixture(scope="module")
def rounded(tmp_path_factory):
    """Each family's tiny checkpoint with its matrices rounded to float16: the values an F16
    GGUF holds, so that transformers on it is the file's exact reference."""
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("family-gguf-more")
    out = {}
    for family in GGUF_ARCH:
        prefix, extra = FAMILIES[family]
        path = build_checkpoint(root / family, prefix, {**COMMON, **extra}, fix=published)
        state = load_file(str(path / "model.safetensors"))
        state = {k: _f16(k, v).astype(np.float32) if _f16(k, v) is not None else v
                 for k, v in state.items()}  # fmt: skip
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        for scaling in (config.get("rope_scaling"), config.get("rope_parameters")):
            if isinstance(scaling, dict) and "short_mscale" in scaling:  # what the file keeps
                scaling["short_mscale"] = scaling["long_mscale"] = _attn_factor(config)
        (path / "config.json").write_text(json.dumps(config, indent=2))
        out[family] = path
    return out


def _f16(name: str, value: np.ndarray) -> np.ndarray | None:
    """A matrix stored as F16 (norms and vectors stay F32)."""
    if value.ndim >= 2 and "norm" not in name:
        return value.astype(np.float16)
    return None


def _attn_factor(config: dict) -> float:
    """Phi3MiniModel.generate_extra_tensors' rope.scaling.attn_factor (LongRoPE)."""
    scale = config["max_position_embeddings"] / config["original_max_position_embeddings"]
    return math.sqrt(1 + math.log(scale) / math.log(config["original_max_position_embeddings"]))


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows from Hugging Face's
    half-split rotary order to adjacent pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def _stack_experts(state: dict, experts: int) -> dict:
    out = {k: v for k, v in state.items() if ".block_sparse_moe.experts." not in k}
    for name in state:
        head, dot, rest = name.partition(".block_sparse_moe.experts.0.")
        if dot:
            out[f"{head}.block_sparse_moe.experts.{rest}"] = np.stack(
                [state[f"{head}.block_sparse_moe.experts.{e}.{rest}"] for e in range(experts)])
    return out


def _granite_tensors(config: dict, name: str, value: np.ndarray, family: str):
    """GraniteMoeModel.modify_tensors and LlamaModel's: (HF name or GGUF name, data) pairs."""
    import gguf

    if family != "granitemoe":
        return [(name, value)]
    if name.endswith("block_sparse_moe.input_linear.weight"):
        bid = int(name.split(".")[2])
        gate, up = np.split(value, 2, axis=-2)  # [E, 2 * ffn, hidden]: gate first
        fmt = gguf.TENSOR_NAMES
        return [(fmt[gguf.MODEL_TENSOR.FFN_GATE_EXP].format(bid=bid) + ".weight", gate),
                (fmt[gguf.MODEL_TENSOR.FFN_UP_EXP].format(bid=bid) + ".weight", up)]  # fmt: skip
    if name.endswith("q_proj.weight"):
        value = _permute(value, config["num_attention_heads"])
    if name.endswith("k_proj.weight"):
        value = _permute(value, config["num_key_value_heads"])
    return [(name, value)]


def write_gguf(path, src, family: str) -> None:
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((src / "config.json").read_text())
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[family])
    names = gguf.TensorNameMap(arch, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    rope = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    writer.add_rope_freq_base(rope)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(config["num_local_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if family == "phimoe":  # Phi3MiniModel.set_gguf_parameters and its LongRoPE tensors
        writer.add_rope_scaling_orig_ctx_len(config["original_max_position_embeddings"])
        writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
        writer.add_rope_scaling_attn_factors(_attn_factor(config))
        for which in ("long", "short"):
            factors = np.array(config["rope_scaling"][f"{which}_factor"], np.float32)
            writer.add_tensor(f"rope_factors_{which}.weight", factors)
    if family == "granitemoe":  # GraniteModel.set_gguf_parameters: multipliers as scales
        writer.add_attention_scale(config["attention_multiplier"])
        writer.add_embedding_scale(config["embedding_multiplier"])
        writer.add_residual_scale(config["residual_multiplier"])
        writer.add_logit_scale(config["logits_scaling"])
    for key, value in sentencepiece_metadata(mistral_tokenizer_file("v1")).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(np.asarray(value).tolist()))
    state = load_file(str(src / "model.safetensors"))
    if family == "phimoe":  # PhiMoeModel.modify_tensors: each layer's w1, w2, w3 stacked
        state = _stack_experts(state, config["num_local_experts"])
    for hf_name, hf_value in state.items():
        for name, value in _granite_tensors(config, hf_name, hf_value, family):
            gguf_name = name if name.startswith("blk.") else names.get_name(
                name, try_suffixes=(".weight", ".bias"))  # fmt: skip
            assert gguf_name is not None, name  # every tensor has llama.cpp's name
            f16 = _f16(name, value)
            writer.add_tensor(gguf_name, f16 if f16 is not None else value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", list(GGUF_ARCH))
def test_gguf_with_llama_cpp_names_gives_transformers_logits(rounded, tmp_path, family):
    import torch

    path = tmp_path / f"{family}.gguf"
    write_gguf(path, rounded[family], family)
    engine = Engine.load(str(path))
    assert engine.info.architecture == family and engine.info.num_experts == 8
    ids = engine.prompt_ids(prompt=PROMPT)
    with torch.no_grad():
        expected = transformers_model(rounded[family])(torch.tensor([ids])).logits.float().numpy()
    logits = np.array(engine.model(mx.array([ids])))
    np.testing.assert_allclose(logits, expected, atol=2e-4 * np.abs(expected).max())
    text, tokens = _reply(engine)
    assert len(tokens) >= TOKENS - 1 and text
    # `mixchat quantize FILE.gguf DIR`: an MLX directory (Q/K rows back in Hugging Face's
    # order, the multipliers in its config.json) that runs as the file does
    from quantize.gguf_dir import convert_gguf

    directory = convert_gguf(path, tmp_path / "dir", max_shard_bytes=1 << 30).dst
    again = Engine.load(str(directory))
    assert again.info.architecture == family
    np.testing.assert_array_equal(np.array(again.model(mx.array([ids]))), logits)
    # `mixchat compare FILE.gguf DIR`: the file read layer by layer (PhiMoE's biases and
    # LayerNorms too) gives the engine's numbers, and its directory the same model
    from quantize.compare import compare_models
    from quantize.report import text_ids
    from tests.test_family_tools_more import COMPARE_TEXT, _engine_statistics

    same = compare_models(str(path), str(directory), COMPARE_TEXT, max_tokens=32)
    assert same.kl_divergence == pytest.approx(0, abs=1e-6) and same.top1_agreement == 1
    ids = text_ids(engine.tokenizer, COMPARE_TEXT, 32)
    expected = _engine_statistics(str(path), str(directory), ids)
    for name in ("perplexity_reference", "perplexity_candidate", "router_agreement"):
        assert getattr(same, name) == pytest.approx(expected[name], rel=1e-3), name


def test_phimoe_gguf_past_the_original_context_runs_as_its_directory(rounded, tmp_path):
    """Past original_max_position_embeddings the file's rope_factors_long take over, as the long
    factors do for the Hugging Face directory holding the same values (tests/test_family_more.py
    checks that one against transformers there)."""
    path = tmp_path / "phimoe.gguf"
    write_gguf(path, rounded["phimoe"], "phimoe")
    ids = np.random.default_rng(1).integers(3, 32000, size=100).tolist()
    assert len(ids) > json.loads((rounded["phimoe"] / "config.json").read_text())[
        "original_max_position_embeddings"]  # fmt: skip
    logits = [np.array(Engine.load(str(p)).model(mx.array([ids]))[0, -1])
              for p in (path, rounded["phimoe"])]  # fmt: skip
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-4 * np.abs(logits[1]).max())
