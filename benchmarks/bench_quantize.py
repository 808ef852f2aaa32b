"""Benchmark `mixchat quantize` against `mlx_lm convert` on the ~1.5 GB fp16 random Mixtral.

Each tool runs as a subprocess, alternating, several rounds; peak RSS comes from `os.wait4`
(that child's own max RSS), wall time from the clock. Then both 4-bit outputs are compared with
the source on the built-in multilingual text (mean KL(source || quantized), router agreement).

    .venv/bin/python -m benchmarks.bench_quantize [--rounds 3] [--no-kl]

Targets: peak RSS <= 40% of the source size; wall time <= 1.2x mlx_lm's; KL <= mlx_lm's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.make_checkpoint import DEFAULT_DIR, make_checkpoint  # noqa: E402


def mixchat_command(src: Path, dst: Path) -> list[str]:
    exe = Path(sys.executable).with_name("mixchat")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "quantize.cli"]
    return [*base, "quantize", str(src), str(dst), "--no-eval", "--quiet"]


def mlx_lm_command(src: Path, dst: Path, *extra: str) -> list[str]:
    """`mlx_lm.convert` to 4 bits with its defaults (plus `extra` options)."""
    return [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src),
            "--mlx-path", str(dst), "-q", *extra]  # fmt: skip


def measure(cmd: list[str], dst: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one run of `cmd` writing `dst` (removed first)."""
    shutil.rmtree(dst, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return wall, rss


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def kl_vs_source(src: Path, outputs: dict[str, Path]) -> dict[str, dict]:
    """The quality report's numbers for each output against the source."""
    from model import load
    from quantize.report import compare, eval_text, load_quantized, run_model

    results = {}
    model, tokenizer = load(src)
    ids = [tokenizer.bos_id, *tokenizer.encode(eval_text())]
    source = run_model(model, ids)
    del model
    for name, path in outputs.items():
        model, _ = load_quantized(path)
        results[name] = compare(ids, source, run_model(model, ids))
        del model
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-kl", action="store_true", help="skip the quality comparison")
    args = parser.parse_args()

    t = time.perf_counter()
    src = make_checkpoint(args.checkpoint)
    src_bytes = dir_size(src)
    print(f"checkpoint: {src} ({src_bytes / 1e9:.2f} GB, ready in {time.perf_counter() - t:.0f}s)")
    tools = {
        "mixchat quantize": (mixchat_command, args.out / "q4-mixchat"),
        "mlx_lm convert": (mlx_lm_command, args.out / "q4-mlx-lm"),
    }
    for name, (cmd, dst) in tools.items():
        print(f"{name}: {' '.join(cmd(src, dst))}")
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in tools}
    for r in range(args.rounds):
        order = list(tools) if r % 2 == 0 else list(reversed(tools))
        for name in order:
            cmd, dst = tools[name]
            runs[name].append(measure(cmd(src, dst), dst))
            wall, rss = runs[name][-1]
            print(f"  round {r + 1}: {name:17s} {wall:6.1f} s  peak RSS {rss / 1e6:7.0f} MB")

    quality = {} if args.no_kl else kl_vs_source(src, {n: d for n, (_, d) in tools.items()})
    print()
    print(
        "| tool | wall time (median) | peak RSS (max) | RSS / source | output | KL(source‖q) | router agreement |"
    )
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for name, (_, dst) in tools.items():
        wall = statistics.median(w for w, _ in runs[name])
        rss = max(r for _, r in runs[name])
        q = quality.get(name, {})
        kl = f"{q['kl_divergence']:.5f}" if q else "-"
        agree = (
            f"{q['router_agreement'] * 100:.1f}%" if q.get("router_agreement") is not None else "-"
        )
        summary[name] = (wall, rss, q.get("kl_divergence"))
        print(
            f"| {name} | {wall:.1f} s | {rss / 1e6:.0f} MB | {rss / src_bytes * 100:.1f}% "
            f"| {dir_size(dst) / 1e6:.0f} MB | {kl} | {agree} |"
        )
    ours, theirs = summary["mixchat quantize"], summary["mlx_lm convert"]
    print()
    print(f"source: {src_bytes / 1e9:.2f} GB fp16, {args.rounds} alternating rounds")
    print(
        f"peak RSS <= 40% of source: {ours[1] / src_bytes * 100:.1f}% -> {'PASS' if ours[1] <= 0.4 * src_bytes else 'FAIL'}"
    )
    print(
        f"wall time <= 1.2x mlx_lm: {ours[0] / theirs[0]:.2f}x -> {'PASS' if ours[0] <= 1.2 * theirs[0] else 'FAIL'}"
    )
    if quality:
        print(
            f"KL <= mlx_lm's: {ours[2]:.5f} vs {theirs[2]:.5f} -> {'PASS' if ours[2] <= theirs[2] else 'FAIL'}"
        )


if __name__ == "__main__":
    main()
