"""`mixchat quantize MODEL.gguf DST`: a GGUF file as an MLX directory (safetensors shards and a
config.json), for what needs one (several ranks read their share by byte ranges).

Each GGUF tensor is converted as mixchat loads it (model/gguf.py: MLX affine quantization,
groups of 32; float tensors as stored), one tensor at a time (one expert tensor per layer for
GGUFs that store experts one by one: stacked, as mlx-lm stores them, so that they stream under a
memory budget), so the directory runs exactly as
the GGUF does: the same weights, and the GGUF's own tokenizer, whose metadata goes along in
`tokenizer_gguf.json` (model/tokenizer/load.py reads it). Written to DST.partial, renamed to DST
when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import MixchatError
from model.gguf import load_tensor
from model.gguf_deepseek import mla_tensors
from model.gguf_gpt_oss import MXFP4, load_mxfp4
from model.names import per_expert_name
from model.tokenizer.load import GGUF_TOKENIZER_FILE
from model.weights import Checkpoint, locate

GROUP_SIZE = 32  # model/gguf.py converts every quantized type into groups of 32
# ModelArgs fields config.json carries (ModelArgs.from_hf_config reads them back).
CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_local_experts", "num_experts_per_tok", "rms_norm_eps", "rope_theta",
                 "rope_traditional", "rope_scaling", "sliding_window", "tie_word_embeddings",
                 "max_position_embeddings", "bos_token_id", "eos_token_id")  # fmt: skip


@dataclass
class GGUFConversion:
    dst: Path
    total_bytes: int
    bits_per_weight: float
    seconds: float


def is_gguf(src: str) -> bool:
    return src.endswith(".gguf") and Path(src).expanduser().is_file()


def convert_gguf(src: Path, dst: Path, *, max_shard_bytes: int, force: bool = False,
                 say=lambda message: None) -> GGUFConversion:  # fmt: skip
    """Write the GGUF file `src` as an MLX directory `dst`."""
    start = time.perf_counter()
    dst = dst.expanduser()
    if dst.exists() and not force:
        raise MixchatError(f"{dst} already exists (pass --force to replace it)")
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not (dst / "config.json").exists())):
        raise MixchatError(f"{dst} is not a model directory; not replacing it even with --force")
    checkpoint = locate(src)
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weight_map, quantization, weights_count = _write_shards(checkpoint, partial, max_shard_bytes,
                                                            say)  # fmt: skip
    args = checkpoint.args
    if args.is_family:  # llama.cpp's MoE families: the config.json mlx-lm's definition reads
        config = dict(args.extra["config"])
    else:
        config = {name: getattr(args, name) for name in CONFIG_FIELDS}
        config["architectures"] = ["MixtralForCausalLM" if args.is_moe else "LlamaForCausalLM"]
    config["quantization"] = quantization
    config["mixchat_source"] = src.name
    (partial / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    tokenizer = {k: _jsonable(v) for k, v in checkpoint.gguf_metadata.items()
                 if k.startswith("tokenizer.") or k == "general.name"}  # fmt: skip
    (partial / GGUF_TOKENIZER_FILE).write_text(json.dumps(tokenizer, ensure_ascii=False))
    if dst.exists():
        shutil.rmtree(dst)
    partial.rename(dst)
    total = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    return GGUFConversion(dst, total, total * 8 / max(weights_count, 1),
                          time.perf_counter() - start)  # fmt: skip


def _write_shards(checkpoint: Checkpoint, out: Path, max_shard_bytes: int,
                  say) -> tuple[dict[str, str], dict[str, Any], int]:  # fmt: skip
    """Every tensor converted, in shards of at most `max_shard_bytes` (one tensor may exceed
    it); the weight map, the quantization block (mlx-lm's, per module) and the weight count."""
    import mlx.core as mx

    weight_map: dict[str, str] = {}
    quantization: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": 4, "mode": "affine"}
    bits_seen: dict[int, int] = {}
    shard: dict[str, mx.array] = {}
    size, shards, count = 0, 0, 0

    def flush() -> None:
        nonlocal shard, size, shards
        if shard:
            name = f"model-{shards + 1:05d}.safetensors"
            mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, shards = {}, 0, shards + 1

    def add(name: str, arrays: dict[str, np.ndarray], mxfp4: bool) -> None:
        nonlocal count, size
        base = name.removesuffix(".weight")
        if "scales" in arrays:  # a quantized module: its bits from the packed width
            in_dims = arrays["scales"].shape[-1] * GROUP_SIZE
            bits = arrays["weight"].shape[-1] * 32 // in_dims
            quantization[base] = {"group_size": GROUP_SIZE, "bits": bits}
            if mxfp4:
                quantization[base]["mode"] = "mxfp4"
            bits_seen[bits] = bits_seen.get(bits, 0) + 1
            count += int(np.prod(arrays["weight"].shape[:-1])) * in_dims
        else:
            count += int(arrays["weight"].size)
        for part, array in arrays.items():
            key = name if part == "weight" else f"{base}.{part}"
            if (spec := checkpoint.tensors.get(key)) is not None:  # a row vector as [1, n]
                array = array.reshape(spec.shape)
            value = mx.array(array)
            if array.dtype == np.uint16:  # BF16 bit patterns
                value = value.view(mx.bfloat16)
            if size and size + value.nbytes > max_shard_bytes:
                flush()
            shard[key] = value
            size += value.nbytes

    experts = checkpoint.args.num_local_experts
    mla_held: dict = {}  # a deepseek2 file's first MLA tensor of a pair (model/gguf_deepseek.py)
    pending: dict[str, dict[int, dict[str, np.ndarray]]] = {}  # one by one -> stacked
    tensors = [(n, t) for n, (t, part) in checkpoint.gguf_names.items() if part == "weight"]
    for i, (name, tensor) in enumerate(tensors):
        mxfp4 = tensor.ggml_type == MXFP4  # gpt-oss's experts: kept in MLX's mxfp4 mode
        arrays = (load_mxfp4 if mxfp4 else load_tensor)(checkpoint.gguf_file, tensor)
        say(f"{i + 1}/{len(tensors)} {tensor.name} ({tensor.ggml_type})")
        if (stacked := per_expert_name(name)) is not None:
            name, expert = stacked
            pending.setdefault(name, {})[expert] = arrays
            if len(pending[name]) < experts:
                continue
            parts = pending.pop(name)
            arrays = {k: np.stack([parts[e][k] for e in range(experts)]) for k in parts[0]}
        for mlx_name, mlx_arrays in mla_tensors(name, arrays, checkpoint.args.model_type,
                                                mla_held):  # fmt: skip
            add(mlx_name, mlx_arrays, mxfp4)
    flush()
    if pending:
        raise MixchatError(f"{checkpoint.path.name} lacks experts of {next(iter(pending))}")
    if mla_held:  # an attn_k_b without its attn_v_b
        raise MixchatError(f"{checkpoint.path.name} lacks the pair of {next(iter(mla_held))}")
    if bits_seen:
        quantization["bits"] = max(bits_seen, key=bits_seen.get)
    return weight_map, quantization, count


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value
