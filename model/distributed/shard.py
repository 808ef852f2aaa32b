"""Expert parallelism: each rank holds experts [r*E/n, (r+1)*E/n) of every MoE layer, read by
byte range, and each MoE layer ends with one all_sum over the ranks.

Mixtral (`mixtral.SparseMoE.shard`) sums the router-weighted outputs, [N, hidden]. A family on
mlx-lm's definitions (model/families.py: Qwen-MoE, OLMoE, DeepSeek, GraniteMoE, PhiMoE, gpt-oss) keeps
mlx-lm's MoE block: its SwitchGLU becomes a `ShardedSwitchGLU` that computes this rank's
experts and all_sums the [..., k, hidden] outputs (each slot exact on the rank holding it, zero
on the others, so the sum is the one-process value), then the block weights and adds them as
mlx-lm does; routers and shared experts run on every rank."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from ..experts import SORTED_MIN_ROWS
from ..names import (
    EXPERT_MARK,
    EXPERT_MODULES,
    EXPERT_PROJECTIONS,
    PER_EXPERT_MARK,
    PROJECTION_OF,
    is_expert_tensor,
    per_expert_name,
)
from ..safetensors_header import read_safetensors_header
from .errors import DistributedError, RankMismatch
from .join import World

_NP_DTYPES = {"U32": np.uint32, "I32": np.int32, "U8": np.uint8, "I8": np.int8,
              "F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # fmt: skip


def expert_range(num_experts: int, rank: int, size: int) -> tuple[int, int]:
    """Experts [lo, hi) of every MoE layer that `rank` of `size` holds."""
    return num_experts * rank // size, num_experts * (rank + 1) // size


class ExpertShard:
    """This rank's experts [lo, hi) of one MoE layer, and the group the outputs are summed over.
    Set on `mixtral.SparseMoE.shard`, which hands it the layer's experts and routing."""

    def __init__(self, lo: int, hi: int, group: Any):
        self.lo, self.hi, self.group = lo, hi, group

    def __call__(self, experts, x: mx.array, inds: mx.array, weights: mx.array) -> mx.array:
        """x [N, hidden], the router's global expert ids and weights [N, k] -> [N, hidden]: the
        router-weighted sum of every token's chosen experts, over all ranks.

        Each rank adds the weighted outputs of the chosen experts it holds (a choice held
        elsewhere counts zero), then one all_sum adds the ranks' sums: the one-process sum of
        k = 2 terms, a + b, becomes (a + 0) + (0 + b) or (a + b) + 0, the same float. Decoding
        (fewer rows than the sorted path takes), the router's choices are read back (one sync
        per layer) and only the slots holding a local expert for some token are computed, so
        a rank reads none of the experts it was not asked for. Longer prompts go through the
        sorted path with the other ranks' choices pointed at a local expert and masked."""
        N, k = inds.shape
        held, local = self.local(inds)
        if N * k < SORTED_MIN_ROWS:
            slots = [j for j in range(k) if np.asarray(held[:, j]).any()]
            if not slots:
                y = mx.zeros((N, x.shape[-1]), dtype=x.dtype)
                return mx.distributed.all_sum(y, group=self.group)
            cols = mx.array(slots)
            local, weights, held = local[:, cols], weights[:, cols], held[:, cols]
        if getattr(experts, "runtime", None) is not None:  # streamed: the file's expert ids
            local = local + self.lo
        y = experts(x, local) * weights[..., None]  # [N, slots, hidden]
        y = mx.where(held[..., None], y, mx.zeros_like(y)).sum(axis=-2)
        return mx.distributed.all_sum(y, group=self.group)

    def local(self, inds: mx.array) -> tuple[mx.array, mx.array]:
        """(which of the global expert ids `inds` this rank holds, the ids in its share: a
        choice held elsewhere points at a held expert of the same token, to be masked)."""
        held = (inds >= self.lo) & (inds < self.hi)
        local = inds - self.lo
        fallback = mx.max(mx.where(held, local, 0), axis=-1, keepdims=True)
        return held, mx.where(held, local, fallback).astype(inds.dtype)

    def switch(self, experts, x: mx.array, inds: mx.array) -> mx.array:
        """A family's SwitchGLU over the ranks: x [..., hidden], global ids [..., k] ->
        [..., k, hidden], each slot computed on the rank holding its expert, zero elsewhere,
        summed over the ranks (x + 0 is x: the one-process outputs, bit for bit)."""
        held, local = self.local(inds)
        y = experts(x, local)
        y = mx.where(held[..., None], y, mx.zeros_like(y))
        return mx.distributed.all_sum(y, group=self.group)


