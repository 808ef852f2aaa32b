"""A random-weight checkpoint shaped as Llama Guard 3 1B, in the 4-bit MLX layout mixchat loads,
for measuring a guard model's cost (bench_moderation --guard-model). No Llama Guard weights are
available offline: its verdicts are random, so only its timings and memory mean anything.

Shape (Llama 3.2 1B, which Llama Guard 3 1B is): 16 layers, hidden 2048, 32 heads / 8 KV heads,
FFN 8192, vocab 128,256, tied embeddings, rope theta 500,000. Written as a float16 Hugging Face
Llama checkpoint (weights ~ N(0, 0.02), norms ~ 1), then quantized to 4 bits (group 64) by
mixchat's own quantizer (quantize/), as `mixchat quantize` does. The tokenizer is the Mistral v1
tokenizer.model the test suite uses (32,000 pieces; the embedding rows above it are never
used): it has "safe" and "unsafe" as distinct first tokens, but not Llama 3's header markers,
which it spells out in pieces (the guard prompt is some 40 tokens longer than with Llama 3's).

    python -m benchmarks.make_guard_checkpoint [DIR] [--tiny]   # prints the 4-bit checkpoint's path
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "bench-out" / "llama-guard-3-1b-random"
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}
TINY = {"vocab_size": 32000, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}  # fmt: skip
DONE_MARKER = ".complete"


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes (tied embeddings: no lm_head)."""
    H, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = [("model.embed_tokens.weight", (V, H))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (H,)),
            (f"{p}.self_attn.q_proj.weight", (q, H)),
            (f"{p}.self_attn.k_proj.weight", (kv, H)),
            (f"{p}.self_attn.v_proj.weight", (kv, H)),
            (f"{p}.self_attn.o_proj.weight", (H, q)),
            (f"{p}.post_attention_layernorm.weight", (H,)),
            (f"{p}.mlp.gate_proj.weight", (F, H)),
            (f"{p}.mlp.up_proj.weight", (F, H)),
            (f"{p}.mlp.down_proj.weight", (H, F)),
        ]
    return shapes + [("model.norm.weight", (H,))]


def write_hf(path: Path, config: dict, seed: int = 0) -> Path:
    """The float16 checkpoint, one shard per layer group (one shard in memory at a time)."""
    import json

    from safetensors.numpy import save_file

    sys.path.insert(0, str(ROOT))
    from tests.checkpoints import mistral_tokenizer_file

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(config)
    groups: list[list] = [[]]
    for name, shape in shapes:  # the embedding alone, then four layers a shard
        if name.endswith("layers.0.input_layernorm.weight") or (
            ".input_layernorm." in name and int(name.split(".")[2]) % 4 == 0
        ):
            groups.append([])
        groups[-1].append((name, shape))
    groups = [g for g in groups if g]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            x = rng.standard_normal(shape, dtype=np.float32) * 0.02
            if name.endswith("norm.weight"):
                x += 1.0
            tensors[name] = x.astype(np.float16)
            weight_map[name] = shard
            total += tensors[name].nbytes
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(mistral_tokenizer_file("v1"), path / "tokenizer.model")
    return path


def make_guard_checkpoint(path: Path = DEFAULT_DIR, *, tiny: bool = False, seed: int = 0) -> Path:
    """Write (or reuse) the 4-bit guard checkpoint at `path`; returns its path."""
    sys.path.insert(0, str(ROOT))
    from quantize.convert import Settings, convert
    from quantize.sources import open_source

    path = Path(path)
    if (path / DONE_MARKER).exists():
        return path
    config = CONFIG | (TINY if tiny else {})
    src = write_hf(path.with_name(path.name + "-f16"), config, seed)
    if path.exists():
        shutil.rmtree(path)
    convert(open_source(str(src)), path, Settings(bits=4, group_size=64), quiet=True)
    if not (path / "tokenizer.model").exists():
        shutil.copy(src / "tokenizer.model", path / "tokenizer.model")
    shutil.rmtree(src)  # 2.5 GB of float16 no longer needed
    (path / DONE_MARKER).touch()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", nargs="?", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="a small model of the same layout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    default = DEFAULT_DIR.with_name(DEFAULT_DIR.name + "-tiny") if args.tiny else DEFAULT_DIR
    print(make_guard_checkpoint(args.dir or default, tiny=args.tiny, seed=args.seed))


if __name__ == "__main__":
    main()
