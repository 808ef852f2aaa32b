"""A full-size Mixtral-8x7B-shaped 4-bit checkpoint, written directly in MLX's packed layout.

32 layers, hidden 4096, FFN 14336, 8 experts (top-2), 32/8 heads, vocab 32000: ~26 GB in the
layout `mlx_lm.convert` writes (uint32-packed 4-bit weights, group 64, float16 scales and
biases, experts stacked per layer), with the router and norms in float16 and the real Mistral
v1 tokenizer.model. Weights are random bit patterns; scales are small and biases centre each
group, so activations stay finite through 32 layers. No float source is needed: one layer at a
time in memory (~0.8 GB), ~2 minutes on this machine. Never commit it; delete it when done.

    python -m benchmarks.make_full_checkpoint [DIR] [--layers N]   # prints the path
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.make_checkpoint import CONFIG as BENCH_CONFIG
from benchmarks.make_checkpoint import finish_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path("/tmp/mixchat-bench/mixtral-8x7b-q4")
BITS, GROUP = 4, 64
CONFIG = BENCH_CONFIG | {  # the 790M benchmark model's, at Mixtral 8x7B's real size
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "torch_dtype": "bfloat16",
    "quantization": {"group_size": GROUP, "bits": BITS},
}
DONE_MARKER = ".complete"


def quantized(rng: np.random.Generator, shape: tuple[int, ...], prefix: str) -> dict:
    """Packed weight [*, in*BITS/32] uint32 + float16 scales/biases [*, in/GROUP] for a
    [*, in] matrix: values (q - 7.5) * s with s ~ 0.02 / sqrt(in / 4096) ... as random floats
    of std ~ 0.02 would give after quantization."""
    *lead, n_in = shape
    weight = rng.integers(0, 2**32, size=(*lead, n_in * BITS // 32), dtype=np.uint32)
    scale = np.float16(0.02 * 2 / 7.5 * (4096 / n_in) ** 0.5)
    scales = np.full((*lead, n_in // GROUP), scale, dtype=np.float16)
    biases = np.full_like(scales, np.float16(-7.5) * scale)
    return {f"{prefix}.weight": weight, f"{prefix}.scales": scales, f"{prefix}.biases": biases}


def layer_tensors(rng: np.random.Generator, i: int, config: dict) -> dict:
    H, F, E = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    hd = H // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    p = f"model.layers.{i}"
    t: dict[str, np.ndarray] = {}
    for name, shape in (("q_proj", (H, H)), ("k_proj", (kv, H)), ("v_proj", (kv, H)),
                        ("o_proj", (H, H))):  # fmt: skip
        t |= quantized(rng, shape, f"{p}.self_attn.{name}")
    t[f"{p}.block_sparse_moe.gate.weight"] = (
        rng.standard_normal((E, H), dtype=np.float32) * 0.02
    ).astype(np.float16)
    for name, shape in (("gate_proj", (E, F, H)), ("up_proj", (E, F, H)),
                        ("down_proj", (E, H, F))):  # fmt: skip
        t |= quantized(rng, shape, f"{p}.block_sparse_moe.switch_mlp.{name}")
    for norm in ("input_layernorm", "post_attention_layernorm"):
        t[f"{p}.{norm}.weight"] = np.ones(H, dtype=np.float16)
    return t


def make_full_checkpoint(path: Path = DEFAULT_DIR, *, layers: int | None = None,
                         seed: int = 0) -> Path:  # fmt: skip
    """Write (or reuse) the checkpoint at `path`, one safetensors shard per layer."""
    sys.path.insert(0, str(ROOT))

    config = dict(CONFIG)
    if layers:
        config["num_hidden_layers"] = layers
    return write_packed_checkpoint(path, config, layer_tensors, seed)


def write_packed_checkpoint(path: Path, config: dict, layer: Callable, seed: int = 0) -> Path:
    """Write (or reuse) a packed checkpoint at `path`: one safetensors shard per layer
    (`layer(rng, i, config)`'s tensors), then the embedding, LM head and final norm; the
    config and index last (finish_checkpoint), so a half-written one is never reused."""
    from safetensors.numpy import save_file

    path = Path(path)
    if (path / DONE_MARKER).exists():
        return path
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n = config["num_hidden_layers"]
    H, V = config["hidden_size"], config["vocab_size"]
    shards = n + 1
    weight_map: dict[str, str] = {}
    total = 0

    def write(index: int, tensors: dict) -> None:
        nonlocal total
        shard = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(path / shard), metadata={"format": "mlx"})
        for name, a in tensors.items():
            weight_map[name] = shard
            total += a.nbytes

    for i in range(n):
        write(i, layer(rng, i, config))
        print(f"layer {i + 1}/{n}", file=sys.stderr, end="\r")
    outer = quantized(rng, (V, H), "model.embed_tokens") | quantized(rng, (V, H), "lm_head")
    outer["model.norm.weight"] = np.ones(H, dtype=np.float16)
    write(n, outer)
    finish_checkpoint(path, weight_map, total, config)
    print(file=sys.stderr)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--layers", type=int, help="fewer layers (for a quick try)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_full_checkpoint(args.dir, layers=args.layers, seed=args.seed))


if __name__ == "__main__":
    main()
