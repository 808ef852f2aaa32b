"""A ~1.5 GB float16 Mixtral-shaped random checkpoint in Hugging Face layout, for benchmarks.

hidden 1024, 8 layers, FFN 3584, 8 experts (top-2), 16 heads / 4 KV heads, vocab 32000:
~790M parameters in 4 shards, weights ~ N(0, 0.02), norms ~ 1 + N(0, 0.02), with the real
Mistral tokenizer.model. Written tensor by tensor with numpy + safetensors (one shard in memory
at a time). Reused when already complete.

    python -m benchmarks.make_checkpoint [DIR]      # prints the checkpoint's path
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "bench-out" / "mixtral-790m-f16"
CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}
DONE_MARKER = ".complete"


def tensor_shapes(config: dict = CONFIG) -> list[tuple[str, tuple[int, ...]]]:
    """HF Mixtral tensor names and shapes, in layer order."""
    H, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = H // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    shapes = [("model.embed_tokens.weight", (V, H))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (H,)),
            (f"{p}.self_attn.q_proj.weight", (H, H)),
            (f"{p}.self_attn.k_proj.weight", (kv, H)),
            (f"{p}.self_attn.v_proj.weight", (kv, H)),
            (f"{p}.self_attn.o_proj.weight", (H, H)),
            (f"{p}.post_attention_layernorm.weight", (H,)),
            (f"{p}.block_sparse_moe.gate.weight", (config["num_local_experts"], H)),
        ]
        for e in range(config["num_local_experts"]):
            x = f"{p}.block_sparse_moe.experts.{e}"
            shapes += [
                (f"{x}.w1.weight", (F, H)),
                (f"{x}.w2.weight", (H, F)),
                (f"{x}.w3.weight", (F, H)),
            ]
    shapes += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    return shapes


def make_checkpoint(path: Path = DEFAULT_DIR, *, shards: int = 4, seed: int = 0) -> Path:
    """Write (or reuse) the benchmark checkpoint at `path`; returns `path`."""
    from safetensors.numpy import save_file

    sys.path.insert(0, str(ROOT))

    path = Path(path)
    if (path / DONE_MARKER).exists():
        return path
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes()
    total = sum(int(np.prod(s)) * 2 for _, s in shapes)
    budget = total / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = int(np.prod(shape)) * 2
        if groups[-1] and size + nbytes > budget * 1.02 and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            x = rng.standard_normal(shape, dtype=np.float32) * 0.02
            if name.endswith("norm.weight"):
                x += 1.0
            tensors[name] = x.astype(np.float16)
            weight_map[name] = shard
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        del tensors
    return finish_checkpoint(path, weight_map, total, CONFIG)


def finish_checkpoint(path: Path, weight_map: dict[str, str], total: int, config: dict) -> Path:
    """After the shards: the index, config.json, the Mistral v1 tokenizer.model, and the marker
    that makes the checkpoint reusable. Returns `path`."""
    sys.path.insert(0, str(ROOT))
    from tests.checkpoints import mistral_tokenizer_file

    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(mistral_tokenizer_file("v1"), path / "tokenizer.model")
    (path / DONE_MARKER).touch()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_checkpoint(args.dir, seed=args.seed))


if __name__ == "__main__":
    main()
