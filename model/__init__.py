"""mixchat's model package: the MLX Mixtral model, checkpoint loading, tokenizers, generation.

Public API:
    model, tokenizer = load(path_or_repo_id)      # None: the embedded default model
    logits = model(ids)                           # ids: int mx.array [B, T] -> [B, T, vocab]
    tokenizer.encode(text) / .decode(ids) / .encode_chat(messages)
    Engine.load(...).stream(messages, settings)   # streaming chat generation
    LoadOptions(dtype=, memory_budget=, max_context=, kv_bits=, streams=, offload=)

Only re-exports, each imported when first used: MLX and mlx-lm load only when needed
(`mixchat --help` and usage errors stay fast), and no submodule imports this file's names back.
"""

from __future__ import annotations

from .errors import CheckpointError, MixchatError, UnsupportedModelError

_LAZY = {"Engine": "generate", "GenerationSettings": "generation_settings",
         "GenerationStats": "generate", "Chunk": "generate", "Model": "mixtral",
         "load": "loader", "LoadOptions": "load_options"}  # fmt: skip


def __getattr__(name: str):
    """The re-exported name, its module imported now."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "load",
    "LoadOptions",
    "Model",
    "Engine",
    "GenerationSettings",
    "GenerationStats",
    "Chunk",
    "MixchatError",
    "CheckpointError",
    "UnsupportedModelError",
]
