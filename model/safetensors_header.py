"""Read a safetensors header: shapes, dtypes and byte ranges, without reading any tensor.

Kept free of MLX and mlx-lm imports: the quantizer and the expert offloader use it too.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
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


# FLOAT_DTYPES with each one's MLX dtype name and bytes per element.
SAFETENSORS_FLOATS = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}
_SHARD_NAME = re.compile(r"^(.*)-(\d+)-of-(\d+)\.safetensors$")


def safetensors_shards(path: Path, prefix: str = "model") -> list[Path]:
    """The safetensors files of the checkpoint directory `path` (the one shard discovery of
    loader, offloader and quantizer): `{prefix}.safetensors.index.json`'s weight_map when there
    is one, else `{prefix}*.safetensors` (for "model", any non-consolidated *.safetensors if
    none). Every listed file and every part of a `-0000i-of-0000n` series must exist."""
    index = path / f"{prefix}.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index.name} is unreadable or has no weight_map") from None
    else:
        names = sorted(p.name for p in path.glob(f"{prefix}*.safetensors"))
        if not names and prefix == "model":
            names = sorted(
                p.name for p in path.glob("*.safetensors") if not p.name.startswith("consolidated")
            )
        for m in [_SHARD_NAME.match(n) for n in names]:  # "model-00002-of-00004": all 4 parts
            if m:
                head, width, total = m.group(1), len(m.group(2)), m.group(3)
                names += [
                    f"{head}-{i:0{width}d}-of-{total}.safetensors" for i in range(1, int(total) + 1)
                ]
        names = sorted(set(names))
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing shard {missing[0]}{more} in {path}")
    return [path / n for n in names]


def dominant_dtype(specs: Iterable[TensorSpec]) -> str | None:
    """The floating dtype ("BF16", "F16", "F32") holding the most bytes; None if none."""
    by_dtype: dict[str, int] = {}
    for spec in specs:
        if spec.dtype in FLOAT_DTYPES:
            by_dtype[spec.dtype] = by_dtype.get(spec.dtype, 0) + spec.nbytes
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else None