_SHARDED: dict[type, type] = {}


def _sharded_class(cls: type) -> type:
    """`cls` (mlx-lm's SwitchGLU) computing this rank's experts only (ExpertShard.switch)."""
    if cls not in _SHARDED:

        def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
            return self._expert_shard.switch(lambda h, i: cls.__call__(self, h, i), x, indices)

        _SHARDED[cls] = type(f"Sharded{cls.__name__}", (cls,), {"__call__": __call__})
    return _SHARDED[cls]


def family_experts(layer) -> tuple[object, str] | None:
    """(the module holding a family layer's stacked experts, their attribute) or None (a
    dense layer)."""
    for path in EXPERT_MODULES:
        *parents, attr = path.split(".")
        owner = layer
        for name in parents:
            owner = owner.get(name) if isinstance(owner, dict) else None
        experts = owner.get(attr) if isinstance(owner, dict) else None
        if isinstance(experts, dict) and "gate_proj" in experts:
            return owner, attr
    return None


# Hugging Face's per-expert tensors (PhiMoE keeps Mixtral's w1/w2/w3 names)
_FAMILY_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)"
    r"\.(?P<part>\w+)$"
)
# Experts stacked under another name that mlx-lm's sanitize splits (GraniteMoE's [E, 2F, D]
# input_linear, gate and up together, and [E, D, F] output_linear)
_FAMILY_STACKED = re.compile(r"\.block_sparse_moe\.(?:input_linear|output_linear)\.")
# gpt-oss's published experts: a layer's in one [E, ...] tensor each, gate and up fused (float
# [E, in, 2*out] and its bias, or MXFP4 blocks and scales), read by byte range as stacked ones
_FAMILY_FUSED = re.compile(r"\.mlp\.experts\.(?:gate_up_proj|down_proj)(?:_blocks|_scales|_bias)?$")


def _family_share(weights: dict[str, mx.array], lo: int, hi: int) -> dict[str, mx.array]:
    """A family checkpoint's tensors with its per-expert ones (Hugging Face's
    "mlp.experts.3.gate_proj.weight") of experts [lo, hi) stacked under mlx-lm's
    "mlp.switch_mlp.gate_proj.weight" (so mlx-lm's sanitize leaves them), the others dropped
    unread."""
    out, groups = {}, {}
    for key, value in weights.items():
        m = _FAMILY_PER_EXPERT.match(key)
        if m is None:
            out[key] = value[lo:hi] if _FAMILY_STACKED.search(key) else value
            continue
        e = int(m["e"])
        if lo <= e < hi:
            proj = PROJECTION_OF.get(m["proj"], m["proj"])
            name = f"{m['prefix']}.switch_mlp.{proj}.{m['part']}"
            groups.setdefault(name, {})[e] = value
    return out | _stacked(groups, lo, hi)


