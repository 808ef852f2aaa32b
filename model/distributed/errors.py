"""The errors of several ranks."""

from __future__ import annotations

from ..errors import MixchatError


class DistributedError(MixchatError):
    pass


class RankMismatch(DistributedError):
    """The ranks loaded different models or settings (every rank finds out at once)."""
