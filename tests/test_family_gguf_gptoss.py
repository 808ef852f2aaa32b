"""gpt-oss GGUF files as llama.cpp's converter (convert_hf_to_gguf.py, class GptOssModel) writes
them, read by mixchat: names from gguf-py's TensorNameMap, metadata under the writer's gguf.Keys
methods, the converter's transformations redone here (the fused gate_up_proj split into its even
and odd rows, experts transposed to [E, out, in], `sinks` named `attn_sinks.weight`, published
MXFP4 blocks repacked by `transform_nibble_layout` as GGML's MXFP4), on the tiny checkpoints of
tests/test_family_gptoss.py. Reference: transformers on the values the file holds (MXFP4: its
own dequantization of the same blocks)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from model import Engine
from tests.checkpoints import mistral_tokenizer_file
from tests.gguf_files import sentencepiece_metadata
from tests.test_families import (
    PROMPT,
    TOKENS,
    _reply,
    assert_engine_is_transformers,
)
from tests.test_family_gptoss import CONFIG, HARMONY, HARMONY_TOKENS, build_gptoss


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """tests/test_family_gptoss.py's float and MXFP4 directories, and a copy of the float one
    with its matrices rounded to float16 (what an F16 GGUF holds: its exact reference)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("gptoss-gguf")
    paths = build_gptoss(root)
    rounded = root / "rounded"
    shutil.copytree(paths["float"], rounded)
    state = load_file(str(rounded / "model.safetensors"))
    state = {k: v.astype(np.float16).astype(np.float32) if v.ndim >= 2 else v
             for k, v in state.items()}  # fmt: skip
    save_file(state, str(rounded / "model.safetensors"), metadata={"format": "pt"})
    return {**paths, "rounded": rounded}


def _nibble_layout(blocks: np.ndarray) -> np.ndarray:
    """GptOssModel.transform_nibble_layout, in numpy: 16 bytes holding elements (2j, 2j + 1)
    (low nibble first) -> byte j holding elements j (low nibble) and j + 16 (high)."""
    low, high = blocks & 0x0F, blocks >> 4
    codes = np.stack([low, high], axis=-1).reshape(*blocks.shape[:-1], 32)
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def _repack_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """GptOssModel.repack_mxfp4: [E, out, in/32, 16] blocks + [E, out, in/32] E8M0 scales ->
    GGML MXFP4 bytes [E, out, in/32 * 17] (each block: its scale, then the 16 code bytes)."""
    data = np.concatenate([scales[..., None], _nibble_layout(blocks)], axis=-1)
    return data.reshape(*data.shape[:2], -1)


def _converted(name: str, value: np.ndarray) -> list[tuple[str, np.ndarray, str]]:
    """GptOssModel.filter_tensors / generate_extra_tensors / modify_tensors: (HF-style name, data,
    kind) triples: "mxfp4" (raw GGML blocks) or "float"."""
    if name.endswith("self_attn.sinks"):
        return [(name + ".weight", value, "float")]
    head = name.rsplit(".", 1)[0]  # model.layers.N.mlp.experts
    if name.endswith("down_proj_bias"):
        return [(f"{head}.down_proj.bias", value, "float")]
    if name.endswith("gate_up_proj_bias"):
        return [(f"{head}.gate_proj.bias", value[..., ::2], "float"),
                (f"{head}.up_proj.bias", value[..., 1::2], "float")]  # fmt: skip
    if name.endswith("down_proj"):
        return [(f"{head}.down_proj.weight", value.swapaxes(-1, -2), "float")]
    if name.endswith("gate_up_proj"):
        value = value.swapaxes(-1, -2)
        return [(f"{head}.gate_proj.weight", value[:, ::2], "float"),
                (f"{head}.up_proj.weight", value[:, 1::2], "float")]  # fmt: skip
    return [(name, value, "float")]


def _converted_mxfp4(state: dict) -> list[tuple[str, np.ndarray, str]]:
    """The MXFP4 experts, as generate_extra_tensors repacks them (gate_up's even rows: gate)."""
    out = []
    for name in state:
        if name.endswith("down_proj_blocks"):
            head = name.removesuffix(".down_proj_blocks")
            scales = state[f"{head}.down_proj_scales"]
            out.append((f"{head}.down_proj.weight", _repack_mxfp4(state[name], scales), "mxfp4"))
        if name.endswith("gate_up_proj_blocks"):
            head = name.removesuffix(".gate_up_proj_blocks")
            blocks, scales = state[name], state[f"{head}.gate_up_proj_scales"]
            for proj, rows in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
                data = _repack_mxfp4(blocks[:, rows], scales[:, rows])
                out.append((f"{head}.{proj}.weight", data, "mxfp4"))
    return out


