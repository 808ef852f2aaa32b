"""Single experts read from the checkpoint with positioned reads, past the page cache.

Expert e of a stacked [E, ...] safetensors tensor (or GGUF tensor) is one contiguous slice:
one read per tensor part, several experts in flight from the runtime's thread pool, O_DIRECT
(Linux) or F_NOCACHE (macOS) so their bytes are not held twice. GGUF blocks are turned into
MLX affine arrays as they are read.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from ..experts import PROJECTIONS
from ..gguf_gpt_oss import MXFP4, mxfp4_to_mlx
from ..memory_plan import loaded_nbytes
from ..names import EXPERT_MODULES, EXPERT_PARTS, stacked_expert_tensor
from ..safetensors_header import FLOAT_DTYPES, TensorSpec, read_safetensors_header

_NP_DTYPES = {"U32": np.uint32, "I32": np.int32, "U8": np.uint8, "I8": np.int8, "U16": np.uint16,
              "I16": np.int16, "F32": np.float32, "F16": np.float16}  # fmt: skip

_ALIGN = 4096  # O_DIRECT reads start, end and land on page boundaries
GGUF_PREFIX = "GGUF:"  # a _Slice dtype "GGUF:Q4_K": blocks converted when read


@dataclass(frozen=True)
class _Slice:
    file: int  # index into ExpertStore's open files
    offset: int  # absolute offset of expert 0's bytes
    stride: int  # bytes per expert
    dtype: str
    shape: tuple[int, ...]  # one expert's shape, with a leading 1: [1, out, in...]


# projection -> (weight, scales | None, biases | None, bias | None), each [1, ...]
CachedExpert = dict


def _open(path: Path, bypass_page_cache: bool) -> tuple[int, bool]:
    """(fd, whether reads must be O_DIRECT-aligned). Bypassing the page cache keeps expert bytes
    from being held twice (once in the cache, once by the OS): O_DIRECT on Linux, F_NOCACHE on
    macOS; where O_DIRECT is refused (tmpfs...), reads are evicted after the fact instead."""
    if bypass_page_cache and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass
    fd = os.open(path, os.O_RDONLY)
    if bypass_page_cache and sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
    return fd, False


class ExpertStore:
    """Reads single experts of stacked expert tensors with positioned reads: one read per
    tensor part (contiguous: expert e of [E, ...] is bytes [e * stride, (e + 1) * stride)),
    several experts in flight from the runtime's thread pool.

    `layers`: the MoE layers, each with the module path its family keeps its experts under
    (names.EXPERT_MODULES); plain layer numbers mean Mixtral's ("block_sparse_moe.switch_mlp")."""

    def __init__(self, checkpoint, layers: Iterable[int] | dict[int, str], dtype: mx.Dtype,
                 bypass_page_cache: bool = True):  # fmt: skip
        if not isinstance(layers, dict):
            layers = dict.fromkeys(layers, EXPERT_MODULES[0])
        self.dtype = dtype
        self.bypass_page_cache = bypass_page_cache
        self._fds: list[int] = []
        self._direct: list[bool] = []
        locations: dict[str, tuple[int, TensorSpec]] = {}
        for file in checkpoint.files:
            fd, direct = _open(file, bypass_page_cache)
            self._fds.append(fd)
            self._direct.append(direct)
            if checkpoint.format == "gguf":  # stacked expert tensors, converted on read
                for name, (tensor, part) in checkpoint.gguf_names.items():
                    if part == "weight":
                        spec = TensorSpec(tensor.shape, f"{GGUF_PREFIX}{tensor.ggml_type}",
                                          tensor.nbytes, tensor.offset)  # fmt: skip
                        locations[name] = (0, spec)
                continue
            for name, spec in read_safetensors_header(file).items():
                locations[name] = (len(self._fds) - 1, spec)
        self.slices: dict[int, dict[str, dict[str, _Slice]]] = {}
        self._gguf_memory: dict[tuple[int, str], int] = {}  # (layer, proj) -> one expert
        self.disk_bytes: dict[int, int] = {}
        self.memory_bytes: dict[int, int] = {}
        self.max_stride = 0
        for layer, module in layers.items():
            parts: dict[str, dict[str, _Slice]] = {}
            for proj in PROJECTIONS:
                parts[proj] = {}
                for part in EXPERT_PARTS:
                    name = stacked_expert_tensor(layer, module, proj, part)
                    if name not in locations:
                        if part == "weight":
                            raise CheckpointError(f"checkpoint lacks tensor {name}")
                        continue
                    file, spec = locations[name]
                    if spec.dtype.startswith(GGUF_PREFIX) and part != "weight":
                        pass  # gpt-oss's expert bias: counted with its weight below
                    elif spec.dtype.startswith(GGUF_PREFIX):
                        self._gguf_memory[(layer, proj)] = sum(
                            loaded_nbytes(checkpoint.tensors[f"{name[:-6]}{p}"], dtype.size)
                            for p in ("weight", "scales", "biases", "bias")
                            if f"{name[:-6]}{p}" in checkpoint.tensors
                        ) // spec.shape[0]
                    elif spec.dtype not in _NP_DTYPES and spec.dtype != "BF16":
                        raise CheckpointError(f"tensor {name} has unsupported dtype {spec.dtype}")
                    experts = spec.shape[0]
                    if spec.nbytes % experts:
                        raise CheckpointError(
                            f"tensor {name} does not split into {experts} experts"
                        )
                    stride = spec.nbytes // experts
                    parts[proj][part] = _Slice(file, spec.offset, stride, spec.dtype,
                                               (1, *spec.shape[1:]))  # fmt: skip
                    self.max_stride = max(self.max_stride, stride)
            self.slices[layer] = parts
            self.disk_bytes[layer] = sum(s.stride for p in parts.values() for s in p.values())
            self.memory_bytes[layer] = sum(
                self._gguf_memory.get((layer, proj)) or sum(map(self._memory_nbytes, p.values()))
                for proj, p in parts.items()
            )
        self._local = threading.local()

    def _memory_nbytes(self, s: _Slice) -> int:
        return loaded_nbytes(TensorSpec(s.shape, s.dtype, s.stride), self.dtype.size)

    def expert_bytes(self, layer: int) -> int:
        """Bytes one expert of `layer` takes in the cache."""
        return self.memory_bytes[layer]

    def read(self, layer: int, expert: int) -> tuple[CachedExpert, int]:
        """(the expert's arrays, bytes of it read from disk)."""
        out: CachedExpert = {}
        total = 0
        for proj, parts in self.slices[layer].items():
            s = parts["weight"]
            if s.dtype.startswith(GGUF_PREFIX):  # GGUF blocks -> MLX affine (or float) arrays
                raw = self._pread(s.file, s.offset + expert * s.stride, s.stride)
                out[proj] = self._from_gguf(raw, s)
                total += s.stride
                if (b := parts.get("bias")) is not None:  # gpt-oss's expert bias: its own tensor
                    raw = self._pread(b.file, b.offset + expert * b.stride, b.stride)
                    out[proj] = (*out[proj], self._from_gguf(raw, b)[0])
                    total += b.stride
                continue
            arrays = []
            for part in EXPERT_PARTS:
                s = parts.get(part)
                if s is None:
                    arrays.append(None)
                    continue
                raw = self._pread(s.file, s.offset + expert * s.stride, s.stride)
                arrays.append(self._to_array(raw, s))
                total += s.stride
            out[proj] = tuple(arrays)
        return out, total

    def _scratch(self, size: int) -> memoryview:
        """This thread's page-aligned read buffer (an anonymous mmap) of at least `size` bytes."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            if buf is not None:
                buf.close()
            buf = self._local.buf = mmap.mmap(-1, max(size, self.max_stride + 2 * _ALIGN))
        return memoryview(buf)

    def _pread(self, file: int, offset: int, size: int) -> np.ndarray:
        fd, direct = self._fds[file], self._direct[file]
        start = offset - offset % _ALIGN if direct else offset
        end = -(-(offset + size) // _ALIGN) * _ALIGN if direct else offset + size
        view = self._scratch(end - start)
        done = 0
        while done < end - start:
            n = os.preadv(fd, [view[done : end - start]], start + done)
            if n <= 0:
                if direct and start + done >= offset + size:
                    break  # the aligned tail ran past the end of the file
                raise CheckpointError(f"unexpected end of file reading experts at byte {offset}")
            done += n
        if self.bypass_page_cache and not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
        return np.frombuffer(view, np.uint8, size, offset - start)

    def _from_gguf(self, raw: np.ndarray, s: _Slice) -> tuple:
        """One expert's GGUF blocks as (weight, scales, biases) [1, ...], as the whole-model
        GGUF loader converts them (model/gguf.py), floats at the compute dtype."""
        from ..gguf import FLOAT_TYPES, to_affine

        ggml_type = s.dtype.removeprefix(GGUF_PREFIX)
        if ggml_type == MXFP4:  # gpt-oss's experts, kept in MLX's mxfp4 mode
            weight, scales = mxfp4_to_mlx(raw, s.shape[1:])
            return (mx.array(weight[None]), mx.array(scales[None]), None)
        if ggml_type in FLOAT_TYPES:
            return (self._to_array(raw, replace(s, dtype=ggml_type)), None, None)
        weight, scales, biases, _, _ = to_affine(ggml_type, raw, s.shape[1:])
        as_f32 = replace(s, dtype="F32", shape=(1, *scales.shape))
        return (
            mx.array(weight.reshape(1, *weight.shape)),
            self._to_array(scales.reshape(-1).view(np.uint8), as_f32),
            self._to_array(biases.reshape(-1).view(np.uint8), as_f32),
        )

    def _to_array(self, raw: np.ndarray, s: _Slice) -> mx.array:
        """Bytes -> mx.array (a copy), floating tensors converted to the compute dtype with
        the same rounding `astype` applies when the model is loaded whole. Conversions are done
        in numpy so that no MLX operation is created on this (I/O) thread: bfloat16 is kept as
        its uint16 bits, viewed as bfloat16 where it is used (`_as_float`)."""
        if s.dtype not in FLOAT_DTYPES:
            return mx.array(raw.view(_NP_DTYPES[s.dtype]).reshape(s.shape))
        target = self.dtype
        if s.dtype == "BF16" and target == mx.bfloat16:
            return mx.array(raw.view(np.uint16).reshape(s.shape))
        if (s.dtype, target) in (("F16", mx.float16), ("F32", mx.float32)):
            return mx.array(raw.view(_NP_DTYPES[s.dtype]).reshape(s.shape))
        if s.dtype == "BF16":
            values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.view(_NP_DTYPES[s.dtype]).astype(np.float32)
        values = values.reshape(s.shape)
        if target == mx.float32:
            return mx.array(values)
        if target == mx.float16:
            return mx.array(values.astype(np.float16))
        bits = values.view(np.uint32)  # float32 -> bfloat16 bits, rounding to nearest even
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return mx.array(np.where(np.isnan(values), 0x7FC0, rounded).astype(np.uint16))

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
