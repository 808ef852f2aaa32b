"""Prompt (prefill) speed on the CPU: MLX's kernels vs dequantize-once + numpy's BLAS (model/blas.py).

Part 1, the kernels, at Mixtral 8x7B's expert shape (one 4096 x 14336 projection, 4-bit,
group 64): MLX's `gather_qmm` for 1..64 rows, MLX's float32 matmul, numpy's float32 matmul,
and `blas.matmul_t` (dequantize + BLAS). Part 2, whole prompts on a 4-bit checkpoint (default:
the 790M benchmark model): time of a forward pass over N prompt tokens with model/blas.py's
route on and off (bench_small_prompt.route: every product in MLX's kernels), alternating, median
of --rounds; the logits of both must agree.

    python -m benchmarks.bench_prefill [--model bench-out/mixtral-790m-q4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks.bench_small_prompt import route
from model import blas

ROOT = Path(__file__).resolve().parent.parent


def best_of(fn, rounds: int = 3) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def kernels(rounds: int) -> None:
    H, F = 4096, 14336
    w = mx.random.normal((F, H)) * 0.02
    q, s, b = mx.quantize(w, group_size=64, bits=4)
    mx.eval(w, q, s, b)
    wn = np.array(w)
    print(f"one {F} x {H} projection ({F * H / 1e6:.1f}M weights), seconds (best of {rounds}):")
    print("| rows | MLX gather_qmm (4-bit) | MLX matmul (fp32) | numpy matmul (fp32) | "
          "blas.matmul_t (4-bit) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for rows in (1, 4, 16, 64, 256):
        print(kernel_row(rows, w, (q, s, b), wn, rounds))


def kernel_row(rows: int, w: mx.array, quantized: tuple, wn: np.ndarray, rounds: int) -> str:
    q, s, b = quantized
    x = mx.random.normal((rows, w.shape[1]))
    xn = np.array(x)
    inds = mx.zeros((rows,), dtype=mx.uint32)
    qmm = best_of(lambda: mx.eval(mx.gather_qmm(
        x[:, None], q[None], s[None], b[None], rhs_indices=inds, transpose=True,
        group_size=64, bits=4, sorted_indices=True)), rounds)  # fmt: skip
    mlx_mm = best_of(lambda: mx.eval(x @ w.T), rounds) if rows <= 64 else float("nan")
    np_mm = best_of(lambda: xn @ wn.T, rounds)
    ours = best_of(lambda: blas.matmul_t(xn, q, s, b, 64, 4), rounds)
    return f"| {rows} | {qmm:.3f} | {mlx_mm:.3f} | {np_mm:.3f} | {ours:.3f} |"


def prompts(model_path: Path, lengths: list[int], rounds: int) -> None:
    from model import load

    model, _ = load(model_path)
    rng = np.random.RandomState(0)
    print(f"\n{model_path.name}: forward pass over N prompt tokens, seconds (median of {rounds})")
    print("| prompt tokens | MLX kernels | dequantize once + BLAS | speed-up | max logit diff |")
    print("|---|---|---|---|---|")
    for n in lengths:
        ids = mx.array(rng.randint(3, 32000, size=(1, n)))
        times: dict[bool, list[float]] = {True: [], False: []}
        logits = {}
        for _ in range(rounds):
            for on in (False, True):
                route(on)
                start = time.perf_counter()
                out = model(ids, cache=model.make_cache())[:, -1]
                mx.eval(out)
                times[on].append(time.perf_counter() - start)
                logits[on] = np.array(out)
        route(True)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        diff = float(np.abs(logits[True] - logits[False]).max())
        print(f"| {n} | {off:.2f} | {on:.2f} | {off / on:.2f}x | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "bench-out" / "mixtral-790m-q4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lengths", default="10,64,256")
    parser.add_argument("--no-kernels", action="store_true")
    args = parser.parse_args()
    if not args.no_kernels:
        kernels(args.rounds)
    prompts(args.model, [int(n) for n in args.lengths.split(",")], args.rounds)


if __name__ == "__main__":
    main()