def _tokenizer_metadata() -> dict:
    """The float directory's vocabulary as the converter writes it: the SentencePiece pieces,
    the harmony tokens as control tokens, padded to vocab_size with [PADn], and its template."""
    meta = sentencepiece_metadata(mistral_tokenizer_file("v1"))
    tokens = list(meta["tokenizer.ggml.tokens"]) + HARMONY_TOKENS
    types = list(meta["tokenizer.ggml.token_type"]) + [3] * len(HARMONY_TOKENS)
    pads = [f"[PAD{i}]" for i in range(len(tokens), CONFIG["vocab_size"])]
    meta["tokenizer.ggml.tokens"] = tokens + pads
    meta["tokenizer.ggml.token_type"] = np.array(types + [5] * len(pads), np.int32)
    meta["tokenizer.ggml.scores"] = np.concatenate(
        [meta["tokenizer.ggml.scores"], np.zeros(len(HARMONY_TOKENS) + len(pads), np.float32)])
    meta["tokenizer.chat_template"] = HARMONY
    return meta


def write_gptoss_gguf(path, src, mxfp4: bool = False, template: bool = True) -> None:
    """`src` converted: matrices F16 (the converter's default --outtype f16; vectors F32), or
    (mxfp4) the experts as GGML MXFP4 and everything else F32."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((src / "config.json").read_text())
    arch = gguf.MODEL_ARCH.GPT_OSS
    names = gguf.TensorNameMap(arch, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(config["num_local_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_vocab_size(config["vocab_size"])
    rope = config["rope_scaling"]  # TextModel.set_gguf_parameters' YaRN
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    writer.add_sliding_window(config["sliding_window"])  # GptOssModel.set_gguf_parameters
    writer.add_expert_feed_forward_length(config["intermediate_size"])
    for key, value in _tokenizer_metadata().items():
        if key == "tokenizer.chat_template" and not template:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(np.asarray(value).tolist()))
    state = load_file(str(src / "model.safetensors"))
    tensors = _converted_mxfp4(state) if mxfp4 else []
    for name, value in state.items():
        if not name.endswith(("_blocks", "_scales")):
            tensors += _converted(name, value)
    for name, value, kind in tensors:
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name  # every tensor has llama.cpp's name
        if kind == "mxfp4":
            writer.add_tensor(gguf_name, value, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
        elif value.ndim >= 2 and not mxfp4:
            writer.add_tensor(gguf_name, value.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_the_fixtures_mxfp4_is_transformers_dequantization(sources, tmp_path):
    """The repacked blocks (this file's redo of the converter) are GGML MXFP4 holding what the
    published blocks hold: gguf-py's dequantization of the file is transformers' of the
    checkpoint, bit for bit."""
    import gguf
    from safetensors.numpy import load_file

    path = tmp_path / "gpt-oss.gguf"
    write_gptoss_gguf(path, sources["mxfp4"], mxfp4=True)
    reader = gguf.GGUFReader(str(path))
    reference = load_file(str(sources["reference"] / "model.safetensors"))
    gate_up = reference["model.layers.1.mlp.experts.gate_up_proj"].swapaxes(-1, -2)  # [E, out, in]
    found = {t.name: t for t in reader.tensors}
    tensor = found["blk.1.ffn_up_exps.weight"]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.MXFP4
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    np.testing.assert_array_equal(values.reshape(gate_up[:, 1::2].shape), gate_up[:, 1::2])


@pytest.mark.parametrize("kind", ["f16", "mxfp4"])
def test_gguf_with_llama_cpp_names_gives_transformers_logits(sources, tmp_path, kind):
    """Past the sliding window (4) and through YaRN: mixchat's logits and greedy tokens on the
    file are transformers' on the values it holds; MXFP4 experts stay MXFP4 (MLX's mode)."""
    path = tmp_path / f"gpt-oss-{kind}.gguf"
    write_gptoss_gguf(path, sources["mxfp4" if kind == "mxfp4" else "float"], kind == "mxfp4")
    reference = sources["reference" if kind == "mxfp4" else "rounded"]
    engine = Engine.load(str(path))
    info = engine.info
    assert info.architecture == "gpt_oss" and info.num_experts == 8
    assert info.experts_per_token == 2
    if kind == "mxfp4":  # the experts were not dequantized: MLX's mxfp4 kernels run them
        experts = engine.model.layers[0].mlp.experts.up_proj
        assert experts.mode == "mxfp4" and experts.weight.dtype == mx.uint32
        assert "6 MXFP4" in info.tensor_types
    ids, logits, tokens = assert_engine_is_transformers(engine, reference)
    assert len(ids) > 2 * CONFIG["sliding_window"]
    # `mixchat quantize FILE.gguf DIR`: an MLX directory (MXFP4 experts as mxfp4 modules) that
    # runs as the file does
    from quantize.gguf_dir import convert_gguf

    directory = convert_gguf(path, tmp_path / "dir", max_shard_bytes=1 << 30).dst
    again = Engine.load(str(directory))
    assert again.info.architecture == "gpt_oss"
    np.testing.assert_array_equal(np.array(again.model(mx.array([ids]))), logits)


def test_chat_prompt_is_the_files_harmony_template(sources, tmp_path):
    """A chat is the file's tokenizer.chat_template (harmony) rendered as transformers renders
    the directory's, its markers encoded as the file's control tokens; a file without a template
    completes raw text, as any checkpoint without one does."""
    import transformers

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Where is Paris?"},
                {"role": "assistant", "content": "In France."},
                {"role": "user", "content": "And Rome?"}]  # fmt: skip
    tok = transformers.AutoTokenizer.from_pretrained(sources["float"])
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    path = tmp_path / "gpt-oss.gguf"
    write_gptoss_gguf(path, sources["mxfp4"], mxfp4=True)
    engine = Engine.load(str(path))
    ids = engine.prompt_ids(messages)
    assert engine.has_chat_template and ids == engine.tokenizer.encode_with_specials(text)
    start = tok.convert_tokens_to_ids("<|start|>")
    assert ids.count(start) == text.count("<|start|>") == 6  # system, developer, 3 turns, reply
    assert engine.tokenizer.decode(ids[-2:]).strip() == "assistant"
    bare = tmp_path / "bare.gguf"
    write_gptoss_gguf(bare, sources["mxfp4"], mxfp4=True, template=False)
    engine = Engine.load(str(bare))
    assert not engine.has_chat_template
    raw = [engine.tokenizer.bos_id, *engine.tokenizer.encode(PROMPT)]  # the file's add_bos
    assert engine.prompt_ids(prompt=PROMPT) == raw


@pytest.mark.parametrize("kind", ["f16", "mxfp4"])
def test_budgeted_gguf_streams_its_experts_with_their_biases(sources, tmp_path, kind):
    """Under a budget the file's experts stream from it (MXFP4 blocks as MLX's mxfp4, each
    expert's bias from its own F32 tensor): logits and greedy tokens are the whole model's."""
    from model.offload import runtime_of
    from tests.test_family_budget import CONTEXT, tight_budget

    path = tmp_path / f"gpt-oss-{kind}.gguf"
    write_gptoss_gguf(path, sources["mxfp4" if kind == "mxfp4" else "float"], kind == "mxfp4")
    whole = Engine.load(str(path), memory_budget="none", max_context=CONTEXT)
    ids = mx.array([whole.prompt_ids(prompt=PROMPT)])
    expected_logits = np.array(whole.model(ids))
    _, expected = _reply(whole)
    budget, _ = tight_budget(path)
    engine = Engine.load(str(path), memory_budget=budget, max_context=CONTEXT)
    runtime = runtime_of(engine.model)
    assert runtime is not None, "the experts should stream under this budget"
    modes = {spec and spec[2] for spec in runtime.specs[max(runtime.specs)].values()}
    assert modes == ({"mxfp4"} if kind == "mxfp4" else {None})
    arrays, _ = runtime.store.read(1, 3)  # what the cache is charged is what an expert takes
    read = sum(a.nbytes for parts in arrays.values() for a in parts if a is not None)
    assert runtime.store.expert_bytes(1) == read
    logits = np.array(engine.model(ids))
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5 * np.abs(expected_logits).max())
    _, tokens = _reply(engine)
    assert tokens == expected and len(tokens) >= TOKENS - 1
