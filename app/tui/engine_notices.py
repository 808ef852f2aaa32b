"""What the chat screen says once the model is loaded, in the interface language: the name the
status bar shows, the notices in the chat (no chat template, experts streamed from disk or the
model's memory warning) and the status bar's state."""

from __future__ import annotations

from typing import Any

from app.i18n import Strings
from app.tui.engine import Engine


def model_label(engine: Engine, strings: Strings) -> str:
    """The model's name, and the server it replies from (app/remote_engine.py) if any."""
    name = engine.name
    if server := getattr(engine, "server", None):
        server = server.split("://", 1)[-1].rstrip("/")
        name = strings("status.via_server", name=name, server=server)
    return name


def _memory(engine: Engine) -> Any:
    """The model's memory plan (model/memory_plan.py) when it says one, else None."""
    return getattr(getattr(engine, "model", None), "memory", None)


def load_notices(engine: Engine, strings: Strings) -> list[tuple[str, str]]:
    """(text, kind) of each chat notice about the loaded model: no chat template; experts
    streamed because the model did not fit the memory available, or a warning from loading."""
    s = strings
    notices = []
    if not getattr(engine, "has_chat_template", True):
        notices.append((s("notice.no_chat_template"), "info"))
    memory = _memory(engine)
    if memory is not None and memory.offload:
        notices.append((s(
            "notice.experts_stream", need=s.bytes(memory.plan.full_bytes),
            budget=s.bytes(memory.budget), cached=s.number(
                100 * memory.plan.cached_fraction(memory.budget)),
            context=s.number(memory.context),
        ), "info"))  # fmt: skip
    elif notice := getattr(engine, "memory_notice", ""):  # a warning from the model
        notices.append((notice, "error"))
    return notices


def load_state(engine: Engine, strings: Strings) -> str:
    """The status bar's state once the model is loaded (the short form of streamed experts)."""
    memory = _memory(engine)
    if memory is not None and memory.offload:
        return strings("status.experts_stream", budget=strings.bytes(memory.budget))
    return strings("status.ready")
