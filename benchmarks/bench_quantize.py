"""Benchmark `mixchat quantize` (with and without its quality report) against `mlx_lm convert`,
and `mixchat compare`, on the ~1.5 GB fp16 random Mixtral or any other checkpoint.

Each tool runs as a subprocess, alternating, several rounds; peak RSS comes from `os.wait4`
(that child's own max RSS), wall time from the clock. The report's numbers come from the
`quantization_report.json` mixchat writes; mlx_lm's output is measured by `mixchat compare`
(same streamed evaluation), whose own time and peak RSS are reported too.

    .venv/bin/python -m benchmarks.bench_quantize [--rounds 3] [--checkpoint DIR] [--no-mlx-lm]
    .venv/bin/python -m benchmarks.make_wide_checkpoint     # the Mixtral-8x7B-width source
    .venv/bin/python -m benchmarks.bench_quantize --rounds 1 --no-mlx-lm \
        --checkpoint bench-out/mixtral-8x7b-width-2l-bf16

Targets: peak RSS of quantize + report <= 40% of the source size; wall time of the conversion
<= 1.2x mlx_lm's; KL <= mlx_lm's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.make_checkpoint import DEFAULT_DIR, make_checkpoint  # noqa: E402


def _mixchat() -> list[str]:
    exe = Path(sys.executable).with_name("mixchat")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "quantize.cli"]


def mixchat_command(src: Path, dst: Path, *extra: str) -> list[str]:
    return [*_mixchat(), "quantize", str(src), str(dst), "--quiet", *extra]


def mlx_lm_command(src: Path, dst: Path, *extra: str) -> list[str]:
    """`mlx_lm.convert` to 4 bits with its defaults (plus `extra` options)."""
    return [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src),
            "--mlx-path", str(dst), "-q", *extra]  # fmt: skip


def measure(cmd: list[str], dst: Path | None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one run of `cmd` writing `dst` (removed first)."""
    if dst is not None:
        shutil.rmtree(dst, ignore_errors=True)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read().decode()}")
        rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return wall, rss, out.read().decode()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-mlx-lm", action="store_true", help="skip mlx_lm convert")
    args = parser.parse_args()

    t = time.perf_counter()
    src = make_checkpoint(args.checkpoint) if args.checkpoint == DEFAULT_DIR else args.checkpoint
    src_bytes = dir_size(src)
    print(f"checkpoint: {src} ({src_bytes / 1e9:.2f} GB, ready in {time.perf_counter() - t:.0f}s)")
    q_eval, q_mlx = args.out / "q4-mixchat", args.out / "q4-mlx-lm"
    q_plain = args.out / "q4-mixchat-no-eval"
    tools = {
        "mixchat quantize --no-eval": (mixchat_command(src, q_plain, "--no-eval"), q_plain),
        "mixchat quantize (+ report)": (mixchat_command(src, q_eval), q_eval),
    }
    if not args.no_mlx_lm:
        tools["mlx_lm convert"] = (mlx_lm_command(src, q_mlx), q_mlx)
    for name, (cmd, _) in tools.items():
        print(f"{name}: {' '.join(cmd)}")
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in tools}
    for r in range(args.rounds):
        order = list(tools) if r % 2 == 0 else list(reversed(tools))
        for name in order:
            cmd, dst = tools[name]
            wall, rss, _ = measure(cmd, dst)
            runs[name].append((wall, rss))
            print(f"  round {r + 1}: {name:28s} {wall:7.1f} s  peak RSS {rss / 1e6:7.0f} MB")
    report = json.loads((q_eval / "quantization_report.json").read_text())
    quality = {"mixchat quantize (+ report)": report}
    if not args.no_mlx_lm:
        cmd = [*_mixchat(), "compare", str(src), str(q_mlx), "--json", "--quiet"]
        print(f"mixchat compare: {' '.join(cmd)}")
        wall, rss, out = measure(cmd, None)
        runs["mixchat compare (src vs mlx_lm's)"] = [(wall, rss)]
        quality["mlx_lm convert"] = json.loads(out)
        print(f"  {'mixchat compare':28s} {wall:7.1f} s  peak RSS {rss / 1e6:7.0f} MB")

    print()
    print(
        "| run | wall time (median) | peak RSS (max) | RSS / source | KL(source‖q) | top-1 | router |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, values in runs.items():
        wall = statistics.median(w for w, _ in values)
        rss = max(r for _, r in values)
        q = quality.get(name, {})
        kl = f"{q['kl_divergence']:.5f}" if q else "-"
        top1 = f"{q['top1_agreement'] * 100:.1f}%" if q else "-"
        router = f"{q['router_agreement'] * 100:.1f}%" if q.get("router_agreement") else "-"
        print(
            f"| {name} | {wall:.1f} s | {rss / 1e6:.0f} MB | {rss / src_bytes * 100:.1f}% "
            f"| {kl} | {top1} | {router} |"
        )
    print()
    ours = runs["mixchat quantize (+ report)"]
    rss = max(r for _, r in ours)
    verdict = "PASS" if rss <= 0.4 * src_bytes else "FAIL"
    print(f"source: {src_bytes / 1e9:.2f} GB, {args.rounds} alternating rounds")
    print(f"quantize + report peak RSS <= 40% of source: {rss / src_bytes * 100:.1f}% -> {verdict}")
    if not args.no_mlx_lm:
        conv = statistics.median(w for w, _ in runs["mixchat quantize --no-eval"])
        theirs = statistics.median(w for w, _ in runs["mlx_lm convert"])
        full = statistics.median(w for w, _ in ours)
        print(
            f"conversion time vs mlx_lm: {conv / theirs:.2f}x; with the report {full / theirs:.2f}x"
        )
        mine, other = report["kl_divergence"], quality["mlx_lm convert"]["kl_divergence"]
        print(f"KL <= mlx_lm's: {mine:.5f} vs {other:.5f} -> {'PASS' if mine <= other else 'FAIL'}")


if __name__ == "__main__":
    main()
