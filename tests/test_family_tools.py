"""GGUF files, `mixchat quantize` and `mixchat compare` for the MoE families mixchat runs on
mlx-lm's definitions (model/families.py), on tiny random checkpoints laid out as published
(tests/test_families.py). References nobody here wrote: gguf-py (llama.cpp's tensor names,
metadata keys and block formats), transformers (the logits) and mlx-lm (its own conversion,
loading and generation)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from model import Engine
from tests.checkpoints import mistral_tokenizer_file
from tests.gguf_files import sentencepiece_metadata
from tests.test_families import PROMPT, TOKENS, _reply, build_family, transformers_model

GGUF_ARCH = {"qwen3_moe": "QWEN3MOE", "qwen2_moe": "QWEN2MOE", "olmoe": "OLMOE"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-tools")
    return {family: build_family(root / family, family) for family in GGUF_ARCH}


def _stored(kind: str, data: np.ndarray) -> tuple[object, np.ndarray]:
    """What a GGUF holds for `data` as `kind` (bytes or a float array), and gguf-py's value of it."""
    import gguf

    if kind == "F32":
        return data.astype(np.float32), data.astype(np.float32)
    if kind == "F16":
        return data.astype(np.float16), data.astype(np.float16).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(data.astype(np.float32), qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(data.shape)


def write_family_gguf(path, src, family: str, quantized: bool, without: str = ""):
    """`src` (a tiny checkpoint) as llama.cpp's converter writes it: names from gguf-py's
    TensorNameMap, experts stacked [E, out, in], metadata under gguf.Keys; attention and expert
    matrices F16 or Q8_0, norms F32. Returns the transformers model holding the stored values."""
    import gguf
    import transformers

    config = transformers.AutoConfig.from_pretrained(src)
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[family])
    names = gguf.TensorNameMap(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(getattr(config, "head_dim", None) or 16)
    writer.add_value_length(getattr(config, "head_dim", None) or 16)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if without != "expert_count":
        writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if getattr(config, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    for key, value in sentencepiece_metadata(mistral_tokenizer_file("v1")).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(np.asarray(value).tolist()))
    from safetensors.numpy import load_file, save_file

    state = load_file(str(src / "model.safetensors"))  # the published layout: one per expert
    experts: dict[str, list] = {}
    tensors: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if ".mlp.experts." in name:  # stacked, as llama.cpp's converter does
            head, rest = name.split(".mlp.experts.")
            expert, proj = rest.split(".", 1)
            experts.setdefault(f"{head}.mlp.experts.{proj}", []).append((int(expert), value))
        else:
            tensors[name] = value
    for name, values in experts.items():
        tensors[name] = np.stack([v for _, v in sorted(values)])
    stored: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))  # with its suffix
        assert gguf_name is not None, name  # every tensor has llama.cpp's name
        matrix = value.ndim >= 2 and "norm" not in name and value.shape[-1] % 32 == 0
        kind = ("Q8_0" if quantized else "F16") if matrix and "embed" not in name else "F32"
        data, stored[name] = _stored(kind, value)
        if kind == "F16" and name.endswith("shared_expert_gate.weight"):
            data = data[0]  # [hidden], as llama.cpp declares ffn_gate_inp_shexp
        if kind in ("F32", "F16"):
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, data,
                              raw_dtype=gguf.GGMLQuantizationType[kind])  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    copy = path.with_suffix("")  # the reference: the checkpoint holding what the file holds
    shutil.copytree(src, copy)
    values = {}
    for name in state:
        if ".mlp.experts." in name:
            head, rest = name.split(".mlp.experts.")
            expert, proj = rest.split(".", 1)
            values[name] = stored[f"{head}.mlp.experts.{proj}"][int(expert)]
        else:
            values[name] = stored[name]
    save_file({k: np.ascontiguousarray(v) for k, v in values.items()},
              str(copy / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    return transformers_model(copy)


@pytest.mark.parametrize("quantized", [False, True], ids=["f16", "q8_0"])
@pytest.mark.parametrize("family", list(GGUF_ARCH))
def test_gguf_with_llama_cpp_names_gives_transformers_logits(sources, tmp_path, family, quantized):
    import torch

    path = tmp_path / f"{family}.gguf"
    reference = write_family_gguf(path, sources[family], family, quantized)
    engine = Engine.load(str(path))
    assert engine.info.architecture == family and engine.info.num_experts == 8
    ids = engine.prompt_ids(prompt=PROMPT)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits.float().numpy()
        original = transformers_model(sources[family])(torch.tensor([ids])).logits.numpy()
    logits = np.array(engine.model(mx.array([ids])))
    np.testing.assert_allclose(logits, expected, atol=2e-4 * np.abs(expected).max())
    # the file's own rounding: F16 or Q8_0 (8 bits per 32 weights) against the float model
    error = np.abs(logits - original).max() / np.abs(original).max()
    assert error < (0.05 if quantized else 0.005)
    text, tokens = _reply(engine)
    assert len(tokens) >= TOKENS - 1 and text
    # `mixchat quantize FILE.gguf DIR`: an MLX directory that runs as the file does
    from quantize.gguf_dir import convert_gguf

    directory = convert_gguf(path, tmp_path / "dir", max_shard_bytes=1 << 30).dst
    again = Engine.load(str(directory))
    assert again.info.architecture == family
    np.testing.assert_array_equal(np.array(again.model(mx.array([ids]))), logits)


def test_gguf_without_expert_count_is_one_line(sources, tmp_path):
    from model.errors import MixchatError

    path = tmp_path / "bad.gguf"
    write_family_gguf(path, sources["qwen3_moe"], "qwen3_moe", False, without="expert_count")
    with pytest.raises(MixchatError) as e:
        Engine.load(str(path))
    assert str(e.value) == "GGUF metadata lacks qwen3moe.expert_count"


def _mlx_lm_greedy(path) -> list[int]:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(str(path))
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=TOKENS,
                                                     sampler=make_sampler(0.0))]  # fmt: skip


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_quantized_family_is_mlx_lms_conversion(sources, tmp_path, family):
    """`mixchat quantize` of the published layout writes what `mlx_lm.convert -q` writes (the
    router and shared-expert gate at mlx-lm's precision: Qwen3-MoE's router 8-bit), and mixchat
    and mlx-lm generate the same greedy tokens from it."""
    import mlx_lm

    from quantize.cli import main

    out, ref = tmp_path / "q", tmp_path / "ref"
    assert main(["quantize", str(sources[family]), str(out), "--no-eval", "--quiet"]) == 0
    mlx_lm.convert(str(sources[family]), str(ref), quantize=True, q_bits=4, q_group_size=64)
    ours = json.loads((out / "config.json").read_text())["quantization"]
    theirs = json.loads((ref / "config.json").read_text())["quantization"]
    for name, choice in theirs.items():
        if isinstance(choice, dict):  # e.g. Qwen3-MoE's 8-bit router
            assert {k: ours[name][k] for k in choice} == choice
    written, expected = mx.load(str(out / "model.safetensors")), {}
    for file in ref.glob("*.safetensors"):
        expected.update(mx.load(str(file)))
    assert sorted(written) == sorted(expected)
    for name, value in expected.items():
        assert written[name].dtype == value.dtype and mx.array_equal(written[name], value), name
    gate = "model.layers.0.mlp.shared_expert_gate" if family == "qwen2_moe" else "model.layers.0.mlp.gate"
    assert f"{gate}.scales" in written  # quantized, as mlx-lm does
    _, tokens = _reply(Engine.load(str(out)))
    assert tokens == _mlx_lm_greedy(out)[: len(tokens)] and len(tokens) >= TOKENS - 1


