"""Experts read on demand from the checkpoint, into a cache that stays within a memory budget.

After `weights.build_model` has built a model with its expert tensors left unread, `attach`
(wiring.py) swaps each MoE layer's experts for an `OffloadedExperts` (module.py): Mixtral's
`block_sparse_moe.switch_mlp` or, for the families mlx-lm defines (model/families.py), their
SwitchGLU wherever the family keeps it (names.EXPERT_MODULES), with the family's top-k; routers
and shared experts stay resident. Per layer, per forward pass:

1. the router's choices are evaluated (one sync per layer, inherent to choosing what to read);
   a long prompt queues the next layer's experts to be read while this layer computes; during
   decode, guessing the next layer's experts is off by default (`OffloadOptions.prefetch`);
2. experts not in the cache are read with positioned reads of their byte ranges, several in
   flight, past the page cache (store.py), by the runtime's threads (runtime.py);
3. each chosen expert is applied to its tokens by `experts.swiglu` on the cached arrays (the
   same kernels and shapes as `mixtral.Experts`, so greedy tokens are identical).

Under a budget the engine runs a prompt layer by layer over whole windows of tokens
(`Model.prefill_layerwise`, `FamilyModel.prefill_layerwise`), so each expert is read at most
once per layer per window.

The cache (`ExpertCache`, cache.py) counts bytes exactly (the arrays' `nbytes`), reserves them
before a read starts, and never holds more than its capacity, which shrinks as the KV cache
grows (`OffloadRuntime.set_kv_bytes`). Eviction (`OffloadOptions.policy`, policies.py):
"next-use" by default, which evicts what the cyclic layer order reaches last; replayed on
Mixtral-like routing (model/routing_trace.py, with the same policy code) it beats LRU at every
cached share, and LRU gets no hits at all once the cache holds less than one token's experts
(it evicts exactly the expert needed next). Experts in use by the layer being computed are
pinned until the next sync, so an eviction always frees memory.

Names are re-exported lazily: `OffloadOptions` and the policies import without MLX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cache import ExpertCache
    from .module import (
        PREFETCH_MAX_TOKENS,
        PREFILL_PREFETCH_TOKENS,
        ROW_SLICE,
        OffloadedExperts,
    )
    from .options import OffloadOptions
    from .policies import AUTO_POLICY, DEFAULT_POLICY, POLICIES, Key
    from .runtime import OffloadCounters, OffloadRuntime, Prefetch
    from .store import GGUF_PREFIX, CachedExpert, ExpertStore
    from .wiring import attach, moe_layers, runtime_of

_EXPORTS = {
    "ExpertCache": "cache",
    "OffloadedExperts": "module", "PREFETCH_MAX_TOKENS": "module",
    "PREFILL_PREFETCH_TOKENS": "module", "ROW_SLICE": "module",
    "OffloadOptions": "options",
    "AUTO_POLICY": "policies", "DEFAULT_POLICY": "policies", "POLICIES": "policies",
    "Key": "policies",
    "OffloadCounters": "runtime", "OffloadRuntime": "runtime", "Prefetch": "runtime",
    "GGUF_PREFIX": "store", "CachedExpert": "store", "ExpertStore": "store",
    "attach": "wiring", "moe_layers": "wiring", "runtime_of": "wiring",
}  # fmt: skip


def __getattr__(name: str):
    """Import a submodule (MLX with most) only when one of its names is asked for."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AUTO_POLICY", "DEFAULT_POLICY", "GGUF_PREFIX", "POLICIES", "PREFETCH_MAX_TOKENS",
    "PREFILL_PREFETCH_TOKENS", "ROW_SLICE", "CachedExpert", "ExpertCache", "ExpertStore", "Key",
    "OffloadCounters", "OffloadOptions", "OffloadRuntime", "OffloadedExperts", "Prefetch",
    "attach", "moe_layers", "runtime_of",
]  # fmt: skip
