"""The parts of mlx-lm mixchat runs on (KV caches, samplers, attention, RoPE, switch layers),
imported without mlx-lm's package `__init__`.

`import mlx_lm.models.cache` first runs `mlx_lm/__init__.py`, which imports mlx-lm's whole
command line (convert, generate, load) and with it transformers and torch: ~2 s of every
start-up here, for modules the inference path never calls. These parts import only MLX, so
they are loaded under a stand-in `mlx_lm` package that exists only while they import; the real
package, imported later by whoever needs it (mlx_lm.load in tests), shares the same submodules.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

PARTS = ("models.base", "models.cache", "models.rope_utils", "models.switch_layers", "sample_utils")


def _import_parts(parts: tuple[str, ...] = PARTS) -> None:
    if "mlx_lm" in sys.modules:  # the real package is already there: nothing to save
        for part in parts:
            importlib.import_module(f"mlx_lm.{part}")
        return
    spec = importlib.util.find_spec("mlx_lm")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        return  # the imports below raise the ordinary ModuleNotFoundError
    stand_in = types.ModuleType("mlx_lm", "stand-in package while mixchat imports mlx-lm parts")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules["mlx_lm"] = stand_in
    try:
        for part in parts:
            importlib.import_module(f"mlx_lm.{part}")
    finally:
        if sys.modules.get("mlx_lm") is stand_in:
            del sys.modules["mlx_lm"]


_import_parts()


def model_module(model_type: str) -> types.ModuleType:
    """mlx-lm's definition of `model_type` (`mlx_lm.models.qwen3_moe`: its ModelArgs, Model and
    sanitize), imported the same way, without mlx-lm's package `__init__`."""
    _import_parts((f"models.{model_type}",))
    return sys.modules[f"mlx_lm.models.{model_type}"]


from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention  # noqa: E402
from mlx_lm.models.cache import (  # noqa: E402
    BatchKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.models.rope_utils import initialize_rope  # noqa: E402
from mlx_lm.models.switch_layers import SwitchLinear  # noqa: E402
from mlx_lm.sample_utils import apply_min_p, apply_top_p, make_sampler  # noqa: E402

__all__ = [
    "BatchKVCache",
    "KVCache",
    "QuantizedKVCache",
    "RotatingKVCache",
    "SwitchLinear",
    "apply_min_p",
    "apply_top_p",
    "can_trim_prompt_cache",
    "create_attention_mask",
    "initialize_rope",
    "make_sampler",
    "model_module",
    "scaled_dot_product_attention",
    "trim_prompt_cache",
]
