"""A model split over this process's ranks, as the loader is given it (mlx-lm's sharded_load
is given a group the same way): the app joins the ranks and passes `rank_split()` down to
`model.load` / `Engine.load`; nothing below the app looks for the ranks by itself."""

from __future__ import annotations

from dataclasses import dataclass

from .hosts import rank_memory
from .join import World, world
from .lead import Leader
from .pipeline import take_layers
from .shard import ExpertShard, take_share


def shard_of(model) -> ExpertShard | None:
    """The ExpertShard of a model split by experts, else None."""
    if (shard := getattr(model, "expert_shard", None)) is not None:  # a family's
        return shard
    for layer in model.layers:
        shard = getattr(layer, "block_sparse_moe", None) and layer.block_sparse_moe.shard
        if shard is not None:
            return shard
    return None


@dataclass(frozen=True)
class RankSplit:
    """This rank's part of a model split over the ranks of `world` (two or more): by experts
    or by layers, as `world.mode` says."""

    world: World

    @property
    def group(self):
        """The mx.distributed group the ranks compute over (the engine agrees on stops in it)."""
        return self.world.group

    def plan_memory(self, checkpoint, compute_bytes: int, memory_budget: int | str | None,
                    max_context: int | None, kv_bits: int | None):  # fmt: skip
        """The memory decision of this rank's share (`hosts.rank_memory`)."""
        return rank_memory(checkpoint, compute_bytes, memory_budget, max_context, kv_bits,
                           self.world)  # fmt: skip

    def take(self, checkpoint, weights: dict, model, dtype, kv_bits: int | None,
             stream: bool = False) -> dict:  # fmt: skip
        """This rank's part of `weights` (lazy), `model` shrunk to it: its experts of every
        layer (`take_share`; `stream`: they stream through the expert cache) or its block of
        layers (`take_layers`)."""
        settings = f"{dtype}|{kv_bits}"
        if self.world.mode == "pipeline":
            return take_layers(checkpoint, weights, model, self.world, dtype, settings)
        return take_share(checkpoint, weights, model, self.world, settings, stream)

    def held_experts(self, model) -> range | None:
        """The experts of each layer this rank holds (split by experts), else None (all)."""
        shard = shard_of(model)
        return None if shard is None else range(shard.lo, shard.hi)

    def leader(self) -> Leader | None:
        """Rank 0's Leader (it sends each request to the others); None on the other ranks."""
        w = self.world
        return Leader(w.control) if w.leader and w.control is not None else None


def rank_split(mode: str | None = None) -> RankSplit | None:
    """This process's split when it runs as one rank of several (joining them, with `mode`,
    if not joined yet), else None: the model loads whole on one process."""
    w = world(mode)
    return RankSplit(w) if w.size > 1 else None
