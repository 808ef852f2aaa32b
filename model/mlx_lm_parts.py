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
    # mlx_lm.tuner's __init__ imports its trainer and datasets, and with them transformers
    # and torch (~0.3 GB of a training process's memory): a stand-in too, for its LoRA layers.
    stand_ins = {"mlx_lm": list(spec.submodule_search_locations)}
    if any(part.startswith("tuner.") for part in parts) and "mlx_lm.tuner" not in sys.modules:
        stand_ins["mlx_lm.tuner"] = [f"{p}/tuner" for p in spec.submodule_search_locations]
    made = {}
    for name, path in stand_ins.items():
        made[name] = types.ModuleType(name, "stand-in package while mixchat imports mlx-lm parts")
        made[name].__path__ = path
        sys.modules[name] = made[name]
    try:
        for part in parts:
            importlib.import_module(f"mlx_lm.{part}")
    finally:
        for name, stand_in in made.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]


_import_parts()


def tuner_lora() -> types.ModuleType:
    """mlx_lm.tuner.lora (LoRALinear, LoRASwitchLinear, LoRAEmbedding), imported without
    mlx-lm's package `__init__` and without mlx_lm.tuner's (which import transformers)."""
    _import_parts(("tuner.lora",))
    return sys.modules["mlx_lm.tuner.lora"]


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
