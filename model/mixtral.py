"""The Mixtral architecture in MLX (and the dense Mistral/Llama variant).

Token embedding -> N x [RMSNorm -> GQA attention with RoPE (optional sliding window) -> residual
-> RMSNorm -> sparse MoE (or dense SwiGLU MLP) -> residual] -> RMSNorm -> LM head.

Module names follow mlx-lm's `mixtral`/`llama` models, so directories written by
`mlx_lm.convert` load as they are; `Model.sanitize` maps Hugging Face names onto them.
Each layer's experts are stacked ([E, out, in]) so the experts a token picks are applied with
one `gather_qmm`/`gather_mm` call per projection.
"""

from __future__ import annotations

import threading
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import blas
from .config import ModelArgs
from .errors import CheckpointError
from .experts import (
    PROJECTIONS,
    SORTED_MIN_ROWS,
    Projection,
    RowGroups,
    by_blas,
    lora_swiglu_by_expert,
    swiglu,
)
from .kv_cache import kv_caches
from .mlx_lm_parts import (
    RotatingKVCache,
    SwitchLinear,
    create_attention_mask,
    initialize_rope,
    scaled_dot_product_attention,
)
from .names import EXPERT_PROJECTIONS, PARTS, expert_tensor
from .router import route

# Matrix products are split across this many streams of the default device. On MLX's CPU
# backend each stream runs on its own thread, so two streams use two cores (one token: the two
# experts it picks and halves of each weight; a prompt: halves of its tokens). A GPU needs one.
# Streams belong to the thread that made them, so they are made lazily in each thread.
_stream_count = 1
_thread_streams = threading.local()
MIN_SPLIT_ELEMENTS = 1 << 16  # weights of fewer (logical) elements are not worth a split


def use_parallel_streams(count: int) -> None:
    """Split matrix products across `count` streams (1 = everything on the default stream)."""
    global _stream_count
    _stream_count = max(1, count)


def compute_streams() -> list[mx.Stream]:
    streams = getattr(_thread_streams, "streams", None)
    if streams is None or len(streams) != _stream_count:
        device = mx.default_device()
        streams = [mx.default_stream(device)]
        streams += [mx.new_stream(device) for _ in range(_stream_count - 1)]
        _thread_streams.streams = streams
    return streams


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    cuts = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def linear(x: mx.array, layer: nn.Module) -> mx.array:
    """layer(x) for a Linear or an Embedding used as LM head (quantized or not), split across
    the compute streams: by output rows for one token, by tokens for several."""
    if "lora_a" in layer:  # mlx-lm's LoRALinear (model/tune/lora.py): its base, then A/B
        low_rank = (layer.dropout(x) @ layer.lora_a) @ layer.lora_b
        return linear(x, layer.linear) + (layer.scale * low_rank).astype(x.dtype)
    weight = layer["weight"]  # [out, in], or [out, in * bits / 32] packed
    as_head = isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding))
    if _by_blas(x, layer):
        return blas.linear(x, *_blas_parts(layer))
    streams = compute_streams()
    if len(streams) == 1 or weight.shape[0] * x.shape[-1] < MIN_SPLIT_ELEMENTS:
        return layer.as_linear(x) if as_head else layer(x)
    if x.size == x.shape[-1]:  # one token: each stream computes a slice of the outputs
        scales, biases = layer.get("scales"), layer.get("biases")
        parts = []
        for stream, (a, b) in zip(streams, _bounds(weight.shape[0], len(streams))):
            with mx.stream(stream):
                if scales is None:
                    parts.append(x @ weight[a:b].T)
                else:
                    parts.append(mx.quantized_matmul(
                        x, weight[a:b], scales[a:b], None if biases is None else biases[a:b],
                        transpose=True, group_size=layer.group_size, bits=layer.bits,
                        mode=layer.mode,
                    ))
        return mx.concatenate(parts, axis=-1)
    rows = x.reshape(-1, x.shape[-1])  # several tokens: each stream takes a slice of them
    parts = []
    for stream, (a, b) in zip(streams, _bounds(rows.shape[0], len(streams))):
        with mx.stream(stream):
            parts.append(layer.as_linear(rows[a:b]) if as_head else layer(rows[a:b]))
    return mx.concatenate(parts, axis=0).reshape(*x.shape[:-1], -1)


