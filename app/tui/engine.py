"""What the chat app knows of an engine: the ``Engine`` protocol (docs/CONTRACTS.md, model/
generate.py), and ``ReplyStats``: model/stats.py's GenerationStats, the one form of a reply's
figures (``ReplyStats.of`` reads the store's saved dicts too)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from model.stats import GenerationStats as ReplyStats  # noqa: F401 (the screens' name for it)


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


def thinking_switch(engine: Engine | None) -> bool | None:
    """Whether the model's chat template thinks by default, when it has a thinking switch
    (Qwen3's ``enable_thinking``); None when it has none (or the engine does not say)."""
    return getattr(engine, "thinking_default", None)


def template_options(engine: Engine | None, thinking: bool) -> dict:
    """The chat template variables for a chat's settings: ``enable_thinking`` where the
    template has that switch."""
    return {} if thinking_switch(engine) is None else {"enable_thinking": thinking}
