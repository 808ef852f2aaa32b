"""GGUF files for the tests and benchmarks, written with gguf-py's GGUFWriter.

Quantized tensors are random blocks (every bit pattern is a valid block) whose fp16 d/dmin
fields are set so the weights have a chosen standard deviation and about zero mean; gguf-py's
`gguf.quants.dequantize` of the same bytes is the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Byte offsets of the fp16 fields of each block type: (d offsets, dmin offset or None, dmin / d
# ratio that centres the weights).
_FIELDS: dict[str, tuple[tuple[int, ...], int | None, float]] = {
    "Q4_0": ((0,), None, 0),
    "Q4_1": ((0,), 2, -7.5),
    "Q5_0": ((0,), None, 0),
    "Q5_1": ((0,), 2, -15.5),
    "Q8_0": ((0,), None, 0),
    "Q2_K": ((80,), 82, 1.5),
    "Q3_K": ((108,), None, 0),
    "Q4_K": ((0,), 2, 7.5),
    "Q5_K": ((0,), 2, 15.5),
    "Q6_K": ((208,), None, 0),
}


def random_blocks(ggml_type: str, shape: tuple[int, ...], std: float, rng) -> np.ndarray:
    """Random `ggml_type` blocks for a tensor of `shape` (numpy order), as uint8
    [..., row bytes]; dequantized, the weights have about mean 0 and standard deviation std."""
    import gguf

    qtype = gguf.GGMLQuantizationType[ggml_type]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    d_offsets, dmin_offset, ratio = _FIELDS[ggml_type]
    if ggml_type == "Q6_K":  # int8 sub-block scales as llama.cpp makes them: ~ -128 * range / max
        magnitude = rng.integers(48, 128, (n_blocks, 16))
        sign = rng.choice(np.array([-1, 1]), (n_blocks, 16))
        raw[:, 192:208] = (magnitude * sign).astype(np.int8).view(np.uint8)

    def set_fields(scale: np.ndarray) -> None:
        for o in d_offsets:
            raw[:, o : o + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
        if dmin_offset is not None:
            dmin = (scale * ratio).astype(np.float16)
            raw[:, dmin_offset : dmin_offset + 2] = dmin.view(np.uint8).reshape(-1, 2)

    base = rng.uniform(0.7, 1.3, n_blocks).astype(np.float32)
    set_fields(base)
    measured = float(gguf.quants.dequantize(raw, qtype).std())
    set_fields(base * (std / measured))
    return raw.reshape(*shape[:-1], -1)


def dequantize(ggml_type: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py's float32 value of a tensor stored as `ggml_type`."""
    import gguf

    if ggml_type in ("F32", "F16"):
        return np.asarray(data, np.float32).reshape(shape)
    qtype = gguf.GGMLQuantizationType[ggml_type]
    return gguf.quants.dequantize(data, qtype).reshape(shape)


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (rotate-half -> adjacent pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def sentencepiece_metadata(model_file: Path) -> dict:
    """Tokenizer metadata as llama.cpp's converter writes it from a tokenizer.model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = 1
        if sp.is_unknown(i):
            kind = 2
        elif sp.is_control(i):
            kind = 3
        elif sp.is_unused(i):
            kind = 5
        elif sp.is_byte(i):
            kind = 6
        types.append(kind)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array(scores, np.float32),
        "tokenizer.ggml.token_type": np.array(types, np.int32),
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def write_gguf(path: Path, arch_fields: dict, tokenizer: dict, tensors: dict) -> Path:
    """tensors: GGUF name -> (ggml type, data): float arrays for F32/F16, else raw blocks."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in arch_fields.items():
        _add(writer, f"llama.{key}", value)
    writer.add_string("general.name", path.stem)
    for key, value in tokenizer.items():
        _add(writer, key, value)
    for name, (kind, data) in tensors.items():
        if kind in ("F32", "F16"):
            writer.add_tensor(name, np.asarray(data, np.float32 if kind == "F32" else np.float16))
        else:
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        writer.add_uint32(key, int(value))
    elif isinstance(value, (float, np.floating)):
        writer.add_float32(key, float(value))
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, np.ndarray):
        writer.add_array(key, value.tolist())
    else:
        writer.add_array(key, list(value))


