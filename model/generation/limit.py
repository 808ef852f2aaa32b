"""How many requests an engine may decode together, and why not more. MLX-free: the CLI
shows DEFAULT_BATCH in `mixchat serve --help` before MLX is imported."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..generate import Engine

# Requests decoded together by default: 8 for a dense model, 1 for an MoE model (batched, its
# rows pick different experts: slower on the CPU; BENCHMARKS.md, "The server", at 1, 4, 8).
DEFAULT_BATCH = 8


def batch_limit(engine: Engine, wanted: int | None) -> tuple[int, str]:
    """How many requests `engine` may decode together (at most `wanted`; None: the default for
    the model), and why not more."""
    if wanted is None:
        if engine.model.args.is_moe:
            return 1, ("the default for an MoE model (measured slower batched on this backend: "
                       "BENCHMARKS.md); --batch N batches it")  # fmt: skip
        wanted = DEFAULT_BATCH
    if wanted <= 1:
        return 1, ""
    if engine.offload is not None:
        return 1, "experts are streamed from disk under the memory budget"
    if engine.peers is not None:
        return 1, "the model runs on several ranks"
    if engine.kv_bits:
        return 1, "the KV cache is quantized (--kv-bits)"
    if engine.model.args.sliding_window:
        return 1, "the model uses a sliding-window KV cache"
    return wanted, ""
