"""A Mixtral-8x7B-width random checkpoint with only 2 layers, in bfloat16 (~6.3 GB), HF layout.

Every tensor has its real 8x7B size (hidden 4096, FFN 14336, 8 experts top-2, 32 heads / 8 KV
heads, vocab 32000): one layer's experts are 2.8 GB in bf16, 5.6 GB in float32. Written tensor
by tensor straight into safetensors files (at most one tensor in memory, ~235 MB in float32),
with the real Mistral tokenizer.model. Never commit it; delete it when done.

    python -m benchmarks.make_wide_checkpoint [DIR]     # prints the checkpoint's path
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.make_checkpoint import (  # noqa: E402
    CONFIG,
    DONE_MARKER,
    finish_checkpoint,
    tensor_shapes,
)

DEFAULT_DIR = ROOT / "bench-out" / "mixtral-8x7b-width-2l-bf16"
WIDE_CONFIG = {
    **CONFIG,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 2,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "torch_dtype": "bfloat16",
}
MAX_SHARD_BYTES = 2_500_000_000


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    bits = x.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors:
            x = rng.standard_normal(shape, dtype=np.float32)
            x *= 0.02
            if name.endswith("norm.weight"):
                x += 1.0
            f.write(_bf16(x).tobytes())
            del x


def make_wide_checkpoint(path: Path = DEFAULT_DIR, *, seed: int = 0) -> Path:
    """Write (or reuse) the wide checkpoint at `path`; returns `path`."""

    path = Path(path)
    if (path / DONE_MARKER).exists():
        return path
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(WIDE_CONFIG):
        nbytes = int(np.prod(shape)) * 2
        if groups[-1] and size + nbytes > MAX_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_shard(path / shard, group, rng)
        for name, shape in group:
            weight_map[name] = shard
            total += int(np.prod(shape)) * 2
    finish_checkpoint(path, weight_map, total, WIDE_CONFIG)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_wide_checkpoint(args.dir, seed=args.seed))


if __name__ == "__main__":
    main()
