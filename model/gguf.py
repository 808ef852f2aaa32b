"""GGUF files on gguf-py (llama.cpp's own package): metadata, the tensor table with byte ranges,
and each tensor's blocks turned into MLX affine quantization (w = scale * q + bias per group).

Pure numpy, no MLX: an expert store can convert one expert's bytes on read with `to_affine`.

    gguf = read_gguf(path)                                    # header only, nothing else read
    arrays = load_tensor(gguf, gguf.tensors["blk.0.attn_q.weight"])  # {"weight", "scales", ...}

Mapping (`AFFINE`): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q3_K are represented exactly
(Q3_K's 16-wide signed sub-blocks as 8-bit groups of 32: q' = sc * q + 127 with scale d);
Q6_K and Q2_K (16-wide sub-blocks with their own scale *and* offset) are re-quantized to 8-bit
groups of 32 with an error far below their own (measured in tests/test_gguf.py). Scales and
biases are float32: a K-quant group scale d * sc has up to 17 significant bits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, UnsupportedModelError

GROUP_SIZE = 32
# ggml type -> (bits, exact): how its blocks become MLX affine groups of 32.
AFFINE: dict[str, tuple[int, bool]] = {
    "Q4_0": (4, True),
    "Q4_1": (4, True),
    "Q5_0": (5, True),
    "Q5_1": (5, True),
    "Q8_0": (8, True),
    "Q4_K": (4, True),
    "Q5_K": (5, True),
    "Q3_K": (8, True),
    "Q6_K": (8, False),
    "Q2_K": (8, False),
}
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}  # BF16: bit pattern kept
CHUNK_BYTES = 4 << 20  # raw bytes converted at a time: bounds the transient float32 buffers


@dataclass
class GGUFTensor:
    name: str  # GGUF name, e.g. "blk.0.ffn_gate_exps.weight"
    ggml_type: str  # "Q4_K", "F32", ...
    shape: tuple[int, ...]  # numpy order: [..., rows, row length]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / max(1, int(np.prod(self.shape)))


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each ggml type, most frequent first."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def read_gguf(path: Path) -> GGUFFile:
    """Metadata and tensor table of a GGUF file, without reading any tensor.

    The header is parsed here (gguf-py's GGUFReader builds a numpy view per vocabulary string:
    2.6 CPU s for a 49k-token vocabulary, 25x this); tests/test_gguf.py checks that both read
    the same metadata and tensor table. Types and block sizes are gguf-py's."""
    import mmap

    import gguf

    try:
        size = path.stat().st_size
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                metadata, tensors = _parse_header(view, size)
            finally:
                view.release()
    except (OSError, ValueError, struct.error, IndexError, UnicodeDecodeError, KeyError) as e:
        raise CheckpointError(
            f"cannot read GGUF file {path.name} (truncated or corrupt: {e})"
        ) from None
    out = {}
    for name, kind, shape, offset in tensors:
        try:
            qtype = gguf.GGMLQuantizationType(kind)
        except ValueError:
            raise CheckpointError(f"GGUF tensor {name} has unknown type {kind}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) * type_size // block
        if offset + nbytes > size:
            raise CheckpointError(f"{path.name} is truncated (tensor {name} ends past the file)")
        out[name] = GGUFTensor(name, qtype.name, shape, offset, nbytes)
    return GGUFFile(path, metadata, out)


# GGUF value types (gguf-py's GGUFValueType): struct format of the scalar ones.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


def _parse_header(buf: memoryview, size: int) -> tuple[dict[str, Any], list]:
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("no GGUF magic")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}; mixchat reads versions 2 and 3")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + n > size:
            raise ValueError("a string runs past the end of the file")
        text = str(buf[pos + 8 : pos + 8 + n], "utf-8")
        pos += 8 + n
        return text

    def value(kind: int) -> Any:
        nonlocal pos
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item == _STRING:
                return [string() for _ in range(count)]
            if item == _ARRAY:
                return [value(_ARRAY) for _ in range(count)]
            dtype = np.dtype("<" + _SCALARS[item])
            data = np.frombuffer(buf, dtype, count, pos).copy()
            pos += count * dtype.itemsize
            return data
        fmt = "<" + _SCALARS[kind]
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        metadata[key] = value(kind)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, kind, tuple(int(d) for d in reversed(dims)), offset))
    alignment = int(metadata.get("general.alignment", 32))
    start = pos + (-pos) % alignment
    return metadata, [(n, k, shape, start + off) for n, k, shape, off in infos]


