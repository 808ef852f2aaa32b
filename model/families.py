"""MoE families run on mlx-lm's own definitions (Qwen3-MoE, Qwen2-MoE, OLMoE, gpt-oss,
DeepSeek-V2/V3, GraniteMoE, PhiMoE: config.py's FAMILY_TYPES), behind the contract the engine
(model/generate.py) has with model.mixtral.Model.

mlx-lm's `Model(ModelArgs.from_dict(config))` is built once and never copied: its `sanitize`
stacks a published checkpoint's per-expert tensors (`mlp.experts.N.gate_proj.weight`) into its
`switch_mlp`, an mlx-community directory is already stacked. `FamilyModel` holds the same
modules under the same names (`model.…`, `lm_head`), so weights.build_model checks, quantizes
and loads them as it does Mixtral's, and adds what the engine uses: `hidden_states`, `logits`,
`make_cache`, `routing` (each MoE layer's top-k, recorded at its router), `memory`, `stage`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import CheckpointError, UnsupportedModelError
from .gguf_deepseek import mla_weights
from .kv_cache import kv_caches
from .mlx_lm_parts import create_attention_mask, model_module
from .router import top_experts

# Where each family's decoder layer keeps its MoE block, and the block its router and its stacked
# experts (default: Qwen's and DeepSeek's names)
ROUTERS = {
    "gpt_oss": ("mlp", "router", "experts"),
    "granitemoe": ("block_sparse_moe", "router", "switch_mlp"),
    "phimoe": ("block_sparse_moe", "gate", "switch_mlp"),
}
DEFAULT_ROUTERS = ("mlp", "gate", "switch_mlp")


def _gpt_oss_config(config: dict) -> dict:
    """transformers v5 writes `rope_parameters`; mlx-lm's ModelArgs reads the published
    `rope_theta` and `rope_scaling` (YaRN)."""
    rope = config.get("rope_parameters")
    if not rope or "rope_theta" in config:
        return config
    config = dict(config, rope_theta=rope.get("rope_theta", 150000.0))
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    return config


def _gpt_oss_built(inner: nn.Module, config: dict) -> None:
    """gpt-oss publishes YaRN with `truncate: false` (transformers then keeps the correction
    range unrounded); mlx-lm's YarnRoPE always rounds it: its frequencies are recomputed."""
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") != "yarn" or scaling.get("truncate", True):
        return
    import math

    dims, base = config.get("head_dim", 64), float(config.get("rope_theta", 150000.0))
    factor, original = scaling["factor"], scaling.get("original_max_position_embeddings", 4096)

    def correction(rotations: float) -> float:
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(correction(scaling.get("beta_fast") or 32), 0)
    high = min(correction(scaling.get("beta_slow") or 1), dims - 1)
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low or 0.001), 0, 1)
    extra = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)  # 1 / inv_freq
    inter = factor * extra
    keep = 1.0 - ramp  # the share of extrapolation, as transformers names it
    freqs = 1.0 / (keep / extra + (1.0 - keep) / inter)
    for layer in inner.layers:
        rope = layer.self_attn.rope
        if hasattr(rope, "_freqs"):
            rope._freqs = freqs


def _gpt_oss_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """transformers keeps float experts as [E, in, out] (`x @ gate_up_proj`) under the bare
    names; mlx-lm's sanitize takes them as the MXFP4 blocks are laid out, [E, out, in], as
    `….weight`."""
    experts = ("experts.gate_up_proj", "experts.down_proj")
    return {
        (k + ".weight" if k.endswith(experts) else k): (
            v.swapaxes(-1, -2) if k.endswith(experts) else v
        )
        for k, v in weights.items()
    }


# Per family: the config as mlx-lm reads it, fixes after building, weights before sanitize
PREPARE_CONFIG = {"gpt_oss": _gpt_oss_config}
BEFORE_SANITIZE = {"gpt_oss": _gpt_oss_weights}


