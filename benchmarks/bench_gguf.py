"""GGUF loading: load time and peak RSS of a Q4_K_M-mix GGUF of the ~790M benchmark shape
(benchmarks/make_checkpoint.py's: hidden 1024, 8 layers, FFN 3584, 8 experts, vocab 32000)
against its file size, and decode tok/s against the same weights as an MLX directory.

The GGUF is written with gguf-py from random blocks (tests/gguf_files.py; llama.cpp's Q4_K_M
choices: Q4_K, Q6_K output and half the ffn_down, Q8_0 attn_k/attn_v, F32 router and norms).
The MLX directory holds exactly the arrays mixchat converts the GGUF into. Each measurement is
a fresh process; baseline RSS is the process's after its imports, before loading.

    python -m benchmarks.bench_gguf [--rounds 3] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-out"
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
SHAPE = dict(hidden=1024, ffn=3584, layers=8, heads=16, kv_heads=4, experts=8)
Q4_K_M = {
    "embd": "Q4_K", "output": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q8_0", "attn_v": "Q8_0",
    "attn_output": "Q4_K", "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q4_K",
    **{f"ffn_down.{i}": "Q6_K" for i in range(0, 8, 2)},
}  # fmt: skip


def make_gguf(path: Path) -> Path:
    if not path.exists():
        from tests.gguf_files import tiny_mixtral_gguf

        tmp = path.with_suffix(".tmp.gguf")
        tiny_mixtral_gguf(tmp, Q4_K_M, with_values=False, **SHAPE)
        tmp.rename(path)
    return path


def make_mlx_dir(gguf: Path, out: Path) -> Path:
    """The arrays mixchat loads from the GGUF, saved as an MLX-quantized directory."""
    if (out / "config.json").exists():
        return out
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from model.weights import build_model, locate
    from tests.checkpoints import mistral_tokenizer_file

    checkpoint = locate(gguf)
    model = build_model(checkpoint)
    args = checkpoint.args
    quantization: dict = {"group_size": 32, "bits": 4, "mode": "affine"}
    for name, module in model.named_modules():
        if getattr(module, "bits", 4) != 4:
            quantization[name] = {"group_size": 32, "bits": module.bits}
    config = {
        "model_type": "mixtral", "vocab_size": args.vocab_size, "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size, "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads, "num_local_experts": 8,
        "num_experts_per_tok": 2, "rms_norm_eps": args.rms_norm_eps, "rope_theta": args.rope_theta,
        "rope_traditional": True, "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": False, "quantization": quantization,
    }  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
    shutil.copy(mistral_tokenizer_file("v1"), tmp / "tokenizer.model")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)
    return out


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(path: Path, max_tokens: int) -> dict:
    # Everything Engine.load imports counts in the baseline, not in the load.
    import gguf  # noqa: F401
    import jinja2  # noqa: F401
    import mlx.core as mx  # noqa: F401
    import mlx_lm.models.cache  # noqa: F401
    import mlx_lm.sample_utils  # noqa: F401
    import sentencepiece  # noqa: F401
    import tokenizers  # noqa: F401

    import model.generate  # noqa: F401
    import model.tokenizer  # noqa: F401
    import model.weights  # noqa: F401
    from model import Engine, GenerationSettings

    baseline = _rss()
    start = time.perf_counter()
    engine = Engine.load(str(path))
    load_seconds = time.perf_counter() - start
    peak_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0)
    stats = None
    for chunk in engine.stream_text(PROMPT, settings):
        stats = chunk.stats or stats
    return {
        "load_seconds": load_seconds,
        "baseline_rss": baseline,
        "peak_rss_load": peak_after_load,
        "decode_tps": stats.generation_tps,
        "tokens": stats.generation_tokens,
    }


def run_worker(path: Path, max_tokens: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gguf", "--worker", str(path),
         "--max-tokens", str(max_tokens)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.max_tokens)))
        return
    OUT.mkdir(exist_ok=True)
    gguf_path = make_gguf(OUT / "mixtral-790m-q4_k_m.gguf")
    mlx_dir = make_mlx_dir(gguf_path, OUT / "mixtral-790m-q4_k_m-mlx")
    file_size = gguf_path.stat().st_size
    runs: dict[str, list[dict]] = {"gguf": [], "mlx": []}
    for _ in range(args.rounds):
        for name, path in (("gguf", gguf_path), ("mlx", mlx_dir)):
            runs[name].append(run_worker(path, args.max_tokens))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    g, m = med["gguf"], med["mlx"]
    over = g["peak_rss_load"] - g["baseline_rss"]
    mlx_size = sum(f.stat().st_size for f in mlx_dir.glob("*.safetensors"))
    print(f"GGUF file {file_size / 1e6:.0f} MB; MLX directory {mlx_size / 1e6:.0f} MB "
          f"(medians of {args.rounds} fresh processes each)")  # fmt: skip
    print("| | load s | peak RSS − baseline | ÷ GGUF file | decode tok/s |")
    print("|---|---|---|---|---|")
    for name, r in (("GGUF", g), ("MLX dir", m)):
        extra = r["peak_rss_load"] - r["baseline_rss"]
        print(f"| {name} | {r['load_seconds']:.2f} | {extra / 1e6:.0f} MB | "
              f"{extra / file_size:.2f}× | {r['decode_tps']:.1f} |")  # fmt: skip
    print(f"GGUF vs MLX dir: load {g['load_seconds'] / m['load_seconds']:.2f}×, decode "
          f"{g['decode_tps'] / m['decode_tps']:.3f}×; baseline RSS {g['baseline_rss'] / 1e6:.0f} MB; "
          f"target peak ≤ 1.3× file + baseline: {'met' if over <= 1.3 * file_size else 'NOT met'} "
          f"({over / file_size:.2f}×)")  # fmt: skip


if __name__ == "__main__":
    main()
