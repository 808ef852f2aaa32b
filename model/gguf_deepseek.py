"""llama.cpp's deepseek2 GGUF files (DeepSeek-V2, V2-Lite, Coder-V2, V3, R1), as
convert_hf_to_gguf.py's DeepseekV2Model writes them, read onto mlx-lm's deepseek_v2 / deepseek_v3.

What the converter does, and how it is undone here:
- `set_gguf_parameters` writes the config under llama.cpp's keys: `deepseek2_config` reads them
  back into the published config.json. Two layouts exist: files before llama.cpp's MLA rewrite
  (April 2025) keep the per-head sizes (`attention.head_count_kv` = the head count,
  `attention.key_length` = qk_nope + qk_rope, `attention.value_length` = v_head_dim); newer ones
  write MLA as MQA (`head_count_kv` = 1, `key_length` = kv_lora_rank + qk_rope) and keep the
  per-head sizes in `attention.key_length_mla` / `value_length_mla`.
- Its YaRN: `rope.scaling.yarn_log_multiplier` = 0.1 * mscale_all_dim (DeepseekV2Model's
  [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]); the published `mscale` is not written: llama.cpp's graph
  (build_deepseek2) runs mscale = mscale_all_dim, as every DeepSeek checkpoint publishes it.
- `modify_tensors` stacks the experts (kept stacked: mlx-lm's `switch_mlp`), renames V3's
  e_score_correction_bias to `exp_probs_b.bias`, and (newer files) splits `kv_b_proj` per head
  into `attn_k_b` (the qk_nope rows, transposed: [heads, kv_lora_rank, qk_nope]) and `attn_v_b`
  ([heads, v_head_dim, kv_lora_rank]); older files keep `attn_kv_b` whole. `mla_weights` gives
  each definition its own form: deepseek_v3's `embed_q` / `unembed_out` are exactly attn_k_b /
  attn_v_b; deepseek_v2's `kv_b_proj` is attn_k_b transposed back and attn_v_b joined per head.
"""

from __future__ import annotations

from typing import Any

from .errors import CheckpointError, UnsupportedModelError

ARCH = "deepseek2"
GATING = {1: "softmax", 2: "sigmoid"}  # gguf-py's ExpertGatingFuncType; absent: softmax (V2)
# The name model/names.py gives a GGUF attn_kv_b (never a Hugging Face or MLX one):
# `mla_weights` turns it into kv_b_proj (V2) or embed_q / unembed_out (V3)
KV_B = "self_attn.gguf_kv_b"
GROUP_SIZE = 32  # model/gguf.py's: every quantized GGUF tensor is read as affine groups of 32