def assert_compare_with_itself(src: str, text: str, reference=None):
    """`compare` of a checkpoint with itself: KL 0, every top-1 and route agreeing, and its
    perplexity transformers' on the same tokens (of `reference`: default, the checkpoint).
    Returns the comparison and the tokens."""
    import torch

    from quantize.compare import compare_models
    from quantize.report import text_ids

    itself = compare_models(src, src, text, max_tokens=32)
    assert itself.kl_divergence == pytest.approx(0, abs=1e-6)
    assert itself.top1_agreement == 1 and itself.router_agreement == 1
    ids = text_ids(Engine.load(src).tokenizer, text, 32)
    with torch.no_grad():
        logits = transformers_model(reference or src)(torch.tensor([ids])).logits[0, :-1].double()
    nll = -torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert itself.perplexity_reference == pytest.approx(float(nll.mean().exp()), rel=1e-3)
    return itself, ids


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_compare_runs_the_family_layers(sources, tmp_path, family):
    """`mixchat compare` runs a family's own (mlx-lm) layers: the reference's perplexity is
    transformers' on the same tokens; a model against itself agrees everywhere; a 4-bit copy
    (`mixchat quantize`) differs, its routers mostly agreeing."""

    from quantize.cli import main
    from quantize.compare import compare_models

    src = str(sources[family])
    text = "The quick brown fox jumps over the lazy dog. " * 3
    itself, _ = assert_compare_with_itself(src, text)
    out = tmp_path / "q"
    assert main(["quantize", src, str(out), "--no-eval", "--quiet"]) == 0
    quantized = compare_models(src, str(out), text, max_tokens=32)
    assert quantized.perplexity_reference == itself.perplexity_reference
    assert quantized.kl_divergence > 1e-4 and 0.5 < quantized.router_agreement < 1
