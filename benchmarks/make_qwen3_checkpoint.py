"""A full-size Qwen3-30B-A3B-shaped 4-bit checkpoint, written directly in MLX's packed layout.

48 layers, hidden 2048, 32 query / 4 KV heads of 128 (q/k norms), 128 experts top-8 (normalised)
of width 768 per layer, vocab 151,936, untied LM head: ~17 GB in the layout mlx-community's
Qwen3-30B-A3B-4bit has (uint32-packed 4-bit weights, group 64, float16 scales and biases, experts
stacked per layer under `mlp.switch_mlp`, its config.json), with the router (`mlp.gate`) and
norms in float16. Weights are random bit patterns (as benchmarks/make_full_checkpoint.py writes
Mixtral's). The tokenizer is the real Mistral v1 tokenizer.model (32,000 pieces, bos 1 / eos 2,
set so in config.json): the embedding keeps Qwen3's 151,936 rows, so every tensor has the real
shape; ids past the tokenizer's pieces decode as nothing. One layer at a time in memory
(~0.4 GB). Never commit it; delete it when done.

    python -m benchmarks.make_qwen3_checkpoint [DIR] [--layers N]   # prints the path
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.make_full_checkpoint import BITS, GROUP, quantized, write_packed_checkpoint

DEFAULT_DIR = Path("/tmp/mixchat-bench/qwen3-30b-a3b-q4")
CONFIG = {  # mlx-community/Qwen3-30B-A3B-4bit's config.json (token ids: the tokenizer's)
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "decoder_sparse_step": 1,
    "eos_token_id": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "quantization": {"group_size": GROUP, "bits": BITS},
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def layer_tensors(rng: np.random.Generator, i: int, config: dict) -> dict:
    H, F, E = config["hidden_size"], config["moe_intermediate_size"], config["num_experts"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    p = f"model.layers.{i}"
    t: dict[str, np.ndarray] = {}
    for name, shape in (("q_proj", (q, H)), ("k_proj", (kv, H)), ("v_proj", (kv, H)),
                        ("o_proj", (H, q))):  # fmt: skip
        t |= quantized(rng, shape, f"{p}.self_attn.{name}")
    for norm in ("q_norm", "k_norm"):
        t[f"{p}.self_attn.{norm}.weight"] = np.ones(hd, dtype=np.float16)
    t[f"{p}.mlp.gate.weight"] = (rng.standard_normal((E, H), dtype=np.float32) * 0.02).astype(
        np.float16
    )
    for name, shape in (("gate_proj", (E, F, H)), ("up_proj", (E, F, H)),
                        ("down_proj", (E, H, F))):  # fmt: skip
        t |= quantized(rng, shape, f"{p}.mlp.switch_mlp.{name}")
    for norm in ("input_layernorm", "post_attention_layernorm"):
        t[f"{p}.{norm}.weight"] = np.ones(H, dtype=np.float16)
    return t


def make_qwen3_checkpoint(path: Path = DEFAULT_DIR, *, layers: int | None = None,
                          seed: int = 0) -> Path:  # fmt: skip
    """Write (or reuse) the checkpoint at `path`, one safetensors shard per layer."""
    config = dict(CONFIG)
    if layers:
        config["num_hidden_layers"] = config["max_window_layers"] = layers
    return write_packed_checkpoint(path, config, layer_tensors, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--layers", type=int, help="fewer layers (for a quick try)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_qwen3_checkpoint(args.dir, layers=args.layers, seed=args.seed))


if __name__ == "__main__":
    main()