def take_share(checkpoint, weights: dict[str, mx.array], model, world: World,
               settings: str = "", stream: bool = False) -> dict:  # fmt: skip
    """Replace the expert tensors of `weights` (lazy, as `weights.read_weights` returns them) by
    this rank's share, read from disk with one positioned read each; shrink `model`'s expert
    layers to that share and give each MoE layer its `ExpertShard`. `stream`: the share's
    experts are streamed through the expert cache (model/offload.py), so they are not read
    here (unevaluated placeholders of the share's shapes). `settings` (what changes
    the numbers: dtype, KV cache bits) must be the same on every rank, as must the model."""
    args = checkpoint.args
    if not args.is_moe:
        raise DistributedError(
            f"{checkpoint.path.name} is a dense model: expert parallelism splits a "
            "Mixture-of-Experts model's experts; split its layers (MIXCHAT_PARALLEL=pipeline) "
            "or run it on one machine"
        )
    require_safetensors(checkpoint)
    E = args.num_local_experts
    if world.size > E:
        raise DistributedError(f"{world.size} ranks for {E} experts per layer: use at most {E}")
    check_same_everywhere(f"expert|{args}|{checkpoint.size_bytes}|{settings}", world)
    lo, hi = expert_range(E, world.rank, world.size)
    if args.is_family:
        return _take_family_share(checkpoint, weights, model, world, lo, hi, stream)
    share = {k: v for k, v in weights.items() if EXPERT_MARK not in k and PER_EXPERT_MARK not in k}
    share.update(_stack_per_expert(weights, lo, hi))  # Hugging Face layout: lazily, local only
    for file in checkpoint.files:
        specs = {k: s for k, s in read_safetensors_header(file).items() if EXPERT_MARK in k}
        if stream:  # streamed by the expert cache: shapes only, never evaluated
            for name, spec in specs.items():
                dtype = {"U32": mx.uint32, "F32": mx.float32, "F16": mx.float16}.get(
                    spec.dtype, mx.bfloat16)
                share[name] = mx.zeros((hi - lo, *spec.shape[1:]), dtype)
        elif specs:
            share.update(read_expert_blocks(file, specs, lo, hi))
    for layer in model.layers:
        moe = layer.block_sparse_moe
        for proj in EXPERT_PROJECTIONS:
            linear = moe.switch_mlp[proj]
            linear.weight = linear.weight[lo:hi]  # the unread init values: shapes only
        moe.shard = ExpertShard(lo, hi, world.group)
    return share


def _take_family_share(checkpoint, weights: dict[str, mx.array], model, world: World, lo: int,
                       hi: int, stream: bool) -> dict:  # fmt: skip
    """take_share for a family on mlx-lm's definitions: its SwitchGLUs shrunk to experts
    [lo, hi) and made ShardedSwitchGLUs."""
    if stream:
        raise DistributedError(
            f"{checkpoint.args.model_type} models over several hosts need each rank's share of "
            "the experts in memory: use --memory-budget none, or a budget the share fits in"
        )
    found = [family_experts(layer) for layer in model.layers]
    if not any(found):
        raise DistributedError(
            f"{checkpoint.args.model_type} models cannot be split by experts yet: run it on one "
            "machine"
        )
    # Per-expert tensors (Hugging Face's layout) stacked for [lo, hi) here; stacked ones (an
    # mlx-community directory) read by byte range
    share = _family_share(weights, lo, hi)
    for file in checkpoint.files:
        specs = {k: s for k, s in read_safetensors_header(file).items()
                 if is_expert_tensor(k) or _FAMILY_FUSED.search(k)}  # fmt: skip
        if specs:
            share.update(read_expert_blocks(file, specs, lo, hi))
    shard = ExpertShard(lo, hi, world.group)
    for f in found:
        if f is None:
            continue
        owner, attr = f
        switch = owner[attr]
        for proj in EXPERT_PROJECTIONS:
            linear = switch[proj]
            linear.weight = linear.weight[lo:hi]  # the unread init values: shapes only
            if "bias" in linear:
                linear.bias = linear.bias[lo:hi]
        object.__setattr__(switch, "_expert_shard", shard)
        switch.__class__ = _sharded_class(type(switch))
    object.__setattr__(model, "expert_shard", shard)
    return share