def check_supported(tensor: GGUFTensor) -> None:
    if tensor.ggml_type not in AFFINE and tensor.ggml_type not in FLOAT_TYPES:
        raise UnsupportedModelError(
            f"GGUF tensor {tensor.name} is {tensor.ggml_type}; mixchat reads "
            f"{', '.join([*AFFINE, *FLOAT_TYPES])}"
        )
    if tensor.ggml_type in AFFINE and tensor.shape[-1] % GROUP_SIZE:
        raise UnsupportedModelError(
            f"GGUF tensor {tensor.name} has rows of {tensor.shape[-1]}, not a multiple of 32"
        )


def converted_specs(tensor: GGUFTensor) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """What `load_tensor` returns, as {suffix: (shape, safetensors dtype, nbytes)}: "weight"
    (plus "scales" and "biases" for quantized types)."""
    check_supported(tensor)
    *lead, cols = tensor.shape
    n = int(np.prod(tensor.shape))
    if tensor.ggml_type in FLOAT_TYPES:
        size = 4 if tensor.ggml_type == "F32" else 2
        return {"weight": (tensor.shape, tensor.ggml_type, n * size)}
    bits, _ = AFFINE[tensor.ggml_type]
    groups = (*lead, cols // GROUP_SIZE)
    return {
        "weight": ((*lead, cols * bits // 32), "U32", n * bits // 8),
        "scales": (groups, "F32", n // GROUP_SIZE * 4),
        "biases": (groups, "F32", n // GROUP_SIZE * 4),
    }


def expert_range(tensor: GGUFTensor, expert: int) -> tuple[int, int]:
    """(absolute offset, nbytes) of expert `expert` of a stacked [E, rows, cols] tensor."""
    experts = tensor.shape[0]
    if len(tensor.shape) != 3 or not 0 <= expert < experts:
        raise ValueError(f"{tensor.name} has no expert {expert} (shape {tensor.shape})")
    stride = tensor.nbytes // experts
    return tensor.offset + expert * stride, stride


def read_bytes(path: Path, offset: int, nbytes: int) -> np.ndarray:
    """nbytes of the file at offset, as uint8 (a plain read: no mapping stays resident)."""
    out = np.empty(nbytes, dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view, done = memoryview(out), 0
        while done < nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{path.name} is truncated at byte {offset + done}")
            done += got
    return out


def load_tensor(gguf: GGUFFile, tensor: GGUFTensor) -> dict[str, np.ndarray]:
    """One tensor as numpy arrays: {"weight"} for float types (BF16 as uint16 bit patterns),
    {"weight", "scales", "biases"} (MLX affine, groups of 32) for quantized ones."""
    specs = converted_specs(tensor)
    heads = _permuted_heads(gguf.metadata, tensor.name)
    if tensor.ggml_type in FLOAT_TYPES:
        raw = read_bytes(gguf.path, tensor.offset, tensor.nbytes)
        dtype = FLOAT_TYPES[tensor.ggml_type] or np.uint16
        return {"weight": _unpermute(raw.view(dtype).reshape(tensor.shape), heads)}
    rows = int(np.prod(tensor.shape[:-1]))
    row_bytes = tensor.nbytes // rows
    out = {k: np.empty((rows, shape[-1]), np.uint32 if dt == "U32" else np.float32)
           for k, (shape, dt, _) in specs.items()}
    step = max(1, CHUNK_BYTES // row_bytes)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        raw = read_bytes(gguf.path, tensor.offset + a * row_bytes, (b - a) * row_bytes)
        w, s, z, _, _ = to_affine(tensor.ggml_type, raw, (b - a, tensor.shape[-1]))
        out["weight"][a:b], out["scales"][a:b], out["biases"][a:b] = w, s, z
    return {k: _unpermute(v.reshape(specs[k][0]), heads) for k, v in out.items()}


def _permuted_heads(metadata: dict[str, Any], name: str) -> int:
    """The head count whose Q/K rows llama.cpp's converter permuted for adjacent-pair RoPE in
    tensor `name` (model/names.py GGUF_PERMUTED), else 0."""
    from .names import GGUF_PERMUTED

    arch, parts = metadata.get("general.architecture"), name.split(".")
    key = GGUF_PERMUTED.get(arch, {}).get(parts[2]) if len(parts) == 4 else None
    return int(metadata.get(f"{arch}.{key}", 0)) if key and parts[0] == "blk" else 0


def _unpermute(array: np.ndarray, heads: int) -> np.ndarray:
    """Rows back in Hugging Face's rotary order: the inverse of convert_hf_to_gguf.py's
    `reshape(heads, 2, half, ...).swapaxes(1, 2)` (a quantized tensor's rows move whole)."""
    if not heads:
        return array
    rows = array.shape[0]
    split = array.reshape(heads, rows // heads // 2, 2, *array.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(array.shape))


def to_affine(
    ggml_type: str, raw: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Raw GGUF blocks (uint8) of a tensor of `shape` -> (packed uint32 weight [..., cols*bits/32],
    float32 scales [..., cols/32], float32 biases, bits, group_size) for MLX's affine mode."""
    import gguf

    bits, exact = AFFINE[ggml_type]
    qtype = gguf.GGMLQuantizationType[ggml_type]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    *lead, cols = shape
    rows = int(np.prod(lead)) if lead else 1
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, type_size)
    if blocks.shape[0] * block_size != rows * cols:
        raise CheckpointError(
            f"{blocks.shape[0]} {ggml_type} blocks do not make a tensor of shape {tuple(shape)}"
        )
    if ggml_type in _NIBBLES or ggml_type in _CODES:  # codes straight from the blocks: fast
        scales, biases = _group_affine(ggml_type, blocks)
        if ggml_type in _NIBBLES:  # 4-bit: the blocks' bytes re-paired, never unpacked
            start, half = _NIBBLES[ggml_type]
            packed = _repair_nibbles(blocks[:, start:], half).view(np.uint32).reshape(rows, -1)
        else:
            packed = pack(_CODES[ggml_type](blocks).reshape(rows, cols), bits)
        return (
            packed.reshape(*lead, -1),
            scales.reshape(*lead, -1).astype(np.float32),
            biases.reshape(*lead, -1).astype(np.float32),
            bits,
            GROUP_SIZE,
        )
    if ggml_type == "Q6_K":
        q, scales, biases = _q6k_as_8bit(blocks, rows, cols)
        return (
            pack(q.reshape(rows, cols), bits).reshape(*lead, -1),
            scales.reshape(*lead, -1), biases.reshape(*lead, -1), bits, GROUP_SIZE,
        )  # fmt: skip
    # one "row" of all the blocks: gguf-py then decodes them in one vectorized call
    w = gguf.quants.dequantize(blocks.reshape(1, -1), qtype)
    w = w.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    if exact:
        scales, biases = _group_affine(ggml_type, blocks)
        scales = scales.reshape(rows, cols // GROUP_SIZE, 1)
        biases = biases.reshape(rows, cols // GROUP_SIZE, 1)
        safe = np.where(scales == 0, np.float32(1), scales)
        q = np.rint((w - biases) / safe)
        q = np.where(scales == 0, 0, q)
        q = np.clip(q, 0, (1 << bits) - 1).astype(np.uint8)
    else:
        q, scales, biases = _requantize(w, bits)
    packed = pack(q.reshape(rows, cols), bits)
    return (
        packed.reshape(*lead, -1),
        scales.reshape(*lead, -1).astype(np.float32),
        biases.reshape(*lead, -1).astype(np.float32),
        bits,
        GROUP_SIZE,
    )


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, k, 32] bytes -> [n, k, 64] codes: the 32 low nibbles, then the 32 high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _codes_q8_0(blocks: np.ndarray) -> np.ndarray:  # d, int8 qs[32]
    return (blocks[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(-1)


def _codes_q5_k(blocks: np.ndarray) -> np.ndarray:  # d, dmin, scales[12], qh[32], qs[128]
    low = _nibbles(blocks[:, 48:176].reshape(-1, 4, 32))  # [n, 4, 64]
    qh = blocks[:, 16:48]  # bit 2i: chunk i's low half, bit 2i+1: its high half
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
    high = ((qh[:, None, None, :] >> shifts) & 1).reshape(-1, 4, 64)
    return (low | (high << 4)).reshape(-1)


def _repair_nibbles(qs: np.ndarray, half: int) -> np.ndarray:
    """4-bit blocks whose runs of `half` bytes hold 2*half codes (low nibbles first, then high
    ones) -> MLX's packing of the same codes in element order (two per byte, low first)."""
    qs = np.ascontiguousarray(qs).reshape(-1, half // 2, 2)
    a, b = qs[..., 0], qs[..., 1]
    low = (a & 0x0F) | (b << 4)  # elements 2k, 2k+1 of the low half
    high = (a >> 4) | (b & 0xF0)  # the same of the high half
    return np.concatenate([low.reshape(-1, half // 2), high.reshape(-1, half // 2)], axis=-1)


# 4-bit types: (offset of the code bytes in a block, bytes per low/high run)
_NIBBLES = {"Q4_0": (2, 16), "Q4_1": (4, 16), "Q4_K": (16, 32)}

_CODES = {"Q8_0": _codes_q8_0, "Q5_K": _codes_q5_k}


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _group_affine(ggml_type: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group of 32 (in element order), the scale and bias with w == scale * q + bias
    exactly, q the group's unsigned integer codes."""
    import gguf

    if ggml_type in ("Q4_0", "Q5_0", "Q8_0"):
        d = _f16(blocks, 0)
        offset = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128}[ggml_type]
        return d, -offset * d
    if ggml_type in ("Q4_1", "Q5_1"):
        return _f16(blocks, 0), _f16(blocks, 2)
    if ggml_type in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
        return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))
    if ggml_type == "Q3_K":  # w = d * sc * q, sc in [-32, 31], q in [-4, 3]: sc*q + 127 in [3, 255]
        d = np.repeat(_f16(blocks, 108), 8, axis=1)
        return d, -127 * d
    raise AssertionError(ggml_type)


def _q6k_as_8bit(blocks: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, ...]:
    """Q6_K (16-wide sub-blocks, w = S_j * k, k in [-32, 31]) as 8-bit groups of 32: step
    |S|/4 for the sub-block of larger |S|, so that one is exact (4k + 128) and the other is
    rounded to the same step min-max re-quantization would use (~|S|/4), for half the error.
    w is computed as gguf-py computes it (float32 d * scale, then * k)."""
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(
        1, 1, 4, 1
    )
    k = ((ql & 0x0F).reshape(n, 8, 32) | ((qh & 0x03).reshape(n, 8, 32) << 4)).astype(np.int8)
    k = (k - np.int8(32)).astype(np.float32).reshape(n, 16, 16)
    sub = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    sub = sub * _f16(blocks, 208)  # [n, 16] = d * scale_j, as gguf-py
    w = sub[..., None] * k  # [n, 16, 16]
    step = np.abs(sub).reshape(n, 8, 2).max(axis=-1) / np.float32(4)  # [n, 8] per group of 32
    safe = np.where(step == 0, np.float32(1), step)
    # Only a group whose sub-blocks have equal and opposite scales reaches 256 (one element
    # at k = -32), clipped to 255: one step off there.
    q = np.rint(w.reshape(n, 8, 32) / safe[..., None]) + 128
    q = np.clip(q, 0, 255).astype(np.uint8)
    step = step.reshape(rows, cols // GROUP_SIZE)
    return q, step, -128 * step


def _requantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [rows, groups, 32] float32 -> (q, scale, bias) per group, min-max affine at `bits`,
    as mx.quantize does (bias = group min, scale = range / (2^bits - 1))."""
    lo, hi = w.min(axis=-1, keepdims=True), w.max(axis=-1, keepdims=True)
    scale = (hi - lo) / np.float32((1 << bits) - 1)
    safe = np.where(scale == 0, np.float32(1), scale)
    q = np.clip(np.rint((w - lo) / safe), 0, (1 << bits) - 1).astype(np.uint8)
    return q, scale.astype(np.float32), lo.astype(np.float32)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [rows, cols] (uint8) -> MLX's packing: a little-endian bit stream of
    `bits`-bit codes, element 0 in the lowest bits, read as uint32 [rows, cols * bits / 32]."""
    rows, cols = q.shape
    if bits == 8:
        return np.ascontiguousarray(q).view(np.uint32).reshape(rows, -1)
    if bits == 4:
        pairs = q.reshape(rows, -1, 2)
        return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4)).view(np.uint32)
    planes = (q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # [rows, cols, bits]
    stream = np.packbits(planes.reshape(rows, -1), axis=-1, bitorder="little")
    return np.ascontiguousarray(stream).view(np.uint32).reshape(rows, -1)


def family_config(
    metadata: dict[str, Any], tensor_names: set[str], gguf: GGUFFile | None = None
) -> dict[str, Any] | None:
    """A family GGUF's metadata (model/names.py GGUF_FAMILIES: llama.cpp's qwen3moe, qwen2moe,
    olmoe, granitemoe, phimoe) as the config.json mlx-lm's definition reads (with `gguf`, the
    file: PhiMoE's LongRoPE factors are tensors); None for any other architecture."""
    from .gguf_deepseek import deepseek2_config
    from .names import GGUF_FAMILIES, GGUF_FAMILY_CONFIG, GGUF_FAMILY_CONFIG_OF

    arch = metadata.get("general.architecture")
    if arch not in GGUF_FAMILIES:  # deepseek2: V2 or V3 by its gating (model/gguf_deepseek.py)
        return deepseek2_config(metadata, tensor_names) if arch == "deepseek2" else None
    model_type, implicit = GGUF_FAMILIES[arch]
    config: dict[str, Any] = {"model_type": model_type, **implicit}
    for field, key in {**GGUF_FAMILY_CONFIG, **GGUF_FAMILY_CONFIG_OF.get(arch, {})}.items():
        value = metadata.get(f"{arch}.{key}")
        if value is not None:
            config[field] = value.item() if hasattr(value, "item") else value
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                "num_experts_per_tok")  # fmt: skip
    for field in required:
        if field not in config:
            raise CheckpointError(f"GGUF metadata lacks {arch}.{GGUF_FAMILY_CONFIG[field]}")
    config.setdefault("vocab_size", len(metadata.get("tokenizer.ggml.tokens", [])))
    config.setdefault("num_local_experts", config["num_experts"])  # GraniteMoE's, PhiMoE's name
    heads = config.get("num_attention_heads") or 1
    config.setdefault("head_dim", (config.get("hidden_size") or 0) // heads)
    config.setdefault("intermediate_size", config.get("moe_intermediate_size"))
    config.setdefault("moe_intermediate_size", config.get("intermediate_size"))
    config.update(
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings="output.weight" not in tensor_names,
        rope_scaling=_longrope(metadata, gguf) if gguf is not None else None,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
    )
    return config


def _longrope(metadata: dict[str, Any], gguf: GGUFFile) -> dict[str, Any] | None:
    """PhiMoE's `rope_scaling` from its rope_factors_long/short tensors. The file keeps no
    short/long mscale: both are its rope.scaling.attn_factor, as llama.cpp runs it (the converter
    computes sqrt(1 + ln(scale) / ln(original)): 1.19 where Phi-3.5-MoE publishes 1.243)."""
    from .names import GGUF_CONFIG_TENSORS

    factors = {}
    for name, field in GGUF_CONFIG_TENSORS.items():
        if name in gguf.tensors:
            factors[field] = [float(x) for x in load_tensor(gguf, gguf.tensors[name])["weight"]]
    if len(factors) < len(GGUF_CONFIG_TENSORS):
        return None
    arch = metadata.get("general.architecture")
    mscale = float(metadata.get(f"{arch}.rope.scaling.attn_factor", 1.0))
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    return {"type": "longrope", **factors, "short_mscale": mscale, "long_mscale": mscale,
            "original_max_position_embeddings": int(original or 4096)}  # fmt: skip
