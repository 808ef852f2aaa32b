"""The offload runtime's tuning knobs (no MLX: app/settings.py builds them from the environment)."""

from __future__ import annotations

from dataclasses import dataclass

from .policies import DEFAULT_POLICY


@dataclass
class OffloadOptions:
    policy: str = DEFAULT_POLICY  # one of policies.POLICIES, or policies.AUTO_POLICY
    prefetch: bool = False  # guess the next layer's experts during decode (see module.py)
    io_threads: int = 4
    bypass_page_cache: bool = True  # expert bytes are not held a second time by the OS
