"""Swapping a model's experts for OffloadedExperts that share one runtime, and finding it."""

from __future__ import annotations

import mlx.core as mx

from ..errors import MixchatError
from ..experts import PROJECTIONS
from .cache import ExpertCache
from .module import OffloadedExperts
from .options import OffloadOptions
from .runtime import OffloadRuntime
from .store import ExpertStore


def moe_layers(model) -> list[int]:
    """Indices of the model's MoE layers (those with a `block_sparse_moe`)."""
    return [i for i, layer in enumerate(model.layers) if "block_sparse_moe" in layer]


def attach(model, checkpoint, capacity: int, dtype: mx.Dtype, options: OffloadOptions | None = None
           ) -> OffloadRuntime:  # fmt: skip
    """Replace every MoE layer's experts by OffloadedExperts sharing one runtime whose cache
    holds at most `capacity` bytes. The model's expert arrays must not have been evaluated."""
    options = options or OffloadOptions()
    layers = moe_layers(model)
    store = ExpertStore(checkpoint, layers, dtype, options.bypass_page_cache)
    top_k = model.args.num_experts_per_tok
    cache = ExpertCache(capacity, options.policy, layers)
    cache.working_set = sum(top_k * store.expert_bytes(layer) for layer in layers)
    for layer in layers:
        need = top_k * store.expert_bytes(layer)
        if cache.limit(layer) < need:
            store.close()
            raise MixchatError(
                f"expert cache of {capacity} bytes cannot hold {top_k} experts of a layer "
                f"({need} bytes)"
            )
    runtime = OffloadRuntime(store, cache, top_k, prefetch=options.prefetch,
                             io_threads=options.io_threads)  # fmt: skip
    runtime.num_experts = model.args.num_local_experts
    runtime.held = range(runtime.num_experts)
    for i, layer in enumerate(layers):
        moe = model.layers[layer].block_sparse_moe
        old = moe.switch_mlp
        specs = {}
        for proj in PROJECTIONS:
            module = old[proj]
            specs[proj] = (
                (module.group_size, module.bits, module.mode) if hasattr(module, "bits") else None
            )
        runtime.specs[layer] = specs
        runtime.gates[layer] = moe.gate
        if i + 1 < len(layers):
            runtime.next_layer[layer] = layers[i + 1]
        moe.switch_mlp = OffloadedExperts(runtime, layer)
    return runtime


def runtime_of(model) -> OffloadRuntime | None:
    """The OffloadRuntime of a model whose experts are offloaded, else None."""
    for layer in getattr(model, "layers", []):
        if "block_sparse_moe" in layer and isinstance(
            layer.block_sparse_moe.switch_mlp, OffloadedExperts
        ):
            return layer.block_sparse_moe.switch_mlp.runtime
    return None
