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


def over_context(engine: Engine, prompt_tokens: int) -> str:
    """The one line for a prompt the engine's context cannot take, naming whose limit it is:
    the model's, or the shorter one this run set (--max-context, or what the budget leaves)."""
    context, model_context = engine.context_length, engine.model.args.context_length
    if context >= model_context:
        limit = f"the model's {context:,}-token context"
    else:
        limit = (f"the {context:,}-token context of this run (set by --max-context or the "
                 f"memory budget; the model's is {model_context:,})")  # fmt: skip
    return f"the prompt is {prompt_tokens:,} tokens, over {limit}"
