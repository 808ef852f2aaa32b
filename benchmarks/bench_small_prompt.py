"""Prompt and decode speed of the default model (SmolLM2-135M, Q4_1 GGUF) on the CPU: MLX's
kernels only (before) vs model/blas.py's route for small models (after), in one process.

The engine reads a ~2,000-token prompt the way `mixchat ask` does (Engine.stream: prompt
passes sized to about a second, then greedy decode) with the route on and off, alternating
(after, before, after, ...); every run starts from an empty KV cache (a different first
word). The bound is numpy's float32 BLAS speed measured in the same run (1024 x 1024 matmul)
(on one thread, as model/blas.py runs it) divided by the floating-point work of a prompt token: 2 x the layers' weights, plus the
attention scores and values over the average context.

    python -m benchmarks.bench_small_prompt [--rounds 1] [--prompt-tokens 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from model import blas
from model.generate import Engine, GenerationSettings

PARAGRAPH = (
    "The harbour town woke slowly: fishing boats came back with the tide, the bakery opened "
    "its shutters, and children ran along the quay to watch the gulls fight over scraps. "
)


def gflops(multiply, rounds: int = 3) -> float:
    """GFLOP/s of a 1024 x 1024 float32 product (best of `rounds`)."""
    best = float("inf")
    for _ in range(rounds + 1):
        start = time.perf_counter()
        multiply()
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best / 1e9


def measure_bounds() -> tuple[float, float]:
    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    am = mx.array(a)
    return gflops(lambda: a @ a), gflops(lambda: mx.eval(am @ am))


def flops_per_prompt_token(engine: Engine, tokens: int) -> float:
    """Projections (2 x weights per layer) + attention (q.k and p.v over the mean context)."""
    args = engine.model.args
    heads, kv, d, h = (args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                       args.hidden_size)  # fmt: skip
    experts = args.num_experts_per_tok if args.is_moe else 1
    weights = h * d * (2 * heads + 2 * kv) + 3 * h * args.intermediate_size * experts
    return args.num_hidden_layers * (2 * weights + 4 * heads * d * tokens / 2)


def prompt_messages(engine: Engine, run: int, tokens: int) -> list[dict]:
    """A user message of about `tokens` tokens whose first word differs per run."""
    ids = engine.tokenizer.encode(PARAGRAPH * (tokens // 20))
    text = f"Run {run}. " + engine.tokenizer.decode(ids[: tokens - 40])
    return [{"role": "user", "content": text + "\nSummarise this in one sentence."}]


def run_once(engine: Engine, messages: list[dict], max_tokens: int):
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0)
    stats = None
    for chunk in engine.stream(messages, settings):
        stats = chunk.stats or stats
    return stats


def route(on: bool) -> None:
    """model/blas.py's route on (after) or off (before: every product in MLX's kernels)."""
    blas.applies, blas.attention_applies = _ROUTE if on else (_OFF, _OFF)


_ROUTE = (blas.applies, blas.attention_applies)


def _OFF(*_args) -> bool:
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=1, help="before runs (after: one more; 0: after only)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=33)
    args = parser.parse_args()
    engine = Engine.load()
    blas.one_blas_thread()  # the bound on the BLAS the route runs on
    np_gflops, mlx_gflops = measure_bounds()
    results: dict[bool, list] = {True: [], False: []}
    order = [True] + [on for _ in range(args.rounds) for on in (False, True)]
    for run, on in enumerate(order):
        route(on)
        stats = run_once(engine, prompt_messages(engine, run, args.prompt_tokens), args.max_tokens)
        results[on].append(stats)
        print(f"run {run} ({'after' if on else 'before'}): {stats.prompt_tokens} prompt tokens "
              f"{stats.prompt_tps:.1f} tok/s, decode {stats.generation_tps:.1f} tok/s", flush=True)  # fmt: skip
    route(True)
    np_after, mlx_after = measure_bounds()
    tokens = max(s.prompt_tokens for s in results[True])
    bound = min(np_gflops, np_after) * 1e9 / flops_per_prompt_token(engine, tokens)
    print(f"\nnumpy BLAS {np_gflops:.0f} / {np_after:.0f} GFLOP/s, MLX matmul {mlx_gflops:.1f} / "
          f"{mlx_after:.1f} GFLOP/s (1024 x 1024 float32, before / after the runs)")  # fmt: skip
    print(
        f"bound at numpy's BLAS speed: {bound:.0f} prompt tok/s "
        f"({flops_per_prompt_token(engine, tokens) / 1e6:.0f} MFLOP a token)\n"
    )
    print(
        "| route | prompt tokens (each run) | prompt tok/s (median) | of the bound | decode tok/s (median) |"
    )
    print("|---|---|---|---|---|")
    for on in (on for on in (False, True) if results[on]):
        prompt = statistics.median(s.prompt_tps for s in results[on])
        decode = statistics.median(s.generation_tps for s in results[on])
        tokens = "/".join(str(s.prompt_tokens) for s in results[on])
        name = "after: model/blas.py" if on else "before: MLX's kernels"
        print(f"| {name} | {tokens} | {prompt:.1f} | {prompt / bound:.0%} | {decode:.1f} |")


if __name__ == "__main__":
    main()