class _RoutingLog:
    """Where the routers record their choices: `steps` is the engine's list (None: off)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.steps: list | None = None


_RECORDING: dict[type, type] = {}


# Multi-head latent attention: the cache holds a compressed latent, not per-head keys and values
_LATENT_ATTENTION = ("deepseek_v2", "deepseek_v3")
# a deepseek2 GGUF's MLA tensors in the form each definition takes (model/gguf_deepseek.py)
BEFORE_SANITIZE.update({t: partial(mla_weights, model_type=t) for t in _LATENT_ATTENTION})
# families whose prompt is not split layer by layer under a budget (see prefill_layerwise)
_WHOLE_WINDOW = ("phimoe",)


def _recording_class(cls: type) -> type:
    """`cls` (a router) that also records its top-k: a Linear's (nn.Linear, nn.QuantizedLinear)
    logits' top-k, or the ids of a router that chooses itself and returns (ids, scores)
    (DeepSeek's group-limited MoEGate, GraniteMoE's top-k gating)."""
    if cls not in _RECORDING:

        def __call__(self, x: mx.array):
            out = cls.__call__(self, x)
            log = self._routing_log
            if log.steps is not None:
                chosen = out[0] if isinstance(out, tuple) else top_experts(out, log.k)
                log.steps.append(chosen)
            return out

        _RECORDING[cls] = type(f"Routed{cls.__name__}", (cls,), {"__call__": __call__})
    return _RECORDING[cls]


def _published_group_masking(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """DeepSeek-V3's group-limited routing as DeepSeek's own inference code (inference/model.py)
    and transformers (also vLLM's and SGLang's kernels) run it: experts of the dropped groups
    are masked to -inf before the top-k (the remote-code modeling_deepseek.py on the Hub masks
    to 0.0, as mlx-lm does). mlx-lm's
    `group_expert_select` sets them to 0.0 instead, so where the kept experts' sigmoid score
    plus e_score_correction_bias is negative it picks experts of dropped groups. Shifting each
    layer's bias by one constant, so that every score plus bias is positive, keeps the group
    ranking (each group's top-2 sum moves by the same amount), the top-k within the kept groups
    and the weights (taken from the unbiased scores), and makes mlx-lm's 0.0 rank last."""
    for name, bias in weights.items():
        if name.endswith("e_score_correction_bias"):
            low = float(mx.min(bias).item())
            if low < 0:
                weights[name] = bias.astype(mx.float32) - low
    return weights


_LENGTH_ROPE: dict[type, type] = {}


def _length_switched_rope(rope: nn.Module, scaling: dict) -> None:
    """PhiMoE's LongRoPE as published (Phi-3.5-MoE's code, transformers): the short factors and
    `short_mscale` while the sequence fits in original_max_position_embeddings, the long ones
    past it. mlx-lm's SuScaledRoPE always applies the long factors, which moves a short prompt's
    logits. `rope` (a SuScaledRoPE) keeps its long set and gains the short one."""
    cls = type(rope)
    if cls not in _LENGTH_ROPE:

        def __call__(self, x: mx.array, offset=0) -> mx.array:
            end = (offset if isinstance(offset, int) else int(mx.max(offset).item())) + x.shape[-2]
            long = end > self.original_max_position_embeddings
            return mx.fast.rope(
                x.at[..., : self.dim].multiply(self._scale if long else self._short_scale),
                self.dim,
                traditional=False,
                base=None,
                scale=1.0,
                offset=offset,
                freqs=self._freqs if long else self._short_freqs,
            )

        _LENGTH_ROPE[cls] = type(f"LengthSwitched{cls.__name__}", (cls,), {"__call__": __call__})
    long_factor = mx.array(scaling["long_factor"], dtype=mx.float32)
    short_factor = mx.array(scaling["short_factor"], dtype=mx.float32)
    object.__setattr__(rope, "_short_freqs", rope._freqs / long_factor * short_factor)
    object.__setattr__(rope, "_short_scale", scaling.get("short_mscale") or rope._scale)
    rope.__class__ = _LENGTH_ROPE[cls]


def _published_rope(inner: nn.Module, config: dict) -> None:
    scaling = config.get("rope_scaling") or {}
    if scaling.get("short_factor") is None or scaling.get("long_factor") is None:
        return
    for layer in inner.layers:
        rope = layer.self_attn.rope
        if hasattr(rope, "_freqs") and hasattr(rope, "original_max_position_embeddings"):
            _length_switched_rope(rope, scaling)


# Fix-ups of the built model, per family (after mlx-lm has built it from the config)
AFTER_BUILD = {"gpt_oss": _gpt_oss_built, "phimoe": _published_rope}


def mlx_lm_model(args) -> nn.Module:
    """mlx-lm's model of `args.model_type` (a config.ModelArgs of a FAMILY_TYPES checkpoint)."""
    config = args.extra.get("config")
    if config is None:
        raise UnsupportedModelError(f"{args.model_type} models load from a config.json only")
    try:
        module = model_module(args.model_type)
    except ModuleNotFoundError:
        raise UnsupportedModelError(
            f"this mlx-lm has no definition of {args.model_type}: upgrade mlx-lm"
        ) from None
    config = PREPARE_CONFIG.get(args.model_type, dict)(config)
    try:
        model = module.Model(module.ModelArgs.from_dict(config))
    except (TypeError, ValueError, KeyError, AssertionError, AttributeError) as e:
        raise CheckpointError(
            f"config.json does not describe a {args.model_type} model: {e}"
        ) from None
    if args.model_type in AFTER_BUILD:
        AFTER_BUILD[args.model_type](model, config)
    return model


class FamilyModel(nn.Module):
    def __init__(self, args):
        super().__init__()
        inner = mlx_lm_model(args)
        object.__setattr__(self, "_inner", inner)  # for sanitize and layers, not a child
        object.__setattr__(self, "_log", _RoutingLog(args.num_experts_per_tok))
        object.__setattr__(self, "_watching", False)
        self.args = args
        self.model = inner.model  # the same modules under the same names: weights load into both
        if "lm_head" in inner:
            self.lm_head = inner.lm_head
        self.memory = None  # how it was loaded: a memory_plan.MemoryDecision, or None
        self.stage = None  # never split over ranks (weights.plan_memory refuses)

    def __setattr__(self, key: str, value: Any) -> None:
        if key in ("memory", "stage", "routing"):  # plain attributes, never parameters
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    @property
    def routing(self) -> list | None:
        """Set to a list to record each MoE layer's top-k expert ids ([B, T, k], layer order)."""
        return self._log.steps

    @routing.setter
    def routing(self, value: list | None) -> None:
        self._log.steps = value

    @property
    def layers(self) -> list:
        return self._inner.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """mlx-lm's: a published checkpoint's per-expert tensors stacked into `switch_mlp`."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.model_type in BEFORE_SANITIZE:
            weights = BEFORE_SANITIZE[self.args.model_type](weights)
        try:
            weights = self._inner.sanitize(weights)
        except KeyError as e:
            raise CheckpointError(f"checkpoint lacks tensor {e.args[0]}") from None
        if self.args.model_type == "deepseek_v3":
            weights = _published_group_masking(weights)
        return weights

    @property
    def cast_predicate(self):
        """Which tensors take the compute dtype (mlx-lm's: DeepSeek-V3's
        e_score_correction_bias stays float32, as published); None: all of them."""
        return getattr(self._inner, "cast_predicate", None)

    def _watch_routers(self) -> None:
        """Each MoE layer's router records its top-k while `routing` is a list."""
        block, router, experts = ROUTERS.get(self.args.model_type, DEFAULT_ROUTERS)
        for layer in self.layers:
            mlp = layer.get(block) if isinstance(layer, dict) else None
            if mlp is None or router not in mlp or experts not in mlp:
                continue  # a dense layer (Qwen's mlp_only_layers, DeepSeek's first_k_dense)
            gate = mlp[router]
            object.__setattr__(gate, "_routing_log", self._log)
            if type(gate) not in _RECORDING.values():
                gate.__class__ = _recording_class(type(gate))
        object.__setattr__(self, "_watching", True)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """inputs: int [B, T] -> logits [B, T, vocab] (causal; continues `cache` if given)."""
        return self.logits(self.hidden_states(inputs, cache))

    def hidden_states(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """inputs: int [B, T] -> final-normed hidden states [B, T, hidden]."""
        if not self._watching:
            self._watch_routers()
        steps = self._log.steps
        first = len(steps) if steps is not None else 0
        h = self.model(inputs, cache)
        if steps is not None:  # OLMoE routes flattened tokens: back to [B, T, k]
            for i in range(first, len(steps)):
                steps[i] = steps[i].reshape(*inputs.shape, -1)
        return h

    def prefill_layerwise(self, inputs: mx.array, cache: list, chunk: int) -> mx.array:
        """As mixtral.Model.prefill_layerwise, under a budget: layer by layer over all of
        `inputs` [1, T], attention in chunks of `chunk`, then the layer's MoE block over all T
        tokens at once (each streamed expert read at most once per layer per window).

        Split so: the pre-norm layers (self_attn, input/post_attention norms, the MoE block)
        of qwen3_moe, qwen2_moe, olmoe, gpt_oss (its sliding layers masked to their window),
        deepseek_v2/v3 (MLA with an array mask; the dense first layers' MLP over the window
        too) and granitemoe (both residuals times its residual_multiplier). phimoe runs
        whole over the window through mlx-lm's own call (which also computes each layer over
        all T tokens before the next, its attention not chunked): its LongRoPE chooses short or
        long factors by where the pass ends, which chunking would change. Returns the
        final-normed hidden state of the last token [1, 1, hidden]."""
        block = ROUTERS.get(self.args.model_type, DEFAULT_ROUTERS)[0]
        parts_ = ("self_attn", block, "input_layernorm", "post_attention_layernorm")
        if self.args.model_type in _WHOLE_WINDOW or not all(
            all(p in layer for p in parts_) for layer in self.layers
        ):
            return self.hidden_states(inputs, cache)[:, -1:]
        if not self._watching:
            self._watch_routers()
        steps = self._log.steps
        first = len(steps) if steps is not None else 0
        inner = self.model
        h = inner.embed_tokens(inputs)  # [1, T, hidden]
        if hasattr(inner, "embedding_multiplier"):  # GraniteMoE
            h = h * inner.embedding_multiplier
        T = h.shape[1]
        kinds = getattr(inner, "layer_types", None) or [None] * len(self.layers)  # gpt-oss
        array_mask = self.args.model_type in _LATENT_ATTENTION  # mlx-lm's MLA takes arrays
        for layer, layer_cache, kind in zip(self.layers, cache, kinds):
            window = inner.window_size if kind == "sliding_attention" else None
            scale = getattr(layer, "residual_multiplier", 1.0)  # GraniteMoE's
            done = []
            for a in range(0, T, chunk):
                x = h[:, a : a + chunk]
                mask = create_attention_mask(x, layer_cache, window_size=window,
                                             return_array=array_mask)  # fmt: skip
                r = layer.self_attn(layer.input_layernorm(x), mask, layer_cache)
                part = x + (r * scale if scale != 1.0 else r)
                mx.eval(part, layer_cache.state)
                done.append(part)
            h = mx.concatenate(done, axis=1) if len(done) > 1 else done[0]
            r = layer[block](layer.post_attention_layernorm(h))
            h = h + (r * scale if scale != 1.0 else r)
            mx.eval(h)
        if steps is not None:  # OLMoE routes flattened tokens: back to [B, T, k]
            for i in range(first, len(steps)):
                steps[i] = steps[i].reshape(*inputs.shape, -1)
        return self.model.norm(h[:, -1:])

    def logits(self, h: mx.array) -> mx.array:
        """Hidden states [..., hidden] -> logits [..., vocab] (GraniteMoE's divided by its
        `logits_scaling`, as mlx-lm's Model does)."""
        out = self.lm_head(h) if "lm_head" in self else self.model.embed_tokens.as_linear(h)
        scaling = getattr(self._inner, "logits_scaling", 1.0)
        return out / scaling if scaling != 1.0 else out

    def make_cache(self, kv_bits: int | None = None) -> list:
        """mlx-lm's caches for the model (its own make_cache where it has one); keys and values
        quantized to `kv_bits` (mlx-lm's QuantizedKVCache) when asked."""
        if kv_bits and self.args.model_type in _LATENT_ATTENTION:
            raise CheckpointError(
                f"a quantized KV cache is not available for {self.args.model_type} models "
                "(their attention caches a compressed latent)"
            )
        if hasattr(self._inner, "make_cache"):
            if kv_bits:
                raise CheckpointError(
                    f"a quantized KV cache is not available for {self.args.model_type} models"
                )
            return self._inner.make_cache()
        return kv_caches(self.args, len(self.layers), kv_bits)


def parameter_shapes(args) -> dict[str, tuple[int, ...]]:
    """Every weight of mlx-lm's definition for `args` with its unquantized shape (experts
    stacked [E, out, in] under `switch_mlp`); nothing is evaluated."""
    model = FamilyModel(args)
    return {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
