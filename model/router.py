"""The MoE router's choice: the top-k experts per token and their weights."""

from __future__ import annotations

import mlx.core as mx


def top_experts(logits: mx.array, k: int) -> mx.array:
    """The k highest-scoring experts per token, [..., k] (in no particular order): a choice,
    not a value, so gradients (training) pass through the weights only."""
    return mx.stop_gradient(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k])


def route(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """(the top-k experts [..., k], their weights [..., k]: a softmax over their k logits)."""
    inds = top_experts(logits, k)
    weights = mx.softmax(mx.take_along_axis(logits, inds, axis=-1), axis=-1, precise=True)
    return inds, weights
