"""llama.cpp's deepseek2 GGUF files (DeepSeek-V2 and V3) as convert_hf_to_gguf.py's
DeepseekV2Model writes them, read by mixchat (model/gguf_deepseek.py), on the tiny checkpoints of
tests/test_family_deepseek.py. Names from gguf-py's TensorNameMap, keys from the writer's methods.

Both layouts: "mla" (today's converter: MLA as MQA, head_count_kv 1, key_length_mla, kv_b_proj
split per head into attn_k_b, transposed, and attn_v_b; expert group counts) and "legacy" (files
before llama.cpp's MLA rewrite: per-head key_length, attn_kv_b whole, no group counts, and V2's
without expert_gating_func). Reference: transformers on the values the file holds (F16, or Q8_0
where rows allow it, as --outtype q8_0 leaves the rest F16)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from model import Engine
from tests.checkpoints import mistral_tokenizer_file
from tests.gguf_files import sentencepiece_metadata
from tests.test_families import (
    PROMPT,
    TOKENS,
    _reply,
    assert_engine_is_transformers,
    transformers_greedy,
)
from tests.test_family_deepseek import FAMILIES, MLA, build_checkpoint, deepseek_config

CASES = [  # (family, layout, quantized type of the matrices whose rows allow it)
    ("deepseek_v3", "mla", None),
    ("deepseek_v2", "mla", None),
    ("deepseek_v3", "legacy", None),
    ("deepseek_v2", "legacy", None),
    ("deepseek_v2", "mla", "Q8_0"),  # attn_v_b Q8_0, attn_k_b F16: joined dequantized
    ("deepseek_v3", "legacy", "Q8_0"),  # attn_kv_b Q8_0: split dequantized
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek-gguf")
    return {family: build_checkpoint(root / family, prefix, {**MLA, **extra}, fix=deepseek_config)
            for family, (prefix, extra) in FAMILIES.items()}  # fmt: skip


def _type(gguf_name: str, value: np.ndarray, qtype: str | None) -> str:
    """The type convert_hf_to_gguf.py stores: F32 vectors, norms and routers; else `qtype`
    where a row is whole blocks of 32, else F16."""
    if value.ndim < 2 or "norm" in gguf_name or "ffn_gate_inp" in gguf_name:
        return "F32"
    return qtype if qtype and value.shape[-1] % 32 == 0 else "F16"


def _stored(value: np.ndarray, kind: str) -> np.ndarray:
    """The float32 values a tensor of type `kind` holds."""
    import gguf

    if kind == "F32":
        return value.astype(np.float32)
    if kind == "F16":
        return value.astype(np.float16).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    return gguf.quants.dequantize(gguf.quants.quantize(value.astype(np.float32), qtype), qtype)


def converter_tensors(config: dict, state: dict, layout: str):
    """DeepseekV2Model.modify_tensors: (Hugging Face name, value) pairs, experts stacked, the
    correction bias renamed, kv_b_proj split per head (the "mla" layout)."""
    heads, nope, v = (config[k] for k in ("num_attention_heads", "qk_nope_head_dim", "v_head_dim"))
    for name, value in state.items():
        if ".mlp.experts." in name:
            if ".experts.0." in name:
                head, rest = name.split(".experts.0.")
                yield f"{head}.experts.{rest}", np.stack(
                    [state[f"{head}.experts.{e}.{rest}"] for e in range(config["n_routed_experts"])])
        elif name.endswith("e_score_correction_bias"):
            yield name.replace("e_score_correction_bias", "e_score_correction.bias"), value
        elif name.endswith("kv_b_proj.weight") and layout == "mla":
            kv_b = value.reshape(heads, nope + v, value.shape[-1])
            yield name.replace("kv_b_proj", "k_b_proj"), kv_b[:, :nope].swapaxes(1, 2)
            yield name.replace("kv_b_proj", "v_b_proj"), kv_b[:, nope:]
        else:
            yield name, value


def write_gguf(path, src, layout: str, qtype: str | None, key_length_mla: bool = True) -> dict:
    """The GGUF of `src`; returns the Hugging Face state holding the values the file holds."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((src / "config.json").read_text())
    sigmoid = config["model_type"] == "deepseek_v3"
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.DEEPSEEK2, config["num_hidden_layers"])
    w = gguf.GGUFWriter(str(path), "deepseek2")
    # TextModel.set_gguf_parameters (num_key_value_heads set to 1 first by today's converter)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(1 if layout == "mla" else config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_expert_count(config["n_routed_experts"])
    w.add_expert_used_count(config["num_experts_per_tok"])
    if layout == "mla":
        w.add_expert_group_count(config["n_group"])
        w.add_expert_group_used_count(config["topk_group"])
    if sigmoid or layout == "mla":  # V2-era files have no gating key (llama.cpp: softmax)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid
                                 else gguf.ExpertGatingFuncType.SOFTMAX)  # fmt: skip
    # DeepseekV2Model.set_gguf_parameters
    w.add_leading_dense_block_count(config["first_k_dense_replace"])
    w.add_vocab_size(config["vocab_size"])
    if config.get("q_lora_rank") is not None:
        w.add_q_lora_rank(config["q_lora_rank"])
    kv_lora, rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
    w.add_kv_lora_rank(kv_lora)
    if layout == "mla":
        w.add_key_length(kv_lora + rope)
        w.add_value_length(kv_lora)
        if key_length_mla:
            w.add_key_length_mla(config["qk_nope_head_dim"] + rope)
        w.add_value_length_mla(config["v_head_dim"])
    else:
        w.add_key_length(config["qk_nope_head_dim"] + rope)
        w.add_value_length(config["v_head_dim"])
    w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    w.add_expert_shared_count(config["n_shared_experts"])
    w.add_expert_weights_scale(config["routed_scaling_factor"])
    if config["norm_topk_prob"]:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope)
    yarn = config.get("rope_scaling") or {}
    if yarn.get("type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn["factor"])
        w.add_rope_scaling_orig_ctx_len(yarn["original_max_position_embeddings"])
        if layout == "mla":
            w.add_rope_scaling_yarn_beta_fast(yarn["beta_fast"])
            w.add_rope_scaling_yarn_beta_slow(yarn["beta_slow"])
        w.add_rope_scaling_yarn_log_mul(0.1 * yarn["mscale_all_dim"])
    for key, value in sentencepiece_metadata(mistral_tokenizer_file("v1")).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(np.asarray(value).tolist()))
    state = load_file(str(src / "model.safetensors"))
    held = {}  # Hugging Face-form name -> the values the file holds
    for name, value in converter_tensors(config, state, layout):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name  # every tensor has llama.cpp's name
        kind = _type(gguf_name, value, qtype)
        if kind in ("F32", "F16"):
            w.add_tensor(gguf_name, value.astype(np.float32 if kind == "F32" else np.float16))
        else:
            qt = gguf.GGMLQuantizationType[kind]
            w.add_tensor(gguf_name, gguf.quants.quantize(value.astype(np.float32), qt), raw_dtype=qt)
        held[name] = _stored(value, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return _published_form(config, held)


def _published_form(config: dict, held: dict) -> dict:
    """The file's values under the published names (the test's own inverse of the converter)."""
    out = {}
    for name, value in held.items():
        if name.endswith("e_score_correction.bias"):
            out[name.replace("e_score_correction.bias", "e_score_correction_bias")] = value
        elif ".mlp.experts." in name:
            head, rest = name.split(".experts.")
            for e in range(value.shape[0]):
                out[f"{head}.experts.{e}.{rest}"] = value[e]
        elif name.endswith(".k_b_proj.weight"):
            v_b = held[name.replace("k_b_proj", "v_b_proj")]
            kv_b = np.concatenate([value.swapaxes(1, 2), v_b], axis=1)
            out[name.replace("k_b_proj", "kv_b_proj")] = kv_b.reshape(-1, kv_b.shape[-1])
        elif not name.endswith(".v_b_proj.weight"):
            out[name] = value
    return out


def reference_dir(path, src, state: dict, layout: str):
    """`src` holding the file's values; a legacy file keeps no expert groups, so its reference
    routes without them (as llama.cpp runs such a file)."""
    from safetensors.numpy import save_file

    shutil.copytree(src, path)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    if layout == "legacy":
        config.update(n_group=1, topk_group=1)
        if config["model_type"] == "deepseek_v2":
            config["topk_method"] = "greedy"
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.mark.parametrize(("family", "layout", "qtype"), CASES)
def test_deepseek2_gguf_gives_transformers_logits_and_greedy_text(sources, tmp_path, family,
                                                                   layout, qtype):  # fmt: skip
    path = tmp_path / "model.gguf"
    state = write_gguf(path, sources[family], layout, qtype)
    reference = reference_dir(tmp_path / "reference", sources[family], state, layout)
    engine = Engine.load(str(path))
    assert engine.info.architecture == family and engine.info.num_experts == 8
    quantized = [k for k, _ in tree_flatten(engine.model.parameters()) if k.endswith(".scales")]
    assert bool(quantized) == (qtype is not None)  # Q8_0 runs as MLX's 8-bit affine layers
    ids, logits, tokens = assert_engine_is_transformers(engine, reference)
    # `mixchat quantize FILE.gguf DIR`: an MLX directory in mlx-lm's names (kv_b_proj or
    # embed_q/unembed_out) that runs as the file does and that mlx-lm loads
    from mlx_lm.utils import load_model

    from quantize.gguf_dir import convert_gguf

    directory = convert_gguf(path, tmp_path / "dir", max_shard_bytes=1 << 30).dst
    again = Engine.load(str(directory))
    np.testing.assert_array_equal(np.array(again.model(mx.array([ids]))), logits)
    assert load_model(directory)[1]["model_type"] == family


def test_an_mqa_file_without_its_per_head_key_size_is_one_line(sources, tmp_path):
    """Today's layout without attention.key_length_mla cannot be read exactly: refused in one
    line naming the key."""
    from model.errors import MixchatError

    path = tmp_path / "model.gguf"
    write_gguf(path, sources["deepseek_v3"], "mla", None, key_length_mla=False)
    with pytest.raises(MixchatError) as e:
        Engine.load(str(path))
    assert str(e.value).startswith("GGUF metadata lacks deepseek2.attention.key_length_mla")
    assert "\n" not in str(e.value)


def test_ask_raw_on_a_deepseek2_gguf_prints_transformers_greedy_text(sources, tmp_path, capsys):
    from app.cli import main

    path = tmp_path / "model.gguf"
    state = write_gguf(path, sources["deepseek_v3"], "mla", None)
    reference = reference_dir(tmp_path / "reference", sources["deepseek_v3"], state, "mla")
    engine = Engine.load(str(path))
    greedy = transformers_greedy(reference, engine.prompt_ids(prompt=PROMPT), TOKENS)
    capsys.readouterr()
    assert main(["ask", "--raw", "--model", str(path), "--temp", "0", "--max-tokens",
                 str(TOKENS), "--json", PROMPT]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == engine.tokenizer.decode(greedy)


def test_a_quantized_deepseek2_gguf_streams_its_experts_under_a_budget(sources, tmp_path):
    """The Q8_0 file's experts read by byte range within a budget: the same greedy tokens."""
    from tests.test_family_budget import CONTEXT, tight_budget

    path = tmp_path / "model.gguf"
    write_gguf(path, sources["deepseek_v3"], "legacy", "Q8_0")
    whole = Engine.load(str(path), memory_budget="none", max_context=CONTEXT)
    budget, _ = tight_budget(path)
    engine = Engine.load(str(path), memory_budget=budget, max_context=CONTEXT)
    assert engine.model.memory.offload, "the experts should stream under this budget"
    assert _reply(engine)[1] == _reply(whole)[1]
