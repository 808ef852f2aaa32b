"""mixchat's model package: the MLX Mixtral model, checkpoint loading, tokenizers, generation.

Public API:
    model, tokenizer = load(path_or_repo_id)      # None: the embedded default model
    logits = model(ids)                           # ids: int mx.array [B, T] -> [B, T, vocab]
    tokenizer.encode(text) / .decode(ids) / .encode_chat(messages)
    Engine.load(...).stream(messages, settings)   # streaming chat generation
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, MixchatError, UnsupportedModelError

if TYPE_CHECKING:
    from .generate import Chunk, Engine, GenerationSettings, GenerationStats
    from .mixtral import Model

_LAZY = {"Engine": "generate", "GenerationSettings": "generation_settings",
         "GenerationStats": "generate", "Chunk": "generate", "Model": "mixtral"}


def __getattr__(name: str):
    """Import MLX and mlx-lm only when needed: `mixchat --help` and usage errors stay fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(
    path_or_repo_id: str | Path | None = None,
    *,
    dtype: str | None = None,
    lazy: bool = False,
    memory_budget: int | str | None = None,
    max_context: int | None = None,
    kv_bits: int | None = None,
    streams: int | None = None,
):
    """Load a model and its tokenizer: a HF or MLX-quantized directory, a GGUF file, or a repo
    id already in the local Hugging Face cache (never downloads). Returns (model, tokenizer).

    `memory_budget`: None chooses (loads whole when it fits in what is available, else streams
    experts under the automatic budget: `model.memory.notice` says so); "auto", "none" (load
    whole regardless) or bytes. `streams`: CPU streams to split matrix products across (None:
    one per core, at most 2)."""
    from . import registry, weights
    from .tokenizer import load_tokenizer

    path = registry.resolve(None if path_or_repo_id is None else str(path_or_repo_id))
    checkpoint = weights.locate(path)
    tokenizer = load_tokenizer(
        checkpoint.gguf_metadata if checkpoint.format == "gguf" else checkpoint.path
    )
    memory = weights.plan_memory(checkpoint, dtype, memory_budget, max_context, kv_bits)
    model = weights.build_model(checkpoint, dtype=dtype, lazy=lazy, memory=memory, streams=streams)
    return model, tokenizer


__all__ = [
    "load",
    "Model",
    "Engine",
    "GenerationSettings",
    "GenerationStats",
    "Chunk",
    "MixchatError",
    "CheckpointError",
    "UnsupportedModelError",
]
