"""How an exception from the engine is told to the user: one line, never a traceback."""

from __future__ import annotations


def describe_error(error: BaseException) -> str:
    """``str(error)`` for mixchat's own errors; other exceptions are prefixed by their type."""
    detail = str(error) or type(error).__name__
    try:
        from model.errors import MixchatError
    except ImportError:  # pragma: no cover - model/ ships with the app
        return f"{type(error).__name__}: {detail}"
    if isinstance(error, MixchatError):
        return detail
    return f"{type(error).__name__}: {detail}"
