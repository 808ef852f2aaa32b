"""The streamed evaluation (quantize/evaluate.py) of the MoE families (model/families.py): each
layer is mlx-lm's own decoder layer, its experts stacked, and the model's ends are the pieces
mlx-lm's Model.__call__ applies around the layers, as the engine applies them (FamilyModel):
the embedding times the inner model's `embedding_multiplier` (GraniteMoE), the inner model's own
final norm (PhiMoE's LayerNorm with its bias), the LM head's bias (PhiMoE: quantize/evaluate's
_Head) and the logits divided by the Model's `logits_scaling` (GraniteMoE). Mixtral-format models
(model.mixtral) have an RMSNorm and no multipliers."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .lazy_weights import Weights
from .module_weights import load_module


def scales(w: Weights) -> tuple[float, float]:
    """(the embedding's multiplier, the logits' divisor) of `w`'s model (1.0: none)."""
    if not w.args.is_family:
        return 1.0, 1.0
    from model.families import mlx_lm_model

    model = mlx_lm_model(w.args)
    return (
        float(getattr(model.model, "embedding_multiplier", 1.0)),
        float(getattr(model, "logits_scaling", 1.0)),
    )


def final_norm(w: Weights) -> nn.Module:
    """The model's final norm, loaded: mlx-lm's own module for a family, else an RMSNorm."""
    args = w.args
    if args.is_family:
        from model.families import mlx_lm_model

        norm = mlx_lm_model(args).model.norm
    else:
        norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
    return load_module(norm, "model.norm", w.take("model.norm"), args, w.dtype)


def run_family_layer(
    w: Weights, i: int, h: mx.array, step: Callable[[], None] | None = None
) -> tuple[mx.array, np.ndarray | None]:
    """A family's layer i is mlx-lm's own decoder layer (model.families), its experts applied
    stacked (not one at a time), masked as mlx-lm's model masks it (gpt-oss's sliding layers to
    their window), its router's top-k recorded as the engine records them."""
    from model.families import DEFAULT_ROUTERS, ROUTERS, mlx_lm_model
    from model.mlx_lm_parts import create_attention_mask
    from model.names import family_source_name
    from model.router import top_experts

    args = w.args
    prefix = f"model.layers.{i}"
    inner = mlx_lm_model(args).model
    layer = inner.layers[i]
    weights = family_weights(w, prefix, layer, family_source_name)
    if args.model_type == "deepseek_v3":  # routing as the engine runs it (transformers')
        from model.families import _published_group_masking

        weights = _published_group_masking(weights)
    load_module(layer, prefix, weights, args, w.dtype)
    block, router, experts = ROUTERS.get(args.model_type, DEFAULT_ROUTERS)
    mlp = layer.get(block) if isinstance(layer, dict) else getattr(layer, block, None)
    choices: list[mx.array] = []
    if mlp is not None and router in mlp and experts in mlp:
        gate = mlp[router]

        class _Recorded(type(gate)):  # the router, recording its top-k
            def __call__(self, x: mx.array) -> mx.array:
                logits = super().__call__(x)  # or (chosen experts, weights): DeepSeek, Granite
                top = logits[0] if isinstance(logits, tuple) else None
                choices.append(
                    top_experts(logits, args.num_experts_per_tok) if top is None else top
                )
                return logits

        gate.__class__ = _Recorded
    kinds = getattr(inner, "layer_types", None)  # gpt-oss: sliding and full attention
    window = inner.window_size if kinds and kinds[i] == "sliding_attention" else None
    latent = args.model_type in ("deepseek_v2", "deepseek_v3")  # mlx-lm's MLA takes an array
    mask = create_attention_mask(h, None, window_size=window, return_array=latent)
    out = layer(h, mask, None)
    mx.eval(out, *choices)
    for _ in range(args.num_local_experts):
        if step:
            step()
    if not choices:
        return out, None
    return out, np.array(choices[0]).reshape(-1, args.num_experts_per_tok)


def family_weights(w: Weights, prefix: str, layer: nn.Module, source_name) -> dict:
    """Layer `prefix`'s tensors under mlx-lm's names, its experts stacked [E, out, in]: from a
    quantized directory as stored; from a published checkpoint, expert by expert; and what is
    still missing (gpt-oss's fused `gate_up_proj`, float or MXFP4) through the model's own
    sanitize, as the engine loads it (model.families.FamilyModel.sanitize)."""
    raw = w.take(prefix)
    weights = {n: a for n, a in raw.items() if ".mlp.experts." not in n}
    names = getattr(w, "names", set())  # a checkpoint's stored names
    targets = getattr(w, "targets", None)  # a float source, as `mixchat quantize` reads it
    missing = False
    for rel, _ in tree_flatten(layer.parameters()):
        name = f"{prefix}.{rel}"
        if name in weights:
            continue
        if targets is not None and name.removesuffix(".weight") in targets:
            weights[name] = targets[name.removesuffix(".weight")].load()
            continue
        base = name.removesuffix(".weight")
        stored = [name] + ([f"{base}.scales", f"{base}.biases"] if base != name else [])
        if name in names:  # stacked as mlx-lm stores it (block_sparse_moe.switch_mlp, experts)
            weights.update({n: w._read(n) for n in stored if n in names})
            continue
        template, stacked = source_name(w.args.model_type, name)
        one = template.removesuffix(".weight")
        if not stacked or f"{one}.weight".replace("{e}", "0") not in names:
            missing = True
            continue
        for part in ("weight", "scales", "biases"):
            if f"{one}.{part}".replace("{e}", "0") in names:
                experts = range(w.args.num_local_experts)
                weights[f"{base}.{part}"] = mx.stack(
                    [w._read(f"{one}.{part}".replace("{e}", str(e))) for e in experts]
                )
    if missing:  # the published layout mlx-lm's sanitize reads
        from model.families import FamilyModel

        rest = {n: a for n, a in raw.items() if n not in weights}
        weights.update(FamilyModel(w.args).sanitize(rest))
    return weights
