"""What the chat app knows of an engine: the ``Engine`` protocol (docs/CONTRACTS.md, model/
generate.py) and ``ReplyStats``, the one form of a reply's figures that the screen shows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np


class Engine(Protocol):
    """The part of ``model.generate.Engine`` the app uses (tests pass a scripted engine)."""

    name: str
    info: Any  # model.info.ModelInfo: architecture, num_experts, quantization, ...
    context_length: int
    routing_observer: Callable[[np.ndarray], None] | None
    last_routing: np.ndarray | None  # [layers, experts] over the last reply (MoE models)

    def stream(self, messages: list[dict], settings: Any = None) -> Iterator[Any]: ...

    def cancel(self) -> None: ...

    def count_tokens(self, messages: list[dict]) -> int: ...


def num_experts(engine: Engine | None) -> int | None:
    """Experts per layer; 0 for a dense model; None when the engine does not say."""
    if engine is None or engine.info is None:
        return None
    return getattr(engine.info, "num_experts", None)


@dataclass(frozen=True)
class ReplyStats:
    """A reply's figures, from the engine's GenerationStats or from the store's saved dict."""

    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    context_tokens: int | None = None
    finish_reason: str = ""
    expert_hit_rate: float | None = None  # only when experts stream from disk

    @classmethod
    def of(cls, stats: Any) -> ReplyStats | None:
        """From a GenerationStats, a dict saved by the store, or None."""
        if stats is None:
            return None
        raw = stats if isinstance(stats, dict) else vars(stats)
        values = {f.name: raw[f.name] for f in fields(cls) if raw.get(f.name) is not None}
        return cls(**values)
