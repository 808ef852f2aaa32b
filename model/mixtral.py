"""The Mixtral architecture in MLX (and the dense Mistral/Llama variant).

Token embedding -> N x [RMSNorm -> GQA attention with RoPE (optional sliding window) -> residual
-> RMSNorm -> sparse MoE (or dense SwiGLU MLP) -> residual] -> RMSNorm -> LM head.

Module names follow mlx-lm's `mixtral`/`llama` models, so directories written by
`mlx_lm.convert` load as they are; `Model.sanitize` maps Hugging Face names onto them.
Each layer's experts are stacked ([E, out, in]) so the experts a token picks are applied with
one `gather_qmm`/`gather_mm` call per projection.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .config import ModelArgs
from .errors import CheckpointError


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
        q = self.q_proj(x).reshape(B, L, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)  # [B, heads, L, head_dim]
        k = self.rope(k, offset=offset)  # [B, kv_heads, L, head_dim]
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, kv_heads, S, head_dim]
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def expert_matmul(x: mx.array, proj: nn.Module, inds: mx.array, sorted_inds: bool) -> mx.array:
    """x @ proj.weight[inds].T for stacked expert weights, quantized or not."""
    if isinstance(proj, QuantizedSwitchLinear):
        return mx.gather_qmm(
            x,
            proj["weight"],
            proj["scales"],
            proj.get("biases"),
            rhs_indices=inds,
            transpose=True,
            group_size=proj.group_size,
            bits=proj.bits,
            mode=proj.mode,
            sorted_indices=sorted_inds,
        )
    return mx.gather_mm(x, proj["weight"].swapaxes(-1, -2), rhs_indices=inds, sorted_indices=sorted_inds)


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
        if N * k >= 64:
            # Prefill: group rows by expert so each expert's weights are read once.
            flat = inds.flatten()
            order = mx.argsort(flat)
            rows = x[order // k][:, None]  # [N*k, 1, hidden]
            y = self._swiglu(rows, flat[order], sorted_inds=True)
            return y[mx.argsort(order)].reshape(N, k, -1)
        y = self._swiglu(x[:, None, None], inds, sorted_inds=False)  # [N, k, 1, hidden]
        return y.squeeze(-2)

    def _swiglu(self, x: mx.array, inds: mx.array, sorted_inds: bool) -> mx.array:
        gate = expert_matmul(x, self.gate_proj, inds, sorted_inds)
        up = expert_matmul(x, self.up_proj, inds, sorted_inds)
        return expert_matmul(nn.silu(gate) * up, self.down_proj, inds, sorted_inds)


class SparseMoE(nn.Module):
    """Router picks the top-k experts per token; softmax over those k weights their outputs."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_local_experts, bias=False)
        self.switch_mlp = Experts(args.hidden_size, args.intermediate_size, args.num_local_experts)

    def __call__(self, x: mx.array, routing: list | None = None) -> mx.array:
        B, L, D = x.shape
        logits = self.gate(x)  # [B, L, E]
        inds = mx.argpartition(-logits, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        weights = mx.softmax(mx.take_along_axis(logits, inds, axis=-1), axis=-1, precise=True)
        if routing is not None:
            routing.append(inds)  # [B, L, k]
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

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "routing":  # a plain attribute, never a parameter
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
        h = self.model.embed_tokens(inputs)  # [B, T, hidden]
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0], window_size=self.args.sliding_window)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache, self.routing)
        return self.model.norm(h)

    def logits(self, h: mx.array) -> mx.array:
        """Hidden states [..., hidden] -> logits [..., vocab]."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self) -> list:
        """One KV cache per layer; a rolling one of `sliding_window` entries when configured."""
        if self.args.sliding_window:
            return [RotatingKVCache(max_size=self.args.sliding_window) for _ in self.layers]
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map Hugging Face names onto ours: stack per-expert weights, drop derived tensors."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        for layer in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{layer}.block_sparse_moe"
            for hf_name, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                for part in ("weight", "scales", "biases"):
                    key = f"{prefix}.experts.{{}}.{hf_name}.{part}"
                    if key.format(0) not in weights:
                        continue
                    experts = []
                    for e in range(self.args.num_local_experts):
                        if key.format(e) not in weights:
                            raise CheckpointError(f"checkpoint lacks tensor {key.format(e)}")
                        experts.append(weights.pop(key.format(e)))
                    weights[f"{prefix}.switch_mlp.{name}.{part}"] = mx.stack(experts)
        return weights
