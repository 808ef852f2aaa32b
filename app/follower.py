"""A rank other than 0 of a model split over several ranks: it loads its part and runs rank 0's
requests (each reply, each reset) until rank 0 ends; it prints nothing (mlx-lm's server joins
its non-zero ranks in the serving layer the same way)."""

from __future__ import annotations

from model.distributed import RankMismatch, RankSplit
from model.errors import MixchatError
from model.generate import Engine, GenerationSettings
from model.load_options import LoadOptions


def follow(model: str | None, options: LoadOptions, split: RankSplit) -> int:
    """Load this rank's share of `model` (`Engine.load(model, options, split=split)`) and run
    rank 0's requests until it says bye; returns the exit code."""
    control = split.world.control
    assert control is not None
    try:
        engine = Engine.load(model, options, split=split)
    except RankMismatch:  # rank 0 found out too, and says so itself
        control.close()
        raise
    except MixchatError as e:  # rank 0 says it, in one line
        control.send({"op": "error", "message": str(e)})
        control.close()
        raise
    while True:
        message = control.requests.get()
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
