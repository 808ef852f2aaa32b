"""What a reply is generated with, and its checks. Imports nothing heavy: the CLI validates
its arguments with it before MLX is imported."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MixchatError

SEED_LIMIT = 2**64  # MLX seeds are unsigned 64-bit integers


@dataclass
class GenerationSettings:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def validate(self) -> None:
        """Raise MixchatError (one line) for a value the sampler cannot use."""
        if self.max_tokens < 1:
            raise MixchatError(f"max tokens must be at least 1, not {self.max_tokens}")
        if not self.temperature >= 0:
            raise MixchatError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MixchatError(f"top-p must be in (0, 1], not {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise MixchatError(f"min-p must be in [0, 1), not {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise MixchatError(f"seed must be a whole number from 0 to 2**64 - 1, not {self.seed}")
