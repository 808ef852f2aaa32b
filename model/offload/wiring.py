"""Swapping a model's experts for OffloadedExperts that share one runtime, and finding it.

A layer's experts are found by type wherever its family keeps them (names.EXPERT_MODULES:
Mixtral's `block_sparse_moe.switch_mlp`, Qwen-MoE/OLMoE/DeepSeek's `mlp.switch_mlp`, gpt-oss's
`mlp.experts`): a `mixtral.Experts` or an mlx-lm `SwitchGLU`. Routers and shared experts are
other modules and stay resident."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..errors import MixchatError
from ..experts import PROJECTIONS
from ..families import DEFAULT_ROUTERS, ROUTERS
from ..mixtral import Experts
from ..mlx_lm_parts import model_module
from ..names import EXPERT_MODULES
from .cache import ExpertCache
from .module import OffloadedExperts
from .options import OffloadOptions
from .runtime import OffloadRuntime
from .store import ExpertStore


def _expert_types() -> tuple[type, ...]:
    return (Experts, OffloadedExperts, model_module("switch_layers").SwitchGLU)


def _experts_of(layer: nn.Module) -> tuple[nn.Module, str, str] | None:
    """(the module holding the layer's experts, their attribute, their path) or None (dense)."""
    types = _expert_types()
    for path in EXPERT_MODULES:
        *parents, attr = path.split(".")
        owner = layer
        for name in parents:
            owner = owner.get(name) if isinstance(owner, dict) else None
        if isinstance(owner, dict) and isinstance(owner.get(attr), types):
            return owner, attr, path
    return None


def moe_layers(model) -> list[int]:
    """Indices of the model's MoE layers (those with stacked experts, in any family's place)."""
    return [i for i, layer in enumerate(model.layers) if _experts_of(layer) is not None]


def attach(model, checkpoint, capacity: int, dtype: mx.Dtype, options: OffloadOptions | None = None
           ) -> OffloadRuntime:  # fmt: skip
    """Replace every MoE layer's experts by OffloadedExperts sharing one runtime whose cache
    holds at most `capacity` bytes. The model's expert arrays must not have been evaluated."""
    options = options or OffloadOptions()
    found = {i: _experts_of(layer) for i, layer in enumerate(model.layers)}
    found = {i: f for i, f in found.items() if f is not None}
    layers = list(found)
    store = ExpertStore(checkpoint, {i: path for i, (_, _, path) in found.items()}, dtype,
                        options.bypass_page_cache)  # fmt: skip
    top_k = model.args.num_experts_per_tok  # the family's config: num_experts_per_tok
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
    router = ROUTERS.get(getattr(model.args, "model_type", ""), DEFAULT_ROUTERS)[1]
    for i, layer in enumerate(layers):
        owner, attr, _ = found[layer]
        old = owner[attr]
        specs = {}
        for proj in PROJECTIONS:
            module = old[proj]
            specs[proj] = (
                (module.group_size, module.bits, module.mode) if hasattr(module, "bits") else None
            )
        runtime.specs[layer] = specs
        runtime.gates[layer] = owner[router]  # a Linear (logits) or a (inds, scores) router
        if i + 1 < len(layers):
            runtime.next_layer[layer] = layers[i + 1]
        activation = None if isinstance(old, Experts) else old.activation
        setattr(owner, attr, OffloadedExperts(runtime, layer, activation))
    return runtime


def runtime_of(model) -> OffloadRuntime | None:
    """The OffloadRuntime of a model whose experts are offloaded, else None."""
    for layer in getattr(model, "layers", []):
        found = _experts_of(layer)
        if found is not None and isinstance(found[0][found[1]], OffloadedExperts):
            return found[0][found[1]].runtime
    return None
