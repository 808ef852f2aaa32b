"""Read a safetensors header: shapes, dtypes and byte ranges, without reading any tensor.

Kept free of MLX and mlx-lm imports: the quantizer and the expert offloader use it too.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

# Pickled checkpoint formats: refused, never opened (unpickling can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".ckpt")
# Floating-point dtypes as safetensors spells them (converted to the compute dtype on load).
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})


@dataclass
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: "F32", "BF16", "U32", ...
    nbytes: int
    offset: int = 0  # absolute byte offset of the data in its safetensors file


def read_safetensors_header(path: Path) -> dict[str, TensorSpec]:
    """Shapes, dtypes and byte ranges from a safetensors header, without reading any tensor;
    checks that the header is well-formed and the file is not truncated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path.name} is truncated or not a safetensors file")
            header_len = struct.unpack("<Q", raw)[0]
            if header_len > min(size - 8, 256 * 1024 * 1024):
                raise CheckpointError(f"{path.name} is truncated or not a safetensors file")
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is not a safetensors file (bad header)")
    header.pop("__metadata__", None)
    specs, end, base = {}, 0, 8 + header_len
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: malformed entry for tensor {name}") from None
        end = max(end, stop)
        specs[name] = TensorSpec(shape, dtype, stop - start, base + start)
    if base + end > size:
        raise CheckpointError(
            f"{path.name} is truncated: {size:,} bytes on disk, its header needs {base + end:,}"
        )
    return specs