def tiny_mixtral_gguf(
    path: Path,
    types: dict[str, str],
    *,
    hidden: int = 256,
    ffn: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    experts: int = 4,
    stacked: bool = True,
    chat_template: str | None = None,
    seed: int = 0,
    with_values: bool = True,
    vocab: int | None = None,
) -> tuple[Path, dict[str, np.ndarray]]:
    """A random Mixtral GGUF with the Mistral v1 vocabulary. `types` maps a role ("embd",
    "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
    optionally "ffn_down.<layer>") to a ggml type. `vocab` keeps only the first pieces of the
    vocabulary (a smaller, faster model; no longer Mistral's). Returns the path and gguf-py's
    dequantized value of every tensor (GGUF names, numpy order; {} without `with_values`)."""
    from tests.checkpoints import mistral_tokenizer_file

    rng = np.random.default_rng(seed)
    tokenizer = sentencepiece_metadata(mistral_tokenizer_file("v1"))
    if vocab is not None:
        for key in ("tokens", "scores", "token_type"):
            tokenizer[f"tokenizer.ggml.{key}"] = tokenizer[f"tokenizer.ggml.{key}"][:vocab]
    if chat_template is not None:
        tokenizer["tokenizer.chat_template"] = chat_template
    vocab = len(tokenizer["tokenizer.ggml.tokens"])
    head_dim = hidden // heads
    tensors: dict[str, tuple[str, np.ndarray]] = {}

    def add(name: str, role: str, shape: tuple[int, ...], std: float = 0.2) -> None:
        kind = types.get(role, "F32")
        if kind in ("F32", "F16"):
            dtype = np.float32 if kind == "F32" else np.float16
            tensors[name] = (kind, rng.normal(0, std, shape).astype(dtype))
        else:
            tensors[name] = (kind, random_blocks(kind, shape, std, rng))

    add("token_embd.weight", "embd", (vocab, hidden), 0.5)
    tensors["output_norm.weight"] = ("F32", 1 + rng.normal(0, 0.1, hidden).astype(np.float32))
    add("output.weight", "output", (vocab, hidden), 0.12)  # logits of std ~2, as real LMs
    for i in range(layers):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = ("F32", 1 + rng.normal(0, 0.1, hidden).astype(np.float32))
        tensors[p + "ffn_norm.weight"] = ("F32", 1 + rng.normal(0, 0.1, hidden).astype(np.float32))
        add(p + "attn_q.weight", "attn_q", (heads * head_dim, hidden))
        add(p + "attn_k.weight", "attn_k", (kv_heads * head_dim, hidden))
        add(p + "attn_v.weight", "attn_v", (kv_heads * head_dim, hidden))
        add(p + "attn_output.weight", "attn_output", (hidden, heads * head_dim))
        tensors[p + "ffn_gate_inp.weight"] = ("F32", rng.normal(0, 0.5, (experts, hidden)).astype(np.float32))
        for role, shape in (("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            kind_role = f"{role}.{i}" if f"{role}.{i}" in types else role
            if stacked:
                add(f"{p}{role}_exps.weight", kind_role, (experts, *shape))
            else:
                for e in range(experts):
                    add(f"{p}{role}.{e}.weight", kind_role, shape)
    arch = {
        "context_length": 4096,
        "embedding_length": hidden,
        "block_count": layers,
        "feed_forward_length": ffn,
        "rope.dimension_count": head_dim,
        "attention.head_count": heads,
        "attention.head_count_kv": kv_heads,
        "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 1e6,
        "expert_count": experts,
        "expert_used_count": 2,
        "vocab_size": vocab,
    }
    write_gguf(path, arch, tokenizer, tensors)
    if not with_values:
        return path, {}
    values = {name: dequantize(kind, data, _shape_of(kind, data, name, tensors)) for name, (kind, data) in tensors.items()}
    return path, values


def _shape_of(kind: str, data: np.ndarray, name: str, tensors) -> tuple[int, ...]:
    if kind in ("F32", "F16"):
        return data.shape
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    return (*data.shape[:-1], data.shape[-1] // type_size * block_size)


def transformers_mixtral(values: dict[str, np.ndarray], hidden: int, heads: int, kv_heads: int):
    """transformers' MixtralForCausalLM holding gguf-py's dequantized weights (Q/K rows
    un-permuted back to rotate-half order), in float32."""
    import torch
    import transformers

    layers = 1 + max(int(k.split(".")[1]) for k in values if k.startswith("blk."))
    stacked = "blk.0.ffn_gate_exps.weight" in values
    if stacked:
        experts, ffn = values["blk.0.ffn_gate_exps.weight"].shape[:2]
    else:
        experts = sum(1 for k in values if k.startswith("blk.0.ffn_gate.") and k.endswith(".weight"))
        ffn = values["blk.0.ffn_gate.0.weight"].shape[0]
    vocab = values["token_embd.weight"].shape[0]
    config = transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = transformers.MixtralForCausalLM(config).eval()
    state = {
        "model.embed_tokens.weight": values["token_embd.weight"],
        "model.norm.weight": values["output_norm.weight"],
        "lm_head.weight": values["output.weight"],
    }
    for i in range(layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = values[b + "attn_norm.weight"]
        state[p + "post_attention_layernorm.weight"] = values[b + "ffn_norm.weight"]
        state[p + "self_attn.q_proj.weight"] = unpermute_qk(values[b + "attn_q.weight"], heads)
        state[p + "self_attn.k_proj.weight"] = unpermute_qk(values[b + "attn_k.weight"], kv_heads)
        state[p + "self_attn.v_proj.weight"] = values[b + "attn_v.weight"]
        state[p + "self_attn.o_proj.weight"] = values[b + "attn_output.weight"]
        state[p + "mlp.gate.weight"] = values[b + "ffn_gate_inp.weight"]

        def stack(role: str, b: str = b) -> np.ndarray:
            if stacked:
                return values[f"{b}{role}_exps.weight"]
            return np.stack([values[f"{b}{role}.{e}.weight"] for e in range(experts)])

        state[p + "mlp.experts.gate_up_proj"] = np.concatenate([stack("ffn_gate"), stack("ffn_up")], axis=1)
        state[p + "mlp.experts.down_proj"] = stack("ffn_down")
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state.items()}, strict=False
    )
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model
