"""Find and read checkpoints (safetensors shards, MLX quantized directories, GGUF), map names,
and check every tensor's presence and shape before anything runs. Never unpickles."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelArgs
from .errors import CheckpointError, UnsupportedModelError
from .gguf import (
    GGUFFile,
    GGUFTensor,
    check_supported,
    converted_specs,
    family_config,
    load_tensor,
    read_gguf,
)
from .gguf_gpt_oss import MXFP4, gpt_oss_config, load_mxfp4, mxfp4_specs
from .mixtral import Model, use_parallel_streams
from .names import (
    GGUF_CONFIG_TENSORS,
    GGUF_ROW_VECTORS,
    family_gguf_to_mlx,
    gguf_to_mlx,
    is_expert_tensor,
)
from .safetensors_header import (
    PICKLE_SUFFIXES,
    TensorSpec,
    dominant_dtype,
    read_safetensors_header,
    safetensors_shards,
)

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
HALF_DTYPES = {"F16": mx.float16, "BF16": mx.bfloat16, "float16": mx.float16,
               "bfloat16": mx.bfloat16}


@dataclass
class Checkpoint:
    """A checkpoint located on disk and described, but not yet read."""

    path: Path  # directory, or the .gguf file
    format: str  # "hf" (safetensors, maybe MLX-quantized) | "gguf"
    args: ModelArgs
    files: list[Path]
    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    gguf_metadata: dict[str, Any] | None = None
    gguf_file: GGUFFile | None = None  # the GGUF's header: tensor table with byte ranges
    # HF-style name -> (GGUF tensor, part of its conversion: "weight" | "scales" | "biases")
    gguf_names: dict[str, tuple[GGUFTensor, str]] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def source_dtype(self) -> str:
        """The dtype most floating tensors are stored in ("BF16", "F16", "F32")."""
        return dominant_dtype(self.tensors.values()) or "F32"


def locate(path: Path) -> Checkpoint:
    """Describe the checkpoint at `path` (a directory or a .gguf file) without reading weights."""
    if not path.exists():
        raise CheckpointError(f"no model at {path}")
    if path.is_file():
        if path.suffix == ".gguf":
            return _locate_gguf(path)
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path.name} is a pickled checkpoint; mixchat never unpickles weights")
        raise UnsupportedModelError(f"{path.name}: expected a model directory or a .gguf file")
    config_file = path / "config.json"
    safetensors = safetensors_shards(path)
    if not safetensors:
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _locate_gguf(ggufs[0])
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise CheckpointError(
                f"{path} has only pickled weights (.bin/.pth); mixchat never unpickles them: "
                "use a safetensors release of the model"
            )
        raise CheckpointError(f"{path} has no .safetensors or .gguf weights")
    if not config_file.exists():
        if (path / "params.json").exists():
            raise UnsupportedModelError(
                f"{path} is in Mistral's consolidated format: convert it with `mixchat quantize`"
            )
        raise CheckpointError(f"{path} has weights but no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot parse {config_file}: {e}") from None
    args = ModelArgs.from_hf_config(config)
    tensors: dict[str, TensorSpec] = {}
    for file in safetensors:
        tensors.update(read_safetensors_header(file))
    return Checkpoint(path, "hf", args, safetensors, tensors)


def _locate_gguf(path: Path) -> Checkpoint:
    """The GGUF's metadata and tensor table (gguf-py); tensors are converted when read."""
    gguf_file = read_gguf(path)
    metadata = gguf_file.metadata
    if not gguf_file.tensors or "general.architecture" not in metadata:
        raise CheckpointError(f"{path.name} is truncated or not a GGUF model file")
    for tensor in gguf_file.tensors.values():
        if tensor.ggml_type != MXFP4:  # gpt-oss's experts: model/gguf_gpt_oss.py
            check_supported(tensor)
    config = family_config(metadata, set(gguf_file.tensors), gguf_file)  # llama.cpp's MoE families
    if config is not None:
        arch = metadata["general.architecture"]
        if arch == "gpt-oss":
            config = gpt_oss_config(config, metadata, gguf_file)
        args = ModelArgs.from_hf_config(config)
        to_mlx = lambda name: family_gguf_to_mlx(name, arch)  # noqa: E731
    else:
        args, to_mlx = ModelArgs.from_gguf_metadata(metadata, set(gguf_file.tensors)), gguf_to_mlx
    tensors: dict[str, TensorSpec] = {}
    names: dict[str, tuple[GGUFTensor, str]] = {}
    for tensor in gguf_file.tensors.values():
        if config is not None and tensor.name in GGUF_CONFIG_TENSORS:  # read into the config
            continue
        hf_name = to_mlx(tensor.name)
        base = hf_name.removesuffix(".weight")
        specs = mxfp4_specs(tensor) if tensor.ggml_type == MXFP4 else converted_specs(tensor)
        for part, (shape, dtype, nbytes) in specs.items():
            name = hf_name if part == "weight" else f"{base}.{part}"
            if base.endswith(GGUF_ROW_VECTORS) and len(shape) == 1:  # llama.cpp's [hidden]
                shape = (1, *shape)
            tensors[name] = TensorSpec(shape, dtype, nbytes, tensor.offset)
            names[name] = (tensor, part)
    return Checkpoint(path, "gguf", args, [path], tensors, metadata, gguf_file, names)


