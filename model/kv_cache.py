"""The engine's KV caches: mlx-lm's plain or quantized ones (one definition for every family)."""

from __future__ import annotations

from .errors import CheckpointError
from .mlx_lm_parts import KVCache, QuantizedKVCache


def kv_caches(args, count: int, kv_bits: int | None = None) -> list:
    """`count` plain KV caches, or mlx-lm's QuantizedKVCache at `kv_bits` (8 or 4)."""
    if not kv_bits:
        return [KVCache() for _ in range(count)]
    if args.kv_group_size is None:
        raise CheckpointError(
            f"a quantized KV cache needs a head dimension divisible by 32, not {args.head_dim}"
        )
    return [QuantizedKVCache(group_size=args.kv_group_size, bits=kv_bits) for _ in range(count)]
