"""The memory limits of an Apple GPU (Metal), set once a model is loaded; nothing on a CPU.

- The wired limit, as mlx-lm sets it (mlx_lm.generate.wired_limit): MLX's
  `max_recommended_working_set_size`, so that the model's buffers stay wired instead of being
  paged (peers measured slowdowns of up to 88x without it), with mlx-lm's warning when what the
  model holds is more than 90% of that size.
- Under a memory budget, MLX's buffer cache bounded by the memory plan. MLX's Metal allocator
  keeps freed buffers (an evicted expert, a prompt's activations) in its cache for reuse; left
  unbounded they stay resident past the budget. What the plan keeps in use for good is the
  resident weights, the expert cache and the KV cache, and the expert cache shrinks as the KV
  cache grows (`OffloadRuntime.set_kv_bytes`), so the rest of the budget (the prefill
  activations and read buffers of model/memory_plan.py's reserve) is what freed buffers may
  hold: the cache limit.

Both are process-wide. They are restored, as mlx-lm restores the wired limit when a generator
closes, once the last model that set them is freed (the server's unload, a closed engine).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_reduce

from .sizes import format_bytes

CLOSE_SHARE = 0.9  # mlx-lm warns when the model needs more than this share of the working set


@dataclass(frozen=True)
class Metal:
    """The MLX functions this module calls (tests give fakes)."""

    device_info: Callable[[], dict]
    set_wired_limit: Callable[[int], int]
    set_cache_limit: Callable[[int], int]
    synchronize: Callable[[], None]


@dataclass(frozen=True)
class DeviceLimits:
    """What was set for one model (`model.device_limits`)."""

    working_set: int  # the GPU's max_recommended_working_set_size
    wired_limit: int  # set to working_set, as mlx-lm does
    cache_limit: int | None  # MLX's buffer cache bound (None: left as it was, no budget)
    model_bytes: int  # what the model holds in memory: its budget, or everything
    warning: str = ""  # one line when model_bytes is close to the working set, else ""


def metal_device() -> Metal | None:
    """MLX's Metal functions when MLX runs on an Apple GPU that reports its recommended
    working set (as mlx-lm checks), else None (the CPU backend: nothing is set)."""
    if not mx.metal.is_available():
        return None
    return Metal(mx.device_info, mx.set_wired_limit, mx.set_cache_limit, mx.synchronize)


def plan_limits(working_set: int, memory, model_bytes: int | None = None,
                name: str = "the model") -> DeviceLimits:  # fmt: skip
    """The limits for a model loaded with `memory` (a memory_plan.MemoryDecision; None: only
    `model_bytes`, its arrays' bytes, are known) on a GPU whose recommended working set is
    `working_set` bytes."""
    cache_limit = None
    if memory is not None:
        plan, budget = memory.plan, memory.budget
        everything = plan.full_bytes
        if budget is not None:
            experts = plan.cache_bytes(budget) if memory.offload else plan.total_expert_bytes
            held = plan.resident_bytes + experts + plan.kv_bytes  # in use for good
            cache_limit = max(0, budget - held)
            everything = min(everything, budget)
        model_bytes = everything
    model_bytes = model_bytes or 0
    warning = ""
    if model_bytes > CLOSE_SHARE * working_set:
        warning = (
            f"warning: {name} needs {format_bytes(model_bytes)}, close to the "
            f"{format_bytes(working_set)} this GPU's memory can hold wired: expect it to be slow"
        )
        fits, arg = _size_down(CLOSE_SHARE * working_set)
        if memory is not None and memory.plan.offloadable and fits >= memory.plan.minimum_budget:
            warning += f" (--memory-budget {arg} streams experts within it)"
    return DeviceLimits(working_set, working_set, cache_limit, model_bytes, warning)


def _size_down(n: float) -> tuple[int, str]:
    """A size as a command-line argument rounded down to one decimal (a ceiling not to pass):
    (its bytes, the argument)."""
    unit, scale = ("GB", 10**9) if n >= 10**9 else ("MB", 10**6)
    tenths = int(n * 10 // scale)
    return tenths * scale // 10, f"{tenths / 10:g}{unit}"


# The limits before the first model set them, restored when the last one is freed.
_lock = threading.RLock()  # reentrant: a finalizer may run during gc while it is held
_saved: dict[str, int] = {}
_holders = 0


def limit_device(model, memory=None, *, name: str = "the model",
                 device: Metal | None = None) -> DeviceLimits | None:  # fmt: skip
    """On a Metal GPU (`device`: None finds it), set the wired limit and, under a budget, the
    buffer cache limit for `model` loaded with `memory`; keep them on `model.device_limits`
    and add the warning, if any, to `memory.notice` (one line). Restored once the last model
    that set them is freed. None, calling nothing, on a CPU."""
    global _holders
    device = device or metal_device()
    if device is None:
        return None
    working_set = device.device_info().get("max_recommended_working_set_size")
    if not working_set:
        return None
    model_bytes = None
    if memory is None:
        model_bytes = tree_reduce(
            lambda acc, x: acc + x.nbytes if isinstance(x, mx.array) else acc, model, 0
        )
    limits = plan_limits(int(working_set), memory, model_bytes, name)
    with _lock:
        _holders += 1  # first: a model freed meanwhile (gc, this thread) restores nothing
        old = device.set_wired_limit(limits.wired_limit)
        _saved.setdefault("wired", old)
        if limits.cache_limit is not None:
            old = device.set_cache_limit(limits.cache_limit)
            _saved.setdefault("cache", old)
    if limits.warning and memory is not None:
        memory.notice = "; ".join(n for n in (memory.notice, limits.warning) if n)
    model.device_limits = limits
    weakref.finalize(model, _release, device).atexit = False
    return limits


def _release(device: Metal) -> None:
    """One model that set limits is gone: the last one restores what was there before."""
    global _holders
    with _lock:
        _holders -= 1
        if _holders > 0:
            return
        device.synchronize()  # as mlx-lm does before changing the wired limit back
        if "wired" in _saved:
            device.set_wired_limit(_saved.pop("wired"))
        if "cache" in _saved:
            device.set_cache_limit(_saved.pop("cache"))
