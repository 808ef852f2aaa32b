"""LoRA adapters with mlx-lm's own layers and files, so adapters move between the two tools.

`apply_lora` wraps, in the last `num_layers` layers, every linear module (attention, the
router, the dense MLP) in mlx-lm's LoRALinear and every stacked expert projection in its
LoRASwitchLinear (one A/B pair per expert: lora_a [E, r, in], lora_b [E, out, r]), exactly as
`mlx_lm.tuner.utils.linear_to_lora_layers` does (its loop, mirrored below without its
imports; mlx-lm's LoRA layers themselves are what runs). mixtral.Experts computes
through the wrapped modules when they are there. The base weights (float, MLX 4-bit or
GGUF-converted) stay frozen: only lora_a and lora_b train (QLoRA on quantized weights).

Files, as `mlx_lm.lora` writes them: adapters.safetensors (the trainable parameters under
their module paths, "model.layers.N.self_attn.q_proj.lora_a") and adapter_config.json
(fine_tune_type, num_layers, lora_parameters {rank, scale, dropout, keys}).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import MixchatError
from ..mlx_lm_parts import SwitchLinear

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
DEFAULT_SCALE = 20.0  # mlx-lm's lora_parameters defaults
DEFAULT_DROPOUT = 0.0


def lora_keys(model: nn.Module) -> list[str]:
    """Paths, inside a layer, of every module LoRA applies to (linear and switch-linear)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    kinds = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
    return sorted({path for path, module in model.layers[0].named_modules()
                   if isinstance(module, kinds)})  # fmt: skip


def lora_config(model: nn.Module, num_layers: int, rank: int, scale: float = DEFAULT_SCALE,
                dropout: float = DEFAULT_DROPOUT) -> dict:  # fmt: skip
    """adapter_config.json's fields for LoRA on the last `num_layers` layers (-1: all)."""
    layers = len(model.layers)
    if num_layers == 0 or num_layers < -1 or num_layers > layers:
        raise MixchatError(f"--num-layers must be -1 (all) or 1 to {layers}, not {num_layers}")
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": dropout,
            "keys": lora_keys(model),
        },  # fmt: skip
    }


def apply_lora(model: nn.Module, config: dict) -> None:
    """Freeze the model and wrap the modules `config` names in mlx-lm's LoRA layers (their
    lora_a drawn from MLX's random generator: seed it first for a reproducible start)."""
    check_resident(model)
    if config.get("fine_tune_type", "lora") != "lora":
        raise MixchatError(f"adapter type {config.get('fine_tune_type')!r} is not supported")
    model.freeze()
    parameters = dict(config["lora_parameters"])
    parameters.setdefault("dropout", DEFAULT_DROPOUT)
    linear_to_lora_layers(model, config["num_layers"], parameters)


def linear_to_lora_layers(model: nn.Module, num_layers: int, config: dict) -> None:
    """mlx_lm.tuner.utils.linear_to_lora_layers for LoRA (not DoRA), with its layers and in its
    order (the same random draws): importing mlx_lm.tuner.utils imports transformers and torch,
    ~0.3 GB of a training process's memory that mlx-lm's LoRA layers do not need."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    from ..mlx_lm_parts import tuner_lora

    lora = tuner_lora()
    if "scale" not in config:
        raise MixchatError("the adapter's lora_parameters have no 'scale'")

    def to_lora(layer: nn.Module) -> nn.Module:
        if hasattr(layer, "to_lora"):
            return layer.to_lora(r=config["rank"], scale=config["scale"],
                                 dropout=config["dropout"])  # fmt: skip
        if isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            kind = lora.LoRALinear
        elif isinstance(layer, (SwitchLinear, QuantizedSwitchLinear)):
            kind = lora.LoRASwitchLinear
        elif isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)):
            kind = lora.LoRAEmbedding
        else:
            raise ValueError(f"Can't convert layer of type {type(layer).__name__} to LoRA")
        return kind.from_base(layer, r=config["rank"], scale=config["scale"],
                              dropout=config["dropout"])  # fmt: skip

    keys = config.get("keys")
    if keys is None:
        kinds = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear,
                 nn.Embedding, nn.QuantizedEmbedding)  # fmt: skip
        keys = {path for layer in model.layers for path, m in layer.named_modules()
                if hasattr(m, "to_lora") or isinstance(m, kinds)}  # fmt: skip
    for layer in model.layers[-max(num_layers, 0) :]:
        if wrapped := [(k, to_lora(m)) for k, m in layer.named_modules() if k in keys]:
            layer.update_modules(tree_unflatten(wrapped))
    if wrapped := [(k, to_lora(m)) for k, m in model.named_modules() if k in keys]:
        model.update_modules(tree_unflatten(wrapped))


def check_resident(model: nn.Module) -> None:
    """LoRA needs every weight in this process: not streamed experts, not split over ranks."""
    from ..offload.wiring import _experts_of

    memory = getattr(model, "memory", None)
    found = [_experts_of(layer) for layer in model.layers]
    streamed = all(  # prepared for training under the budget (model/tune/streamed.py)
        "gate_proj" in f[0][f[1]] for f in found if f is not None
    )  # fmt: skip
    if memory is not None and memory.offload and not streamed:
        raise MixchatError("adapters need the whole model in memory (its experts stream from "
                           "disk under this budget): use --memory-budget none")  # fmt: skip
    if (
        getattr(model, "stage", None) is not None
        or getattr(model, "expert_shard", None) is not None  # a family split by experts
        or any(getattr(getattr(layer, "block_sparse_moe", None), "shard", None) is not None
               for layer in model.layers)  # fmt: skip
    ):
        raise MixchatError("adapters are not supported on a model split over several machines")


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The trainable (LoRA) parameters under their mlx-lm names."""
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter(model: nn.Module, path: Path, config: dict) -> None:
    """Write adapters.safetensors and adapter_config.json into `path`, each atomically."""
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / ADAPTER_FILE, lambda tmp: mx.save_safetensors(tmp, adapter_weights(model)))
    text = json.dumps(dict(sorted(config.items())), indent=4)
    write_atomic(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))