def _by_blas(x: mx.array, layer: nn.Module, in_features: int | None = None) -> bool:
    """Whether layer(x) goes through model/blas.py (CPU, many rows) as one product (not a LoRA
    layer: linear() sends its base there and adds the low-rank part)."""
    if "lora_a" in layer:
        return False
    weight = layer["weight"]
    rows, in_features = x.size // x.shape[-1], in_features or x.shape[-1]
    return "bias" not in layer and blas.applies(rows, weight.shape[0], in_features, weight.dtype)


def _blas_parts(layer: nn.Module) -> blas.Parts:
    """blas.matmul_t's weight arguments for a Linear / Embedding, quantized or not."""
    return (layer["weight"], layer.get("scales"), layer.get("biases"),
            getattr(layer, "group_size", 64), getattr(layer, "bits", None),
            getattr(layer, "mode", "affine"))  # fmt: skip


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = args.num_attention_heads
        self.num_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        dim = args.hidden_size
        self.q_proj = nn.Linear(dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, dim, bias=False)
        self.rope = initialize_rope(
            self.head_dim,
            args.rope_theta,
            args.rope_traditional,
            args.rope_scaling,
            args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, mask: Any, cache: Any = None) -> mx.array:
        B, L, _ = x.shape  # x: [B, L, hidden]
        q = linear(x, self.q_proj).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = linear(x, self.k_proj).reshape(B, L, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        v = linear(x, self.v_proj).reshape(B, L, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)  # [B, heads, L, head_dim]
        k = self.rope(k, offset=offset)  # [B, kv_heads, L, head_dim]
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, kv_heads, S, head_dim]
        if blas.attention_applies(q, k):  # CPU, many query tokens: numpy's BLAS
            out = blas.attention(q, k, v, self.scale, mask)
        else:
            out = scaled_dot_product_attention(q, k, v, cache, scale=self.scale, mask=mask)
        return linear(out.transpose(0, 2, 1, 3).reshape(B, L, -1), self.o_proj)


