"""A reply's figures (``GenerationStats``) and their one JSON form. Imports nothing heavy: the
chat app and the HTTP client read the server's figures with it without MLX.

The JSON form is what the server sends in its extra `mixchat` field and what `ask --json` and
the chat's store are built from: the field names, except ``prompt_tokens``, sent as
``prompt_tokens_prefilled`` (the prompt tokens this turn prefilled, not OpenAI's usage count).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

WIRE_NAMES = {"prompt_tokens": "prompt_tokens_prefilled"}  # field -> JSON key, where they differ


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens prefilled for this turn (only those the cache lacked)
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    context_tokens: int | None = None  # tokens the KV cache holds after this turn (None: unknown)
    finish_reason: str = ""  # "stop" | "length" | "cancelled"
    # With a memory budget (experts streamed from disk; None otherwise), over the decode steps:
    expert_hit_rate: float | None = None  # share of routed experts found in the expert cache
    bytes_read_per_token: float | None = None  # expert bytes read from disk per decoded token
    prompt_bytes_read_per_token: float | None = None  # the same, per prompt token
    load_seconds: float | None = None  # time decoding waited for expert reads
    compute_seconds: float | None = None  # the rest of the decode time

    def to_json(self) -> dict[str, Any]:
        """The figures as JSON: every field, ``prompt_tokens`` as ``prompt_tokens_prefilled``."""
        return {WIRE_NAMES.get(name, name): value for name, value in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GenerationStats:
        """Back from ``to_json()`` (or a dict of the field names, as the chat's store saves
        them); missing or null figures keep their defaults, other keys are ignored."""
        values = {}
        for field in fields(cls):
            value = data.get(WIRE_NAMES.get(field.name, field.name), data.get(field.name))
            if value is not None:
                values[field.name] = value
        return cls(**values)

    @classmethod
    def of(cls, stats: Any) -> GenerationStats | None:
        """``stats`` itself, or read from a saved dict (``from_json``); None stays None."""
        if stats is None or isinstance(stats, cls):
            return stats
        return cls.from_json(stats if isinstance(stats, Mapping) else vars(stats))
