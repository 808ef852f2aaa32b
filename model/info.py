"""What a checkpoint is, before loading it: architecture, parameters, quantization, memory."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .config import ModelArgs, parameter_shapes
from .weights import Checkpoint

GGUF_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 32: "BF16"}


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

    def as_dict(self) -> dict:
        return asdict(self)


def parameter_counts(args: ModelArgs) -> tuple[int, int]:
    """(total, active per token) parameter counts, from the model definition's shapes."""
    total = active = 0
    for name, shape in parameter_shapes(args).items():
        n = math.prod(shape)
        total += n
        active += n * args.num_experts_per_tok // shape[0] if ".switch_mlp." in name else n
    return total, active


def describe_quantization(checkpoint: Checkpoint) -> str:
    if checkpoint.gguf_metadata is not None:
        file_type = checkpoint.gguf_metadata.get("general.file_type")
        file_type = file_type.item() if hasattr(file_type, "item") else file_type
        return f"GGUF {GGUF_FILE_TYPES.get(file_type, f'type {file_type}')}"
    q = checkpoint.args.quantization
    if not q:
        return f"none ({checkpoint.source_dtype.lower()})"
    text = f"{q.get('bits', '?')}-bit affine, group {q.get('group_size', '?')}"
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
        memory += spec.nbytes // (4 if spec.dtype == "F32" else 2) * compute_bytes if floating else spec.nbytes
    kv_per_token = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * compute_bytes
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
    )
