"""Decode and prompt tok/s and peak memory: mixchat vs mlx-lm on the same 4-bit checkpoint.

The ~790M-parameter Mixtral-shaped random checkpoint (benchmarks/make_checkpoint.py) is
converted to 4 bits by `mlx_lm.convert` twice: its default (float16 scales, as a user gets it)
and `--dtype float32` (mlx-lm's best on a CPU). Each run is a fresh process; tools alternate
within each round; both are fed the same prompt token ids and timed the same way:
prompt tok/s = prompt tokens / time to first token, decode tok/s = (tokens - 1) / time after the
first token. The physical bound is memory bandwidth / bytes of weights read per decoded token.

    python -m benchmarks.bench_decode [--rounds 3] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_quantize import mlx_lm_command

ROOT = Path(__file__).resolve().parent.parent
PROMPT = (
    "Explique la différence entre un modèle dense et un mélange d'experts, puis donne trois "
    "exemples concrets en Python. Answer in English, with short paragraphs and a table. " * 2
)


def convert(src: Path, dst: Path, extra: list[str]) -> Path:
    if not (dst / "config.json").exists():
        if dst.exists():
            shutil.rmtree(dst)
        cmd = mlx_lm_command(src, dst, *extra)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        # transformers 5 no longer writes tokenizer.model; Mistral chat encoding needs it.
        shutil.copy(src / "tokenizer.model", dst / "tokenizer.model")
    return dst


def worker(tool: str, path: str, max_tokens: int, short: bool = False) -> dict:
    """One measured generation in this (fresh) process."""
    import mlx.core as mx

    from model import Engine, GenerationSettings
    from model.tokenizer import load_tokenizer

    messages = [{"role": "user", "content": "Bonjour !" if short else PROMPT}]
    streams = 1 if tool == "mixchat-1-stream" else None  # ablation: all on the default stream
    t_load = time.perf_counter()
    token_times = []
    if tool.startswith("mixchat"):
        engine = Engine.load(path, streams=streams)
        prompt = engine.tokenizer.encode_chat(messages)
        t_start = time.perf_counter()
        stream = engine.stream(messages, GenerationSettings(max_tokens=max_tokens, temperature=0))
        tokens = 0
        for chunk in stream:  # a chunk per token with text, then a final one with stats
            if getattr(chunk, "progress", None) is not None:
                continue  # the prompt being read (no token yet): timing it would count the
                # prompt as decode time and make the first token look early
            token_times.append(time.perf_counter())
            tokens = chunk.stats.generation_tokens if chunk.stats else tokens
    else:
        from mlx_lm import load, stream_generate

        prompt = load_tokenizer(Path(path)).encode_chat(messages)  # the ids mixchat feeds
        model, tokenizer = load(path)
        t_start = time.perf_counter()
        tokens = 0
        for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
            token_times.append(time.perf_counter())
            tokens = response.generation_tokens
    load_s = t_start - t_load
    first, last = token_times[0], token_times[-1]
    return {
        "tool": tool,
        "checkpoint": Path(path).name,
        "prompt_tokens": len(prompt),
        "prompt_tps": len(prompt) / (first - t_start),
        "generation_tokens": tokens,
        "generation_tps": (tokens - 1) / (last - first) if last > first else 0.0,
        "load_s": load_s,
        "peak_mlx_gb": mx.get_peak_memory() / 1e9,
        "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


BASELINE: Path | None = None  # --baseline: another checkout's code, timed as "mixchat-before"


def run_worker(tool: str, path: Path, max_tokens: int, short: bool = False) -> dict:
    """`tool`'s generation in a fresh process ("mixchat-before": the --baseline checkout's)."""
    root = BASELINE if tool == "mixchat-before" else ROOT
    # This file's worker either way (the same timing), over `root`'s code (PYTHONPATH).
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
           "mixchat" if tool == "mixchat-before" else tool, str(path),
           str(max_tokens)] + (["--short"] if short else [])  # fmt: skip
    out = subprocess.run(
        cmd,
        check=True,
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"tool": tool}


def memory_bandwidth_gbs(size_mb: int = 512) -> float:
    """Sustained copy bandwidth (bytes read + written per second), best of 5."""
    import numpy as np

    a = np.ones(size_mb * 2**20 // 8)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
    return best / 1e9


def bytes_per_token(path: Path) -> float:
    """Bytes of weights one decoded token reads, as loaded (float tensors become float32)."""
    from model import weights

    checkpoint = weights.locate(path)
    args = checkpoint.args
    share = args.num_experts_per_tok / args.num_local_experts if args.is_moe else 1.0
    total = 0.0
    for name, spec in checkpoint.tensors.items():
        size = spec.nbytes * (2 if spec.dtype in ("F16", "BF16") else 1)
        if name.startswith("model.embed_tokens.") and not args.tie_word_embeddings:
            size = size / args.vocab_size  # one row is read (a tied one is the LM head too)
        total += size * (share if ".switch_mlp." in name else 1)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--slow-tokens", type=int, default=4,
        help="tokens for mlx-lm on the float16-scale file (~0.15 tok/s; a short prompt); 0: skip",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--default-model", action="store_true",
                        help="also time the embedded default model, with one and two streams")
    parser.add_argument(
        "--worker", nargs=3, metavar=("TOOL", "PATH", "TOKENS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--short", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also time another checkout of mixchat (e.g. `git worktree add DIR "
                        "REV`) as mixchat-before, alternating with this one")  # fmt: skip
    args = parser.parse_args()
    if args.worker:
        tool, path, tokens = args.worker
        print(json.dumps(worker(tool, path, int(tokens), args.short)))
        return

    global BASELINE
    BASELINE = args.baseline
    from benchmarks.make_checkpoint import make_checkpoint

    src = make_checkpoint(args.out / "mixtral-790m-f16")
    q4_default = convert(src, args.out / "mixtral-790m-q4", [])
    q4_f32 = convert(src, args.out / "mixtral-790m-q4-f32", ["--dtype", "float32"])
    plan = [
        ("mixchat", q4_default, args.max_tokens),
        ("mlx-lm", q4_f32, args.max_tokens),
        ("mixchat", q4_f32, args.max_tokens),
        ("mixchat-1-stream", q4_default, args.max_tokens),
    ]
    if BASELINE:
        plan.insert(1, ("mixchat-before", q4_default, args.max_tokens))
    results = []
    for round_ in range(args.rounds):
        for tool, path, tokens in plan:
            result = run_worker(tool, path, tokens)
            results.append(result)
            print(
                f"round {round_ + 1}: {tool:16} {path.name:20} "
                f"prompt {result['prompt_tps']:6.2f} tok/s  decode {result['generation_tps']:6.2f} "
                f"tok/s  peak {result['peak_mlx_gb']:.2f} GB",
                file=sys.stderr,
            )
    if args.slow_tokens:  # a short prompt: mlx-lm's float16 CPU kernels are ~40x slower
        results.append(run_worker("mlx-lm", q4_default, args.slow_tokens, short=True))
    default_model = None
    if args.default_model:  # the embedded GGUF: mlx-lm does not run GGUF, so no peer row
        from model.registry import default_model_path

        default_model = default_model_path()
        for _ in range(args.rounds):
            for tool in ("mixchat", "mixchat-1-stream") + (("mixchat-before",) if BASELINE else ()):
                results.append(run_worker(tool, default_model, args.max_tokens))

    bandwidth = memory_bandwidth_gbs()
    per_token = bytes_per_token(q4_default)
    bound = bandwidth * 1e9 / per_token
    bounds = {q4_default.name: bound, q4_f32.name: bandwidth * 1e9 / bytes_per_token(q4_f32)}
    if default_model is not None:
        bounds[default_model.name] = bandwidth * 1e9 / bytes_per_token(default_model)

    def median(tool: str, ckpt: str, key: str) -> float:
        values = [r[key] for r in results if r["tool"] == tool and r["checkpoint"] == ckpt]
        return statistics.median(values)

    rows = [
        ("mixchat", q4_default.name),
        ("mixchat", q4_f32.name),
        ("mixchat-1-stream", q4_default.name),
        ("mlx-lm", q4_f32.name),
    ]
    if BASELINE:
        rows.insert(1, ("mixchat-before", q4_default.name))
    if args.slow_tokens:
        rows.append(("mlx-lm", q4_default.name))
    if default_model is not None:
        rows += [("mixchat", default_model.name), ("mixchat-1-stream", default_model.name)]
        if BASELINE:
            rows.append(("mixchat-before", default_model.name))
    best_peer = median("mlx-lm", q4_f32.name, "generation_tps")
    print(
        f"\nmemory bandwidth {bandwidth:.1f} GB/s; weights read per token "
        f"{per_token / 1e6:.0f} MB -> bound {bound:.1f} tok/s\n"
    )
    print(
        "| tool | checkpoint | prompt tok/s | decode tok/s | vs mlx-lm best | share of bound "
        "| peak MLX memory | max RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for tool, ckpt in rows:
        decode = median(tool, ckpt, "generation_tps")
        vs_peer = f"{decode / best_peer:.2f}x" if ckpt != getattr(default_model, "name", "") else "—"
        print(
            f"| {tool} | {ckpt} | {median(tool, ckpt, 'prompt_tps'):.2f} | {decode:.2f} | "
            f"{vs_peer} | {decode / bounds[ckpt]:.1%} | "
            f"{median(tool, ckpt, 'peak_mlx_gb'):.2f} GB | {median(tool, ckpt, 'max_rss_gb'):.2f} GB |"
        )
    (args.out / "bench_decode.json").write_text(
        json.dumps(
            {"results": results, "bandwidth_gbs": bandwidth, "bytes_per_token": per_token}, indent=1
        )
    )


if __name__ == "__main__":
    main()