def compute_dtype(checkpoint: Checkpoint, requested: str | None = None) -> mx.Dtype:
    """float32 on MLX's CPU backend (its half-precision kernels are ~40x slower and gather_mm
    rejects bf16); the checkpoint's half precision on a GPU. `requested` (--dtype) wins."""
    if requested:
        try:
            return {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[requested]
        except KeyError:
            raise CheckpointError(
                f"unknown dtype '{requested}' (choose float32, float16 or bfloat16)"
            ) from None
    if mx.default_device().type == mx.DeviceType.cpu:
        return mx.float32
    return HALF_DTYPES.get(checkpoint.source_dtype, mx.float16)


def read_weights(checkpoint: Checkpoint, skip_experts: bool = False) -> dict[str, mx.array]:
    """All tensors, lazily (nothing is read from disk until evaluated), under HF-style names.
    `skip_experts`: stacked expert tensors are never read (GGUF: unevaluated placeholders of
    their converted shape), for experts streamed under a budget."""
    if checkpoint.gguf_file is not None:
        return _read_gguf_weights(checkpoint, skip_experts)
    weights: dict[str, mx.array] = {}
    for file in checkpoint.files:
        try:
            arrays = mx.load(str(file))
        except Exception as e:
            raise CheckpointError(f"cannot read {file.name}: {e}") from None
        weights.update(arrays)
    return weights


def _read_gguf_weights(checkpoint: Checkpoint, skip_experts: bool = False) -> dict[str, mx.array]:
    """Each GGUF tensor converted to MLX (affine groups for quantized types), one at a time."""
    weights: dict[str, mx.array] = {}
    for name, (tensor, part) in checkpoint.gguf_names.items():
        if skip_experts and is_expert_tensor(name):  # read by model/offload.py on demand
            spec = checkpoint.tensors[name]
            dtype = {"U32": mx.uint32, "U8": mx.uint8, "F32": mx.float32,
                     "F16": mx.float16}.get(spec.dtype)  # fmt: skip
            weights[name] = mx.zeros(spec.shape, dtype or mx.bfloat16)  # never evaluated
            continue
        if part != "weight":
            continue
        base = name.removesuffix(".weight")
        read = load_mxfp4 if tensor.ggml_type == MXFP4 else load_tensor
        for part, array in read(checkpoint.gguf_file, tensor).items():
            key = name if part == "weight" else f"{base}.{part}"
            array = array.reshape(checkpoint.tensors[key].shape)  # a row vector as [1, n]
            if array.dtype == np.uint16:  # BF16 bit patterns
                weights[key] = mx.array(array).view(mx.bfloat16)
            else:
                weights[key] = mx.array(array)
    return weights


def _quantization_predicate(args: ModelArgs, weights: dict[str, mx.array]):
    """Which modules are quantized, with which bits/group size: the config's per-module
    overrides first (as mlx_lm writes them), else inferred from the stored tensor shapes."""
    config = args.quantization or {}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        override = config.get(path)
        if isinstance(override, dict):
            return override
        in_dims = module.weight.shape[-1]
        packed, scales = weights[f"{path}.weight"], weights[f"{path}.scales"]
        bits = packed.shape[-1] * 32 // in_dims
        group_size = in_dims // max(scales.shape[-1], 1)
        if bits not in (2, 3, 4, 5, 6, 8) or group_size * scales.shape[-1] != in_dims:
            raise CheckpointError(
                f"tensor {path}.weight has shape {tuple(packed.shape)}, which is no quantization "
                f"of a [*, {in_dims}] weight"
            )
        return {"group_size": group_size, "bits": bits, "mode": config.get("mode", "affine")}

    return predicate


def stream_count(requested: int | None = None) -> int:
    """Streams to split matrix products across: `requested` (MIXCHAT_STREAMS, read by
    app/settings.py), else one per core (at most 2) on MLX's CPU backend, one on a GPU (which
    parallelises within each kernel)."""
    if requested is not None:
        return max(1, requested)
    if mx.default_device().type == mx.DeviceType.cpu:
        return min(2, os.cpu_count() or 1)
    return 1


def plan_memory(checkpoint: Checkpoint, dtype: str | None = None,
                memory_budget: int | str | None = None, max_context: int | None = None,
                kv_bits: int | None = None, *, split=None):  # fmt: skip
    """How `checkpoint` will be loaded (`memory_plan.decide`): whole, or with experts streamed
    under a budget; None as `memory_budget` chooses by what this machine has available.
    `split` (model.distributed.RankSplit): the budget applies to this rank's share."""
    from .memory_plan import decide

    if split is not None and checkpoint.args.is_family and split.world.mode == "pipeline":
        raise UnsupportedModelError(
            f"{checkpoint.args.model_type} models split over several hosts by experts only "
            "(MIXCHAT_PARALLEL=expert, the default)"
        )
    if split is not None:
        return split.plan_memory(checkpoint, compute_dtype(checkpoint, dtype).size,
                                 memory_budget, max_context, kv_bits)  # fmt: skip
    return decide(checkpoint, compute_dtype(checkpoint, dtype).size, memory_budget,
                  max_context, kv_bits)  # fmt: skip


def build_model(
    checkpoint: Checkpoint,
    dtype: str | None = None,
    lazy: bool = False,
    memory=None,
    streams: int | None = None,
    *,
    split=None,
    offload_options=None,
) -> Model:
    """Instantiate the model and load the checkpoint into it, after checking every tensor.

    `memory` (a `memory_plan.MemoryDecision`, from `plan_memory`): when it streams experts, the
    experts are left unread and read on demand into a cache within the budget
    (model/offload.py, tuned by `offload_options`: an OffloadOptions, None for its defaults). None
    loads everything. `streams`: CPU streams to split matrix products across (None: one per
    core, at most 2). `split` (model.distributed.RankSplit): only this rank's part is read."""
    use_parallel_streams(stream_count(streams))
    args = checkpoint.args
    offload = memory is not None and memory.offload
    if args.is_family:  # mlx-lm's definition behind the engine's contract
        from .families import FamilyModel

        model = FamilyModel(args)
    else:
        model = Model(args)
    weights = read_weights(checkpoint, skip_experts=offload)
    if split is not None:  # this rank's share of the experts, or its block of layers, only
        kv_bits = memory.plan.kv_bits if memory is not None else None
        weights = split.take(checkpoint, weights, model, compute_dtype(checkpoint, dtype),
                             kv_bits, offload)  # fmt: skip
    weights = model.sanitize(weights)
    nn.quantize(model, class_predicate=_quantization_predicate(args, weights))
    expected = dict(tree_flatten(model.parameters()))
    for name, param in expected.items():
        if name not in weights:
            raise CheckpointError(
                f"checkpoint lacks tensor {name} (expected shape {tuple(param.shape)})"
            )
        if tuple(weights[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"tensor {name} has shape {tuple(weights[name].shape)}, but the config implies "
                f"{tuple(param.shape)}"
            )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"checkpoint has unexpected tensor {unexpected[0]}{more}")
    target = compute_dtype(checkpoint, dtype)
    keep = getattr(model, "cast_predicate", None) or (lambda name: True)  # mlx-lm's, a family's
    weights = {
        name: w.astype(target) if mx.issubdtype(w.dtype, mx.floating) and keep(name) else w
        for name, w in weights.items()
    }
    if offload:  # experts stay unread: the offload runtime reads them on demand
        from .names import is_expert_tensor
        from .offload import attach

        weights = {name: w for name, w in weights.items() if not is_expert_tensor(name)}
        runtime = attach(model, checkpoint, memory.cache_bytes, target, offload_options)
        runtime.room = memory.plan.room_bytes(memory.budget)  # the KV cache takes from this
        if split is not None and (held := split.held_experts(model)) is not None:
            runtime.held = held  # a rank streams its share only
    model.update(tree_unflatten(list(weights.items())))
    model.eval()
    model.memory = memory
    if not lazy:
        try:
            mx.eval(model.parameters(), held_arrays(model))
        except Exception as e:
            raise CheckpointError(f"cannot read weights of {checkpoint.path}: {e}") from None
    return model


def held_arrays(model: nn.Module) -> list[mx.array]:
    """Arrays a model keeps outside its parameters (mlx-lm's RoPE `_freqs`, YaRN's included),
    computed lazily when it was built. Evaluated with the weights: MLX streams are per thread,
    and a lazy array built in the loading thread cannot be computed in a reply's thread."""
    return [v for _, m in model.named_modules() for v in (*m.values(), *vars(m).values())
            if isinstance(v, mx.array)]  # private ones (`_freqs`) are items, not parameters
