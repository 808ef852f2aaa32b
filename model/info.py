"""What a checkpoint is, before loading it: architecture, parameters, quantization, memory."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .config import ModelArgs, parameter_shapes
from .gguf import GGUFFile
from .weights import Checkpoint


@dataclass
class ModelInfo:
    name: str
    path: str
    format: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_experts: int  # 0 for a dense model
    experts_per_token: int
    total_params: int
    active_params: int  # used per token: everything but the experts a token does not pick
    quantization: str
    size_bytes: int  # on disk
    memory_bytes: int  # weights in memory at the compute dtype
    kv_bytes_per_token: int
    context_length: int
    sliding_window: int | None
    tensor_types: str = ""  # GGUF: tensors per stored type ("193 Q4_K, 65 F32, 33 Q6_K")

    def as_dict(self) -> dict:
        return asdict(self)


def parameter_counts(args: ModelArgs) -> tuple[int, int]:
    """(total, active per token) parameter counts, from the model definition's shapes."""
    total = active = 0
    for name, shape in parameter_shapes(args).items():
        n = math.prod(shape)
        total += n
        experts = ".switch_mlp." in name or ".mlp.experts." in name  # gpt-oss: `experts`
        active += n * args.num_experts_per_tok // shape[0] if experts else n
    return total, active


def describe_gguf(gguf_file: GGUFFile) -> str:
    """ "GGUF Q4_K_M, 4.87 bits/weight" (the weights' bits over the file's)."""
    import gguf

    file_type = gguf_file.metadata.get("general.file_type")
    try:
        name = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        name = "mixed" if file_type is None else f"type {file_type}"
    elements = sum(int(np.prod(t.shape)) for t in gguf_file.tensors.values())
    bits = sum(t.nbytes for t in gguf_file.tensors.values()) * 8 / max(1, elements)
    return f"GGUF {name}, {bits:.2f} bits/weight"


def tensor_types(checkpoint: Checkpoint) -> str:
    """Tensors per stored type, most frequent first: "193 Q4_K, 65 F32, 33 Q6_K" (GGUF), else
    ""."""
    if checkpoint.gguf_file is None:
        return ""
    return ", ".join(f"{n} {t}" for t, n in checkpoint.gguf_file.type_counts().items())


def describe_quantization(checkpoint: Checkpoint) -> str:
    if checkpoint.gguf_file is not None:
        return describe_gguf(checkpoint.gguf_file)
    q = checkpoint.args.quantization
    if not q:
        return f"none ({checkpoint.source_dtype.lower()})"
    mode = q.get("mode", "affine")  # "mxfp4": gpt-oss's experts as published
    text = f"{q.get('bits', '?')}-bit {mode}, group {q.get('group_size', '?')}"
    overrides = {v.get("bits") for k, v in q.items() if isinstance(v, dict)}
    if overrides:
        text += f" (some modules at {', '.join(f'{b}-bit' for b in sorted(overrides))})"
    if any(v is False for v in q.values()):
        text += ", router unquantized"
    return text


def model_info(checkpoint: Checkpoint, name: str, compute_bytes: int = 4) -> ModelInfo:
    """`compute_bytes`: bytes per floating value once loaded (4 on the CPU backend)."""
    args = checkpoint.args
    total, active = parameter_counts(args)
    memory = 0
    for spec in checkpoint.tensors.values():
        floating = spec.dtype in ("F32", "F16", "BF16")
        memory += (
            spec.nbytes // (4 if spec.dtype == "F32" else 2) * compute_bytes
            if floating
            else spec.nbytes
        )
    from .kv_cache import kv_bytes_per_token  # MLA's latent, as mlx-lm caches it

    kv_per_token = kv_bytes_per_token(args, compute_bytes)
    return ModelInfo(
        name=name,
        path=str(checkpoint.path),
        format=checkpoint.format,
        architecture=args.model_type,
        num_layers=args.num_hidden_layers,
        hidden_size=args.hidden_size,
        num_experts=args.num_local_experts,
        experts_per_token=args.num_experts_per_tok if args.is_moe else 0,
        total_params=total,
        active_params=active,
        quantization=describe_quantization(checkpoint),
        size_bytes=checkpoint.size_bytes,
        memory_bytes=memory,
        kv_bytes_per_token=kv_per_token,
        context_length=args.context_length,
        sliding_window=args.sliding_window,
        tensor_types=tensor_types(checkpoint),
    )
