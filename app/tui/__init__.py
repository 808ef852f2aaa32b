"""mixchat's terminal interface (Textual): re-exports ``run_chat`` (run.py) only."""

from .run import run_chat

__all__ = ["run_chat"]