def deepseek2_config(metadata: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """A deepseek2 GGUF's metadata as the config.json DeepSeek publishes (deepseek_v3 for
    sigmoid gating, deepseek_v2 for softmax); one-line CheckpointError for what is missing."""

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = metadata.get(f"{ARCH}.{key}")
        if value is None:
            if required:
                raise CheckpointError(f"GGUF metadata lacks {ARCH}.{key}")
            return default
        return value.item() if hasattr(value, "item") else value

    heads = int(get("attention.head_count", required=True))
    rope_dims = int(get("rope.dimension_count", required=True))
    kv_lora = int(get("attention.kv_lora_rank", required=True))
    if get("attention.key_length_mla") is not None:  # MLA written as MQA (newer converters)
        qk_head = int(get("attention.key_length_mla"))
        v_head = int(get("attention.value_length_mla", required=True))
    elif int(get("attention.head_count_kv", heads)) == 1 and heads > 1:
        raise CheckpointError(
            f"GGUF metadata lacks {ARCH}.attention.key_length_mla (an MQA-layout deepseek2 "
            "file without its per-head key size)"
        )
    else:  # the per-head layout of files before llama.cpp's MLA rewrite
        qk_head = int(get("attention.key_length", required=True))
        v_head = int(get("attention.value_length", required=True))
    gating = GATING.get(int(get("expert_gating_func", 1)))
    if gating is None:
        raise UnsupportedModelError(
            f"deepseek2 GGUF with expert_gating_func {get('expert_gating_func')}: mixchat reads "
            "softmax (DeepSeek-V2) and sigmoid (V3) gating"
        )
    groups, used_groups = int(get("expert_group_count", 1)), int(get("expert_group_used_count", 1))
    norm = bool(get("expert_weights_norm", False))
    if gating == "softmax" and norm:
        raise UnsupportedModelError(
            "deepseek2 GGUF with softmax gating and expert_weights_norm: mlx-lm's deepseek_v2 "
            "does not normalize the top-k weights"
        )
    q_lora = get("attention.q_lora_rank")
    if "blk.0.attn_q_a.weight" in tensor_names and q_lora is None:
        raise CheckpointError(f"GGUF metadata lacks {ARCH}.attention.q_lora_rank")
    config: dict[str, Any] = {
        "model_type": "deepseek_v3" if gating == "sigmoid" else "deepseek_v2",
        "scoring_func": gating,
        "topk_method": "noaux_tc" if gating == "sigmoid" else (
            "group_limited_greedy" if groups > 1 else "greedy"),  # fmt: skip
        "n_group": groups,
        "topk_group": used_groups,
        "norm_topk_prob": norm,
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
        "vocab_size": int(get("vocab_size", len(metadata.get("tokenizer.ggml.tokens", [])))),
        "hidden_size": int(get("embedding_length", required=True)),
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "moe_intermediate_size": int(get("expert_feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,  # as published: MLA decompresses to every head
        "n_routed_experts": int(get("expert_count", required=True)),
        "num_experts_per_tok": int(get("expert_used_count", required=True)),
        "n_shared_experts": int(get("expert_shared_count", 0)) or None,
        "first_k_dense_replace": int(get("leading_dense_block_count", 0)),
        "moe_layer_freq": 1,
        "q_lora_rank": int(q_lora) if "blk.0.attn_q_a.weight" in tensor_names else None,
        "kv_lora_rank": kv_lora,
        "qk_rope_head_dim": rope_dims,
        "qk_nope_head_dim": qk_head - rope_dims,
        "v_head_dim": v_head,
        "max_position_embeddings": int(get("context_length", 4096)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _yarn(get, gating),
        "attention_bias": "blk.0.attn_kv_a_mqa.bias" in tensor_names,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    return config


def _yarn(get, gating: str) -> dict[str, Any] | None:
    """The published rope_scaling from the converter's YaRN keys (None without them; V2's
    definition requires one: factor 1, which is plain RoPE)."""
    kind = get("rope.scaling.type")
    if kind not in (None, "none", "yarn"):
        raise UnsupportedModelError(f"deepseek2 GGUF with {kind} RoPE scaling (mixchat reads YaRN)")
    if float(get("rope.scaling.yarn_attn_factor", 1.0)) != 1.0:
        raise UnsupportedModelError(
            "deepseek2 GGUF with rope.scaling.yarn_attn_factor: DeepSeek's YaRN has none"
        )
    if kind != "yarn":
        if gating == "sigmoid":
            return None
        factor, mscale, original = 1.0, 0.0, int(get("context_length", 4096))
    else:
        factor = float(get("rope.scaling.factor", required=True))
        original = int(get("rope.scaling.original_context_length", required=True))
        # 0.1 * mscale_all_dim, stored as float32: rounded back to its float32 precision
        mscale = float(f"{float(get('rope.scaling.yarn_log_multiplier', 0.0)) / 0.1:.7g}")
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": float(get("rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": float(get("rope.scaling.yarn_beta_slow", 1.0)),
            "mscale": mscale, "mscale_all_dim": mscale}  # fmt: skip


def _dequantized(weights: dict, base: str):
    """`base`'s weight as float (GGUF tensors come as MLX affine groups of 32)."""
    import mlx.core as mx

    w = weights.pop(f"{base}.weight")
    if f"{base}.scales" not in weights:
        return w
    scales, biases = weights.pop(f"{base}.scales"), weights.pop(f"{base}.biases")
    bits = w.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
    return mx.dequantize(w, scales, biases, group_size=GROUP_SIZE, bits=bits)


def mla_weights(weights: dict, model_type: str) -> dict:
    """A deepseek2 GGUF's MLA tensors in the form mlx-lm's `model_type` definition takes (the
    names model/names.py gives them: attn_k_b -> embed_q, attn_v_b -> unembed_out, attn_kv_b ->
    KV_B); weights of any other source pass unchanged.

    deepseek_v3 (embed_q [heads, kv_lora, nope], unembed_out [heads, v, kv_lora]): attn_k_b and
    attn_v_b are these already; an old file's attn_kv_b goes to mlx-lm's sanitize as kv_b_proj,
    which splits it per head as the converter's modify_tensors does (a quantized one dequantized
    first: the transpose crosses its groups). deepseek_v2 (kv_b_proj [heads * (nope + v),
    kv_lora]): attn_kv_b is it; attn_k_b is transposed back and joined with attn_v_b per head
    (dequantized where quantized). Files that kept both forms are read from attn_kv_b."""
    import mlx.core as mx

    for base in sorted({k.rsplit(".", 1)[0] for k in weights if f".{KV_B}." in k}):
        prefix = base.removesuffix(KV_B)
        for name in [k for k in weights if k.startswith((f"{prefix}self_attn.embed_q.",
                                                          f"{prefix}self_attn.unembed_out."))]:
            del weights[name]  # fmt: skip
        if model_type == "deepseek_v2":  # the same tensor, under mlx-lm's name
            for part in ("weight", "scales", "biases"):
                if f"{base}.{part}" in weights:
                    weights[f"{prefix}self_attn.kv_b_proj.{part}"] = weights.pop(f"{base}.{part}")
        else:
            weights[f"{prefix}self_attn.kv_b_proj.weight"] = _dequantized(weights, base)
    if model_type != "deepseek_v2":
        return weights
    for name in [k for k in weights if k.endswith("self_attn.embed_q.weight")]:
        prefix = name.removesuffix("self_attn.embed_q.weight")
        k_b = _dequantized(weights, f"{prefix}self_attn.embed_q")  # [heads, kv_lora, nope]
        v_b = _dequantized(weights, f"{prefix}self_attn.unembed_out")  # [heads, v, kv_lora]
        joined = mx.concatenate([k_b.swapaxes(-1, -2), v_b], axis=1)  # [heads, nope + v, kv]
        weights[f"{prefix}self_attn.kv_b_proj.weight"] = joined.reshape(-1, joined.shape[-1])
    return weights


def mla_tensors(name: str, arrays: dict, model_type: str, held: dict) -> list[tuple[str, dict]]:
    """For quantize/gguf_dir.py: a deepseek2 GGUF's tensor `name` ({"weight", ...} numpy, as
    model/gguf.py's load_tensor gives it) as the tensors mlx-lm's definition loads, through
    `mla_weights`; a V2 file's attn_k_b is `held` until its attn_v_b comes. Other tensors pass."""
    import mlx.core as mx
    import numpy as np

    base = name.removesuffix(".weight")
    mla = base.endswith((KV_B, "self_attn.embed_q", "self_attn.unembed_out"))
    if not mla or (model_type != "deepseek_v2" and not base.endswith(KV_B)):
        return [(name, arrays)]
    held.update({f"{base}.{part}": mx.array(a) for part, a in arrays.items()})
    layer = base.rsplit("self_attn.", 1)[0]
    if model_type == "deepseek_v2" and not base.endswith(KV_B) and not all(
        f"{layer}self_attn.{m}.weight" in held for m in ("embed_q", "unembed_out")
    ):
        return []
    mine = {k: held.pop(k) for k in [k for k in held if k.startswith(layer)]}
    out: dict[str, dict] = {}
    for key, value in mla_weights(mine, model_type).items():
        module, part = key.rsplit(".", 1)
        out.setdefault(f"{module}.weight", {})[part] = np.array(value)
    return list(out.items())