class MLP(nn.Module):
    """Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if _by_blas(x, gate) and _by_blas(x, up) and _by_blas(x, down, gate["weight"].shape[0]):
            return blas.swiglu(x, _blas_parts(gate), _blas_parts(up), _blas_parts(down))
        return linear(nn.silu(linear(x, gate)) * linear(x, up), down)


class Experts(nn.Module):
    """E SwiGLU experts, stacked: gate/up [E, ffn, hidden], down [E, hidden, ffn]."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dim, hidden_dim, num_experts, bias=False)
        self.up_proj = SwitchLinear(dim, hidden_dim, num_experts, bias=False)
        self.down_proj = SwitchLinear(hidden_dim, dim, num_experts, bias=False)

    def __call__(self, x: mx.array, inds: mx.array) -> mx.array:
        """x: [N, hidden], inds: [N, k] -> [N, k, hidden] (each token through its k experts)."""
        N, k = inds.shape
        if any("weight" not in self[name] for name in PROJECTIONS):
            return self.through_modules(x, inds)  # LoRA (model/tune/lora.py)
        w = {name: Projection.of(self[name]) for name in PROJECTIONS}
        streams = compute_streams()
        if N * k >= SORTED_MIN_ROWS:
            # Prefill: rows grouped by expert so each expert's weights are read once per
            # stream; each stream takes a contiguous slice of the sorted rows.
            flat = inds.flatten()
            order = mx.argsort(flat)
            rows, experts = x[order // k][:, None], flat[order]  # [N*k, 1, hidden], [N*k]
            # Through BLAS (CPU, many rows), each expert's rows stay together, as when experts
            # stream under a budget: the same products, the same numbers.
            split = len(streams)
            if by_blas(N * k, w) and RowGroups.of(np.array(inds)).largest >= blas.MIN_ROWS:
                split = 1
            parts = []
            for stream, (a, b) in zip(streams, _bounds(N * k, split)):
                with mx.stream(stream):
                    parts.append(swiglu(rows[a:b], w, experts[a:b], sorted_inds=True))
            y = mx.concatenate(parts, axis=0)
            return y[mx.argsort(order)].reshape(N, k, -1)
        # Decode: the j-th chosen expert of every token on stream j (its own CPU core).
        parts = []
        for j in range(k):
            with mx.stream(streams[j % len(streams)]):
                parts.append(swiglu(x[:, None, None], w, inds[:, j : j + 1], False))
        return mx.concatenate(parts, axis=1).squeeze(-2)  # [N, k, hidden]


    def through_modules(self, x: mx.array, inds: mx.array) -> mx.array:
        """__call__ through the projection modules themselves, as mlx-lm's SwitchGLU does:
        what LoRASwitchLinear wrappers (one A/B pair per expert) need, differentiable."""
        N, k = inds.shape
        modules = {name: self[name] for name in PROJECTIONS}
        if all("lora_a" in m for m in modules.values()) and by_blas(
            N * k, {name: Projection.of(m.linear) for name, m in modules.items()}
        ):  # CPU, many rows (training, an adapted prompt): each expert's rows through BLAS
            groups = RowGroups.of(np.array(inds))
            order = mx.array(groups.order)
            rows, flat = x[order // k], inds.flatten()[order]  # [N*k, hidden], [N*k]
            y = lora_swiglu_by_expert(rows, modules, groups, flat)
            return groups.unsort(y, N, k)
        rows, flat, order = x[:, None, None], inds, None  # [N, 1, 1, hidden]
        if N * k >= SORTED_MIN_ROWS:  # rows grouped by expert, as mlx-lm's gather_sort
            order = mx.argsort(inds.flatten())
            rows, flat = x[order // k][:, None], inds.flatten()[order]  # [N*k, 1, hidden]
        sort = order is not None
        h = nn.silu(self.gate_proj(rows, flat, sorted_indices=sort))
        y = self.down_proj(h * self.up_proj(rows, flat, sorted_indices=sort), flat,
                           sorted_indices=sort)  # fmt: skip
        if order is None:
            return y.squeeze(-2)  # [N, k, hidden]
        return y[mx.argsort(order)].reshape(N, k, -1)


class SparseMoE(nn.Module):
    """Router picks the top-k experts per token; softmax over those k weights their outputs."""

    shard = None  # model.distributed.ExpertShard: this rank holds a slice of the experts

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.switch_mlp = Experts(args.hidden_size, args.intermediate_size, args.num_local_experts)

    def __call__(self, x: mx.array, routing: list | None = None) -> mx.array:
        B, L, D = x.shape
        logits = self.gate(x)  # [B, L, E]
        inds, weights = route(logits, self.top_k)  # [B, L, k] each
        if routing is not None:
            routing.append(inds)  # [B, L, k]
        if self.shard is not None:  # this rank's experts, summed over the ranks
            y = self.shard(self.switch_mlp, x.reshape(B * L, D), inds.reshape(B * L, -1),
                           weights.reshape(B * L, -1))  # fmt: skip
            return y.reshape(B, L, D)
        y = self.switch_mlp(x.reshape(B * L, D), inds.reshape(B * L, -1))  # [B*L, k, D]
        y = (y * weights.reshape(B * L, -1, 1)).sum(axis=-2)
        return y.reshape(B, L, D)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if args.is_moe:
            self.block_sparse_moe = SparseMoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)

    def __call__(self, x: mx.array, mask: Any, cache: Any, routing: list | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        normed = self.post_attention_layernorm(h)
        if "block_sparse_moe" in self:
            return h + self.block_sparse_moe(normed, routing)
        return h + self.mlp(normed)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Transformer(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # Set to a list to record each MoE layer's top-k expert ids ([B, T, k], layer order).
        self.routing: list | None = None
        self.memory = None  # how it was loaded: a memory_plan.MemoryDecision, or None
        self.stage = None  # model.distributed.PipelineStage: this rank holds a block of layers

    def __setattr__(self, key: str, value: Any) -> None:
        if key in ("routing", "memory", "stage"):  # plain attributes, never parameters
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    @property
    def layers(self) -> list[Block]:
        return self.model.layers

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """inputs: int [B, T] -> logits [B, T, vocab] (causal; continues `cache` if given)."""
        return self.logits(self.hidden_states(inputs, cache))

    def hidden_states(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        """inputs: int [B, T] -> final-normed hidden states [B, T, hidden]."""
        if self.stage is not None:  # a block of layers of several ranks: the stage passes it on
            return self.stage.hidden_states(self, inputs, cache)
        h = self.model.embed_tokens(inputs)  # [B, T, hidden]
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0], window_size=self.args.sliding_window)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache, self.routing)
        return self.model.norm(h)

    def logits(self, h: mx.array) -> mx.array:
        """Hidden states [..., hidden] -> logits [..., vocab]."""
        head = self.model.embed_tokens if self.args.tie_word_embeddings else self.lm_head
        return linear(h, head)

    def make_cache(self, kv_bits: int | None = None) -> list:
        """One KV cache per layer: a rolling one of `sliding_window` entries when configured,
        keys and values quantized to `kv_bits` (mlx-lm's QuantizedKVCache) when asked."""
        if self.args.sliding_window:
            if kv_bits:
                raise CheckpointError(
                    "a quantized KV cache is not available for sliding-window models"
                )
            return [RotatingKVCache(max_size=self.args.sliding_window) for _ in self.layers]
        return kv_caches(self.args, len(self.layers), kv_bits)

    def prefill_layerwise(self, inputs: mx.array, cache: list, chunk: int) -> mx.array:
        """Like `hidden_states(inputs, cache)`, but layer by layer over all of `inputs` [1, T]:
        each layer's attention runs over the tokens in chunks of `chunk` (filling its KV cache
        in order), then its experts over all T tokens at once, so a layer whose experts are
        streamed from disk reads each of them once for the whole prompt instead of once per
        chunk. Returns the final-normed hidden state of the last token [1, 1, hidden]."""
        h = self.model.embed_tokens(inputs)  # [1, T, hidden]
        T = h.shape[1]
        for layer, layer_cache in zip(self.layers, cache):
            parts = []
            for a, b in _chunks(T, chunk):
                x = h[:, a:b]
                mask = create_attention_mask(x, layer_cache, window_size=self.args.sliding_window)
                part = x + layer.self_attn(layer.input_layernorm(x), mask, layer_cache)
                mx.eval(part, layer_cache.state)
                parts.append(part)
            h = mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
            normed = layer.post_attention_layernorm(h)
            if "block_sparse_moe" in layer:
                h = h + layer.block_sparse_moe(normed, self.routing)
            else:
                h = h + layer.mlp(normed)
            mx.eval(h)
        return self.model.norm(h[:, -1:])

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map Hugging Face names onto ours: stack per-expert weights, drop derived tensors."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        for layer in range(self.args.num_hidden_layers):
            for proj in EXPERT_PROJECTIONS:
                for part in PARTS:
                    if expert_tensor(layer, proj, part, 0) not in weights:
                        continue
                    experts = []
                    for e in range(self.args.num_local_experts):
                        if (key := expert_tensor(layer, proj, part, e)) not in weights:
                            raise CheckpointError(f"checkpoint lacks tensor {key}")
                        experts.append(weights.pop(key))
                    weights[expert_tensor(layer, proj, part)] = mx.stack(experts)
        return weights