def require_safetensors(checkpoint) -> None:
    """Ranks read their part by byte ranges: a GGUF file would be read whole on every rank."""
    if checkpoint.format != "hf":
        raise DistributedError(
            "several ranks need a safetensors checkpoint (a GGUF file is read whole): convert "
            f"it with `mixchat quantize {checkpoint.path} DIR`"
        )


def check_same_everywhere(text: str, world: World) -> None:
    """Raise (on every rank) unless every rank passes the same `text`: ranks with different
    models or settings would add up wrong numbers."""
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int32)  # 2 values
    rows = np.zeros((world.size, 2), np.int32)
    rows[world.rank] = digest
    everyone = np.array(mx.distributed.all_sum(mx.array(rows), group=world.group))
    differ = [r for r in range(world.size) if not np.array_equal(everyone[r], everyone[0])]
    if differ:
        raise RankMismatch(
            f"rank {differ[0]} loaded another model or other settings than rank 0 (dtype, "
            "--kv-bits, MIXCHAT_PARALLEL): start every rank with the same command"
        )


def _stack_per_expert(weights: dict[str, mx.array], lo: int, hi: int) -> dict[str, mx.array]:
    """`experts.{e}.w1.weight` tensors (one per expert) of experts [lo, hi), stacked under
    mlx-lm's `switch_mlp` names; the others are dropped unread (mx.load is lazy per tensor)."""
    groups: dict[str, dict[int, mx.array]] = {}
    for key, value in weights.items():
        if (stacked := per_expert_name(key)) is None:
            continue
        name, expert = stacked
        if lo <= expert < hi:
            groups.setdefault(name, {})[expert] = value
    return _stacked(groups, lo, hi)


def _stacked(groups: dict[str, dict[int, mx.array]], lo: int, hi: int) -> dict[str, mx.array]:
    """Each name's experts [lo, hi) stacked in order; a missing one is a CheckpointError."""
    out = {}
    for name, experts in groups.items():
        if sorted(experts) != list(range(lo, hi)):
            missing = min(set(range(lo, hi)) - set(experts))
            raise CheckpointError(f"checkpoint lacks expert {missing} of {name}")
        out[name] = mx.stack([experts[e] for e in range(lo, hi)])
    return out


def read_expert_blocks(file: Path, specs: dict, lo: int, hi: int) -> dict[str, mx.array]:
    """Experts [lo, hi) of stacked [E, ...] tensors: one contiguous byte range each (expert e
    starts at offset + e * nbytes / E), read with one positioned read into numpy. Floating
    tensors keep their stored dtype (the loader converts them as it does whole tensors)."""
    out = {}
    fd = os.open(file, os.O_RDONLY)
    try:
        for name, spec in specs.items():
            if spec.dtype not in _NP_DTYPES:
                raise CheckpointError(f"tensor {name} has unsupported dtype {spec.dtype}")
            experts = spec.shape[0]
            if spec.nbytes % experts:
                raise CheckpointError(f"tensor {name} does not split into {experts} experts")
            stride = spec.nbytes // experts
            buf = np.empty((hi - lo) * stride, np.uint8)
            _pread_into(fd, buf, spec.offset + lo * stride, name)
            array = mx.array(buf.view(_NP_DTYPES[spec.dtype]).reshape(hi - lo, *spec.shape[1:]))
            out[name] = array.view(mx.bfloat16) if spec.dtype == "BF16" else array
    finally:
        os.close(fd)
    return out


def _pread_into(fd: int, buf: np.ndarray, offset: int, name: str) -> None:
    done = 0
    while done < buf.nbytes:
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [memoryview(buf[done:])], offset + done)
        else:  # older macOS Pythons: one extra copy
            data = os.pread(fd, buf.nbytes - done, offset + done)
            n = len(data)
            buf[done : done + n] = np.frombuffer(data, np.uint8)
        if n <= 0:
            raise CheckpointError(f"unexpected end of file reading the experts of {name}")
        done += n
