"""Rank 0 leads, the others follow: each request goes to the other ranks before rank 0 runs
it; the ranks agree at each token whether to stop."""

from __future__ import annotations

import secrets
from dataclasses import asdict

import mlx.core as mx

from ..errors import MixchatError
from .control import Control
from .errors import RankMismatch
from .join import world
from .shard import ExpertShard


def shard_of(model) -> ExpertShard | None:
    """The ExpertShard of a model split by experts, else None."""
    for layer in model.layers:
        shard = getattr(layer, "block_sparse_moe", None) and layer.block_sparse_moe.shard
        if shard is not None:
            return shard
    return None


def group_of(model):
    """The group a model is split over (by experts or by layers), None on one rank."""
    stage = getattr(model, "stage", None)
    if stage is not None:
        return stage.group
    shard = shard_of(model)
    return None if shard is None else shard.group


def agree_stop(model, stop: bool) -> bool:
    """Whether any rank wants to stop the reply now (rank 0 on a cancel), agreed by all ranks
    at the same token; `stop` itself when the model is on one rank."""
    group = group_of(model)
    if group is None:
        return stop
    total = mx.distributed.all_sum(mx.array([int(stop)], dtype=mx.int32), group=group)
    return bool(total.item())


class Leader:
    """Rank 0's side of the protocol: each request goes to the other ranks before rank 0 runs it."""

    def __init__(self, control: Control):
        self.control = control

    def start_stream(self, messages: list[dict], settings):
        """Send a reply request; a seed is fixed here so that sampling agrees on every rank."""
        from dataclasses import replace

        if settings.seed is None:
            settings = replace(settings, seed=secrets.randbits(31))
        self.control.send({"op": "stream", "messages": messages, "settings": asdict(settings)})
        return settings

    def reset(self) -> None:
        self.control.send({"op": "reset"})


def leader_of(model) -> Leader | None:
    """The Leader of an engine on rank 0 of several; None on one rank or on a follower."""
    if group_of(model) is None:
        return None
    w = world()
    return Leader(w.control) if w.leader and w.control is not None else None


def follow(model: str | None, **engine_options) -> int:
    """A rank other than 0: load this rank's share (`Engine.load(model, **engine_options)`) and
    run rank 0's requests until it ends."""
    from ..generate import Engine, GenerationSettings

    w = world()
    assert w.control is not None
    try:
        engine = Engine.load(model, **engine_options)
    except RankMismatch:  # rank 0 found out too, and says so itself
        w.control.close()
        raise
    except MixchatError as e:  # rank 0 says it, in one line
        w.control.send({"op": "error", "message": str(e)})
        w.control.close()
        raise
    while True:
        message = w.control.requests.get()
        if message["op"] == "bye":
            return 0
        if message["op"] == "reset":
            engine.reset()
        elif message["op"] == "stream":
            settings = GenerationSettings(**message["settings"])
            try:
                for _ in engine.stream(message["messages"], settings):
                    pass
            except MixchatError:  # rank 0 meets the same error and reports it
                pass
