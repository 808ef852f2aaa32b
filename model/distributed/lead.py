"""Rank 0 leads: each request goes to the other ranks before rank 0 runs it (the followers'
loop is the app's: app/follower.py)."""

from __future__ import annotations

import secrets
from dataclasses import asdict, replace

from .control import Control


class Leader:
    """Rank 0's side of the protocol: each request goes to the other ranks before rank 0 runs it."""

    def __init__(self, control: Control):
        self.control = control

    def start_stream(self, messages: list[dict], settings):
        """Send a reply request; a seed is fixed here so that sampling agrees on every rank."""
        if settings.seed is None:
            settings = replace(settings, seed=secrets.randbits(31))
        self.control.send({"op": "stream", "messages": messages, "settings": asdict(settings)})
        return settings

    def reset(self) -> None:
        self.control.send({"op": "reset"})
