"""One sampler per request, built from its GenerationSettings: what the Engine samples with,
and each row of a batch (model/generation/batch.py) with its own."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import mlx.core as mx

from ..generation_settings import GenerationSettings
from ..mlx_lm_parts import apply_min_p, apply_top_p

Sampler = Callable[[mx.array], mx.array]  # log-probs [1, V] -> token [1]


def greedy(logprobs: mx.array) -> mx.array:
    """The most likely token (temperature 0): mlx-lm's greedy sampler."""
    return mx.argmax(logprobs, axis=-1)


def request_sampler(settings: GenerationSettings) -> Sampler:
    """mlx-lm's make_sampler chain (top-p, then min-p, then a draw at the temperature). A
    seeded request draws from its own key, split per draw as mx.random.seed's global key is,
    so its tokens are those mlx-lm samples after mx.random.seed(seed), whatever else samples
    meanwhile (other rows of a batch); an unseeded one from a key of its own too, seeded from
    the OS's entropy (MLX's global generator starts each thread at the same state, so the chat
    app's replies, each in a thread of its own, would all draw the same numbers)."""
    if settings.temperature == 0:
        return greedy
    temperature, top_p, min_p = settings.temperature, settings.top_p, settings.min_p
    seed = settings.seed if settings.seed is not None else secrets.randbits(64)
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p != 0.0:
            logprobs = apply_min_p(logprobs, min_p, 1)
        key, draw = mx.random.split(key)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=draw)

    return sample


def sample_rows(logprobs: mx.array, samplers: list[Sampler]) -> mx.array:
    """Tokens [B] from log-probs [B, V], row i sampled by samplers[i]."""
    if all(s is greedy for s in samplers):
        return greedy(logprobs)
    return mx.concatenate([s(logprobs[i : i + 1]) for i, s in enumerate(samplers)])
