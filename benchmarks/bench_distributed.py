"""Two ranks (expert parallel, ring backend over 127.0.0.1) vs one process on the 4-bit
benchmark model (`mixtral-790m-q4` of benchmarks/bench_decode.py).

Each configuration runs in fresh processes, alternating, `--rounds` times. Reported: decode
tok/s (greedy; the two-rank text must equal one process's), bytes each rank sends per decoded
token (measured: the `wchar` delta of /proc/self/io over the decode steps, which counts socket
writes; predicted: `model.distributed.rank_plan`), peak RSS per rank.

Both ranks share this machine's 2 cores, so the two-rank tok/s is no prediction for two Macs;
the figures that transfer are the per-rank memory and the bytes per token.

    python -m benchmarks.bench_distributed [--max-tokens 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Explique la différence entre un modèle dense et un mélange d'experts, en 3 phrases."


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def sent_bytes() -> int:
    """Bytes this process has sent over TCP so far, all sockets (the ring's and the control
    channel's): tcpi_bytes_sent of Linux's TCP_INFO, per socket file descriptor."""
    total = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                if len(info) >= 208:
                    total += struct.unpack_from("<Q", info, 200)[0]  # tcpi_bytes_sent
        except OSError:
            pass
        finally:
            s.close()
    return total


def worker(path: str, max_tokens: int) -> dict:
    """One measured generation on this rank (or one process)."""
    from model import Engine, GenerationSettings, distributed

    if distributed.launched() and not distributed.world().leader:
        distributed.follow(path)
        return {"rank": distributed.world().rank, "peak_rss": peak_rss_bytes(),
                "sent": sent_bytes()}  # fmt: skip
    engine = Engine.load(path)
    loaded_peak = peak_rss_bytes()
    marks: list[int] = []
    engine.routing_observer = lambda counts: marks.append(sent_bytes())  # once per token
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0)
    chunks = list(engine.stream([{"role": "user", "content": PROMPT}], settings))
    stats = chunks[-1].stats
    per_token = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else 0.0
    return {
        "rank": 0,
        "text": "".join(c.text for c in chunks),
        "tps": stats.generation_tps,
        "tokens": stats.generation_tokens,
        "peak_rss": peak_rss_bytes(),
        "peak_rss_loaded": loaded_peak,
        "sent_per_token": per_token,
    }


def allsum_worker(hidden: int, repeats: int) -> dict:
    """Seconds per all_sum of one float32 [hidden] vector between the ranks, each evaluated
    before the next (as a decode step's MoE layers are: one after the other)."""
    import time

    import mlx.core as mx

    from model import distributed

    group = distributed.world().group
    x = mx.ones((1, hidden))
    for _ in range(20):  # warm-up
        mx.eval(mx.distributed.all_sum(x, group=group))
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(mx.distributed.all_sum(x, group=group))
    return {"rank": distributed.world().rank, "seconds": (time.perf_counter() - start) / repeats}


def free_port_pair() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        try:
            with socket.create_server(("127.0.0.1", base + 1)):
                return base
        except OSError:
            continue


def run(path: Path, max_tokens: int, ranks: int, allsum: int | None = None) -> list[dict]:
    cmd = [sys.executable, "-m", "benchmarks.bench_distributed", "--worker", str(path),
           str(max_tokens)]  # fmt: skip
    if allsum:
        cmd = [sys.executable, "-m", "benchmarks.bench_distributed", "--allsum", str(allsum)]
    envs = [dict(os.environ)]
    if ranks > 1:
        base = free_port_pair()
        hosts = Path(tempfile.mkdtemp()) / "ring.json"
        hosts.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(ranks)]))
        envs = [os.environ | {"MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)} for r in range(ranks)]
    procs = [subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE) for e in envs]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: exit codes {[p.returncode for p in procs]}")
    return [json.loads(o) for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--allsum", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allsum:
        print(json.dumps(allsum_worker(args.allsum, 500)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return

    from benchmarks.bench_decode import convert
    from benchmarks.make_checkpoint import make_checkpoint
    from model import distributed, weights
    from model.memory_plan import memory_plan

    src = make_checkpoint(args.out / "mixtral-790m-f16")
    path = convert(src, args.out / "mixtral-790m-q4", [])
    checkpoint = weights.locate(path)
    compute = weights.compute_dtype(checkpoint).size
    plan = memory_plan(checkpoint, compute)
    predicted = distributed.rank_plan(plan, checkpoint.args, 2, compute)
    results: dict[str, list] = {"1 process": [], "2 ranks": []}
    for _ in range(args.rounds):
        results["1 process"].append(run(path, args.max_tokens, 1))
        results["2 ranks"].append(run(path, args.max_tokens, 2))
    latency = statistics.median(
        max(r["seconds"] for r in run(path, 0, 2, checkpoint.args.hidden_size))
        for _ in range(args.rounds)
    )
    reference = results["1 process"][0][0]["text"]
    print("| run | decode tok/s | vs 1 process | sent per token (rank 0) | rank 0 peak RSS "
          "loaded / end | rank 1 peak RSS | same text |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    base = statistics.median(r[0]["tps"] for r in results["1 process"])
    for name, runs in results.items():
        tps = statistics.median(r[0]["tps"] for r in runs)
        sent = statistics.median(r[0]["sent_per_token"] for r in runs)
        rss0 = statistics.median(r[0]["peak_rss"] for r in runs)
        loaded0 = statistics.median(r[0]["peak_rss_loaded"] for r in runs)
        rss1 = statistics.median(r[1]["peak_rss"] for r in runs) if len(runs[0]) > 1 else None
        same = all(r[0]["text"] == reference for r in runs)
        print(
            f"| {name} | {tps:.2f} | {tps / base:.2f}x | {sent:,.0f} B | "
            f"{loaded0 / 1e9:.2f} / {rss0 / 1e9:.2f} GB | "
            f"{'-' if rss1 is None else f'{rss1 / 1e9:.2f} GB'} | {'yes' if same else 'NO'} |"
        )
    print(
        f"\npredicted per token and rank: {predicted.allsum_bytes_per_token:,} B in "
        f"{predicted.allsums_per_token} all_sums; per rank in memory "
        f"{predicted.resident_bytes / 1e9:.2f} GB replicated + "
        f"{predicted.expert_bytes / 1e9:.2f} GB experts (one process: "
        f"{plan.total_expert_bytes / 1e9:.2f} GB experts)"
    )
    print(f"one all_sum of a float32 [{checkpoint.args.hidden_size}] vector over 127.0.0.1: "
          f"{latency * 1e6:.0f} µs (median of {args.rounds} runs of 500)")  # fmt: skip
    for name, runs in results.items():
        for i, r in enumerate(runs):
            print(
                f"round {i + 1}: {name}: "
                + json.dumps([{k: v for k, v in x.items() if k != "text"} for x in r])
            )


if __name__ == "__main__":
    main()
