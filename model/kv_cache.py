"""The engine's KV caches: mlx-lm's plain or quantized ones (one definition for every family),
and their size as mlx-lm allocates them (memory_plan plans the budget with it)."""

from __future__ import annotations

from .errors import CheckpointError

KV_STEP = 256  # mlx-lm's KV caches (plain, quantized, rotating) grow by this many tokens at a time


def allocated(tokens: int) -> int:
    """Token slots a KV cache holding `tokens` tokens has allocated: KV_STEP at a time."""
    return -(-max(tokens, 0) // KV_STEP) * KV_STEP


def kv_bytes_at(per_token: int, window_per_token: int, window: int | None, tokens: int) -> int:
    """Bytes of the KV caches holding `tokens` tokens as mlx-lm allocates them: KV_STEP slots
    at a time, a sliding layer's rotating cache (`window_per_token` of the `per_token`) at
    most its `window`."""
    slots = allocated(tokens)
    held = min(slots, window) if window else slots
    return (per_token - window_per_token) * slots + window_per_token * held


def kv_values_per_layer(args) -> int:
    """Values one layer's cache keeps per token, as mlx-lm's definition caches them: keys and
    values per KV head; DeepSeek-V3's multi-head latent attention, its compressed latent and
    the shared RoPE key (kv_lora_rank + qk_rope_head_dim); DeepSeek-V2's (as mlx-lm's V2 caches
    them), keys of qk_nope + qk_rope and values of v_head_dim for every head."""
    config = args.extra.get("config", {})
    if args.model_type not in ("deepseek_v2", "deepseek_v3") or "kv_lora_rank" not in config:
        return 2 * args.num_key_value_heads * args.head_dim
    if args.model_type == "deepseek_v3":
        return config["kv_lora_rank"] + config["qk_rope_head_dim"]
    heads = config["num_attention_heads"]
    return heads * (config["qk_nope_head_dim"] + config["qk_rope_head_dim"] + config["v_head_dim"])


def sliding_layers(args) -> tuple[int, int | None]:
    """(layers whose cache holds at most a window of tokens, that window): gpt-oss's sliding
    attention layers (mlx-lm's RotatingKVCache of `sliding_window`); (0, None) elsewhere."""
    config = args.extra.get("config", {})
    if args.model_type != "gpt_oss" or not config.get("sliding_window"):
        return 0, None
    kinds = config.get("layer_types") or ["sliding_attention", "full_attention"] * (
        args.num_hidden_layers // 2
    )
    return sum(kind == "sliding_attention" for kind in kinds), config["sliding_window"]


def kv_bytes_per_token(args, compute_bytes: int, kv_bits: int | None = None,
                       layers: int | None = None) -> int:  # fmt: skip
    """Bytes one token takes in the caches of `layers` layers (default: all); quantized ones
    carry a float scale and bias per group (mlx-lm's QuantizedKVCache)."""
    layers = args.num_hidden_layers if layers is None else layers
    values = layers * kv_values_per_layer(args)
    if kv_bits:
        return int(values * (kv_bits / 8 + 2 * compute_bytes / (args.kv_group_size or 64)))
    return values * compute_bytes


def kv_fields(args, compute_bytes: int, kv_bits: int | None = None) -> dict:
    """A memory plan's KV cache figures (memory_plan.MemoryPlan's fields): bytes per token
    over all layers, and the sliding layers' window and share of them."""
    count, window = sliding_layers(args)
    return {
        "kv_bytes_per_token": kv_bytes_per_token(args, compute_bytes, kv_bits),
        "kv_window": window,
        "kv_window_bytes_per_token": kv_bytes_per_token(args, compute_bytes, kv_bits, count),
    }


def kv_caches(args, count: int, kv_bits: int | None = None) -> list:
    """`count` plain KV caches, or mlx-lm's QuantizedKVCache at `kv_bits` (8 or 4)."""
    from .mlx_lm_parts import KVCache, QuantizedKVCache

    if not kv_bits:
        return [KVCache() for _ in range(count)]
    if args.kv_group_size is None:
        raise CheckpointError(
            f"a quantized KV cache needs a head dimension divisible by 32, not {args.head_dim}"
        )
    return [QuantizedKVCache(group_size=args.kv_group_size, bits=kv_bits) for _ in range(count)]
