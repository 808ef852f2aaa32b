"""How a model is loaded: the options app/settings.py reads once and passes down to
`model.load` and `Engine.load` (no MLX import: the CLI builds them before anything heavy)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .offload import OffloadOptions


@dataclass(frozen=True)
class LoadOptions:
    dtype: str | None = None  # "float32", "float16", "bfloat16"; None: float32 on a CPU
    # bytes, a size ("12GB"), "auto", "none" (everything in memory, even if it does not fit) or
    # None: whole when the model fits in the memory available now, else the automatic budget
    memory_budget: int | str | None = None
    max_context: int | None = None  # tokens the KV cache is planned for; None: what fits
    kv_bits: int | None = None  # 8 or 4: a quantized KV cache
    streams: int | None = None  # CPU streams matrix products are split across; None: per core
    offload: OffloadOptions | None = None  # expert streaming's knobs; None: their defaults
    # a LoRA adapter directory (mixchat tune's or mlx_lm.lora's) applied once loaded; None: none
    adapter_path: str | None = None

    def but(self, **changes) -> LoadOptions:
        """These options with `changes` (LoadOptions' field names; a TypeError for others)."""
        return replace(self, **changes) if changes else self
