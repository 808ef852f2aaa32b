"""Pipeline parallelism: rank r of n holds layers [r*L/n, (r+1)*L/n) with all their experts.

The first rank holds the token embeddings, the last the LM head (with tied embeddings, the
last rank holds the embedding matrix too, as its head); every rank keeps the final norm (one
[hidden] vector: the engine reads the compute dtype from it), which only the last applies.
A forward pass goes rank by rank: the first embeds the tokens, each rank runs its layers on
what it received (`mx.distributed.recv`) and sends the result on (`send`); the last rank
samples the next token and one all_sum of that int hands it to every rank (the others add
zero), so every rank feeds, stops and ends at the same token. Each rank reads only its own
layers' tensors from the checkpoint (`take_layers` drops the others before anything is read;
`mx.load` is lazy per tensor). The hidden states sent are the one-process values bit for bit,
so greedy tokens are identical to one process.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..mlx_lm_parts import create_attention_mask
from .errors import DistributedError
from .join import World
from .shard import check_same_everywhere, require_safetensors

LAYER_PREFIX = "model.layers."


def layer_range(num_layers: int, rank: int, size: int) -> tuple[int, int]:
    """Layers [lo, hi) that `rank` of `size` holds (contiguous; sizes differ by at most one)."""
    return num_layers * rank // size, num_layers * (rank + 1) // size


class PipelineStage:
    """This rank's place in the pipeline: set on `mixtral.Model.stage`, which hands it the
    forward pass (`hidden_states`); the engine's decode step calls `step`."""

    def __init__(self, lo: int, hi: int, rank: int, size: int, group: Any, dtype: mx.Dtype):
        self.lo, self.hi, self.rank, self.size = lo, hi, rank, size
        self.group, self.dtype = group, dtype

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def hidden_states(self, model, inputs: mx.array, cache: list | None = None) -> mx.array:
        """inputs int [B, T] (every rank knows them: it replays rank 0's request) -> on the last
        rank the final-normed hidden states [B, T, hidden]; on the others this rank's output
        [B, T, hidden], which is sent to the next rank when it is evaluated."""
        B, T = inputs.shape
        if self.first:
            h = model.model.embed_tokens(inputs)
        else:
            shape = (B, T, model.args.hidden_size)
            h = mx.distributed.recv(shape, self.dtype, self.rank - 1, group=self.group)
        if cache is None:
            cache = [None] * len(model.layers)
        mask = create_attention_mask(h, cache[0], window_size=model.args.sliding_window)
        for layer, layer_cache in zip(model.layers, cache):
            h = layer(h, mask, layer_cache, model.routing)
        if self.last:
            return model.model.norm(h)
        return mx.distributed.send(h, self.rank + 1, group=self.group)

    def step(self, model, tokens: mx.array, cache: list, sampler) -> mx.array:
        """One decode (or last prompt) pass over `tokens` [1, T]: the sampled next token [1],
        the same on every rank (the last samples, one all_sum shares it)."""
        h = self.hidden_states(model, tokens, cache)
        if self.last:
            logits = model.logits(h[:, -1, :])
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            token = sampler(logprobs).astype(mx.int32)
        else:  # zero, once this rank's hidden states have gone to the next rank
            token = mx.depends(mx.zeros((1,), mx.int32), h)
        return mx.distributed.all_sum(token, group=self.group)


def take_layers(checkpoint, weights: dict[str, mx.array], model, world: World,
                dtype: mx.Dtype, settings: str = "") -> dict:  # fmt: skip
    """Keep this rank's tensors of `weights` (lazy, as `weights.read_weights` returns them:
    the others are never read), renamed to the local layer numbers; shrink `model` to its
    layers (and its embeddings / LM head as its place says) and give it its PipelineStage.
    `settings` (what changes the numbers) must be the same on every rank, as must the model."""
    args = checkpoint.args
    require_safetensors(checkpoint)
    L = args.num_hidden_layers
    if world.size > L:
        raise DistributedError(f"{world.size} ranks for {L} layers: use at most {L}")
    check_same_everywhere(f"pipeline|{args}|{checkpoint.size_bytes}|{settings}", world)
    lo, hi = layer_range(L, world.rank, world.size)
    first, last = world.rank == 0, world.rank == world.size - 1
    tied = args.tie_word_embeddings
    _check_overrides(args, lo, hi)
    share = {}
    for name, value in weights.items():
        if name.startswith(LAYER_PREFIX):
            index, rest = name[len(LAYER_PREFIX) :].split(".", 1)
            if lo <= int(index) < hi:
                share[f"{LAYER_PREFIX}{int(index) - lo}.{rest}"] = value
        elif name.startswith("model.embed_tokens."):
            if first or (last and tied):
                share[name] = value
        elif name.startswith("lm_head."):
            if last:
                share[name] = value
        else:  # the final norm
            share[name] = value
    model.model.layers = model.model.layers[lo:hi]
    if not (first or (last and tied)):
        del model.model["embed_tokens"]
    if not last and not tied:
        del model["lm_head"]
    model.stage = PipelineStage(lo, hi, world.rank, world.size, world.group, dtype)
    return share


def _check_overrides(args, lo: int, hi: int) -> None:
    """Per-module quantization settings are keyed by layer number: renamed local layers must
    find the same ones (refused in one line rather than quantized otherwise)."""
    config = args.quantization or {}
    for key, value in config.items():
        if not (isinstance(value, dict) and key.startswith(LAYER_PREFIX)):
            continue
        index, rest = key[len(LAYER_PREFIX) :].split(".", 1)
        if lo <= int(index) < hi and config.get(f"{LAYER_PREFIX}{int(index) - lo}.{rest}") != value:
            raise DistributedError(
                "this checkpoint quantizes layers differently from one another: run it with "
                "MIXCHAT_PARALLEL=expert"
            )