def write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """write(tmp_name) then rename onto `path`: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(str(tmp))
    os.replace(tmp, path)


def read_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise MixchatError(f"no adapter at {path} (it has no {CONFIG_FILE})") from None
    except (OSError, ValueError) as e:
        raise MixchatError(f"{path / CONFIG_FILE}: {e}") from None
    if (
        not isinstance(config, dict)
        or "num_layers" not in config
        or (config.get("fine_tune_type", "lora") == "lora" and "lora_parameters" not in config)
    ):
        raise MixchatError(f"{path / CONFIG_FILE} is not an mlx-lm adapter config")
    return config


def load_adapter(model: nn.Module, path: str | Path) -> dict:
    """Apply the adapter in `path` (mixchat's or mlx-lm's) to a loaded model; returns its
    config. Raises MixchatError (one line) when it does not fit the model."""
    path = Path(path)
    config = read_config(path)
    if config["num_layers"] > len(model.layers):
        raise MixchatError(f"the adapter at {path} is for a model with more layers")
    try:
        apply_lora(model, config)
        weights = mx.load(str(path / ADAPTER_FILE))
    except (KeyError, ValueError, OSError, RuntimeError) as e:
        raise MixchatError(f"the adapter at {path} cannot be applied: {e}") from None
    expected = {name: value.shape for name, value in adapter_weights(model).items()}
    wrong = [n for n, w in weights.items() if expected.get(n) != w.shape]
    if wrong or len(weights) != len(expected):
        detail = wrong[0] if wrong else f"{len(weights)} tensors, {len(expected)} expected"
        raise MixchatError(f"the adapter at {path} does not fit this model ({detail})")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return config


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The LoRA wrappers in `model` (mlx-lm's LoRALinear / LoRASwitchLinear), by path."""
    return [(name, m) for name, m in model.named_modules() if "lora_a" in m and "linear" in m]


def remove_adapter(model: nn.Module) -> None:
    """Undo load_adapter/apply_lora: every LoRA wrapper gives way to its base module."""
    if wrapped := lora_modules(model):
        model.update_modules(tree_unflatten([(name, m.linear) for name, m in wrapped]))


def set_adapter(model: nn.Module, path: str | Path | None) -> dict | None:
    """Swap the model's adapter for the one in `path` (None: none); returns its config. The
    old adapter is gone even if the new one fails (a MixchatError)."""
    remove_adapter(model)
    return None if path is None else load_adapter(model, path)


def fuse_adapter(model: nn.Module, dequantize: bool = False) -> None:
    """Merge every LoRA wrapper into its base weights (mlx-lm's `fuse`): quantized bases are
    re-quantized with their own bits and group size, unless `dequantize` (then float)."""
    if fused := [(name, m.fuse(dequantize=dequantize)) for name, m in lora_modules(model)]:
        model.update_modules(tree_unflatten(fused))
