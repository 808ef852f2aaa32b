"""Two ranks, expert parallel and pipeline (ring backend over 127.0.0.1), vs one process on
the 4-bit benchmark model (`mixtral-790m-q4` of benchmarks/bench_decode.py).

Each configuration runs in fresh processes, alternating, `--rounds` times. Reported: decode and
prompt tok/s (greedy; the two-rank text must equal one process's), bytes each rank sends per
decoded token (measured: tcpi_bytes_sent of every TCP socket of the process, between the
per-token stop checks of the decode steps; predicted: `model.distributed.rank_plan`), peak
RSS per rank, and the latency of one all_sum and of one send/recv hop of a [hidden] vector.

Both ranks share this machine's cores, so the two-rank tok/s is no prediction for two Macs;
the figures that transfer are the per-rank memory and the bytes per token.

    python -m benchmarks.bench_distributed [--model DIR] [--max-tokens 32] [--rounds 2]
    python -m benchmarks.bench_distributed --arithmetic /tmp/mixchat-bench/mixtral-8x7b-q4
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
PROMPT = " ".join(["Explique la différence entre un modèle dense et un mélange d'experts."] * 12
                  + ["Réponds en 3 phrases."])  # ~200 tokens: one prompt pass, long enough to time


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


def per_token_marks() -> list[int]:
    """Bytes sent so far, recorded at each per-token stop check of this process's decode (the
    ranks agree on stopping once per generated token: `generate.agree_stop`)."""
    from model import generate

    marks: list[int] = []
    agree = generate.agree_stop

    def marked(group, stop: bool) -> bool:
        marks.append(sent_bytes())
        return agree(group, stop)

    generate.agree_stop = marked  # the engine looks it up at each call
    return marks


def per_token(marks: list[int], tokens: int) -> float:
    """Bytes per decode step over the last `tokens` - 1 stop checks (one after each generated
    token but the last; the ones before are between prompt passes)."""
    marks = marks[-(tokens - 1) :]
    return (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else 0.0


def worker(path: str, max_tokens: int) -> dict:
    """One measured generation on this rank (or one process); the reply is expected to run to
    `max_tokens` (the random-weight model never says EOS: checked in the table's token count)."""
    from app.follower import follow
    from app.settings import read_settings
    from model import Engine, GenerationSettings, LoadOptions, distributed

    marks = per_token_marks()
    split = distributed.rank_split(read_settings().parallel)  # None: one process
    if split is not None and not split.world.leader:
        follow(path, LoadOptions(), split)
        return {"rank": distributed.world().rank, "peak_rss": peak_rss_bytes(),
                "sent_per_token": per_token(marks, max_tokens)}  # fmt: skip
    engine = Engine.load(path, split=split)
    loaded_peak = peak_rss_bytes()
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0)
    chunks = list(engine.stream([{"role": "user", "content": PROMPT}], settings))
    stats = chunks[-1].stats
    return {
        "rank": 0,
        "mode": distributed.world().mode if distributed.launched() else "one process",
        "text": "".join(c.text for c in chunks),
        "tps": stats.generation_tps,
        "prompt_tps": stats.prompt_tps,
        "prompt_tokens": stats.prompt_tokens,
        "tokens": stats.generation_tokens,
        "peak_rss": peak_rss_bytes(),
        "peak_rss_loaded": loaded_peak,
        "sent_per_token": per_token(marks, stats.generation_tokens),
    }


def latency_worker(hidden: int, repeats: int) -> dict:
    """Seconds per all_sum of one float32 [hidden] vector between the ranks, each evaluated
    before the next (as a decode step's MoE layers are: one after the other), and per hop of
    the same vector (send/recv there and back, halved: a pipeline's hand-over)."""
    import time

    import mlx.core as mx

    from model import distributed

    group = distributed.world().group
    rank = group.rank()
    x = mx.ones((1, hidden))

    def hop() -> None:
        if rank == 0:
            mx.eval(mx.distributed.send(x, 1, group=group))
            mx.eval(mx.distributed.recv(x.shape, x.dtype, 1, group=group))
        else:
            y = mx.distributed.recv(x.shape, x.dtype, 0, group=group)
            mx.eval(mx.distributed.send(y, 0, group=group))

    timings = {}
    for name, once in (("allsum", lambda: mx.eval(mx.distributed.all_sum(x, group=group))),
                       ("hop", hop)):  # fmt: skip
        for _ in range(20):  # warm-up
            once()
        start = time.perf_counter()
        for _ in range(repeats):
            once()
        timings[name] = (time.perf_counter() - start) / repeats
    timings["hop"] /= 2
    return {"rank": rank, **timings}


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


def run(path: Path, max_tokens: int, ranks: int, mode: str = "expert",
        latency: int | None = None) -> list[dict]:  # fmt: skip
    cmd = [sys.executable, "-m", "benchmarks.bench_distributed", "--worker", str(path),
           str(max_tokens)]  # fmt: skip
    if latency:
        cmd = [sys.executable, "-m", "benchmarks.bench_distributed", "--latency", str(latency)]
    envs = [dict(os.environ)]
    if ranks > 1:
        base = free_port_pair()
        hosts = Path(tempfile.mkdtemp()) / "ring.json"
        hosts.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(ranks)]))
        envs = [os.environ | {"MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts),
                              "MIXCHAT_PARALLEL": mode} for r in range(ranks)]  # fmt: skip
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


def arithmetic(path: Path, context: int = 8192, bandwidth: float = 100e9) -> None:
    """Two Macs on a full-size checkpoint (headers only: nothing is read), both modes: memory of
    the largest rank, bytes per token, and the tok/s bound over each link (`LINKS`), computing
    in bfloat16 (a Mac's GPU) at `bandwidth` bytes/s of memory."""
    from model import distributed, weights
    from model.distributed.hosts import critical_experts
    from model.memory_plan import memory_plan

    checkpoint = weights.locate(path)
    plan = memory_plan(checkpoint, 2, context)
    print(f"{path.name}, bfloat16 compute, {context:,}-token context, {bandwidth / 1e9:.0f} GB/s:")
    print("| mode | largest rank: weights + experts + KV/buffers = total | sent per token "
          "(busiest rank) | exchanges per token | read per token (critical path) | "
          + " | ".join(f"bound over {name}" for name, _, _ in distributed.LINKS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(distributed.LINKS))
    one = plan.resident_active_bytes + plan.moe_layers * plan.top_k * plan.expert_bytes
    print(f"| 1 machine | {plan.resident_bytes / 1e9:.2f} + {plan.total_expert_bytes / 1e9:.2f} + "
          f"{(plan.kv_bytes + plan.full_activation_bytes) / 1e9:.2f} = "
          f"{plan.full_bytes / 1e9:.2f} GB | 0 | 0 | {one / 1e9:.2f} GB | "
          + " | ".join(f"{bandwidth / one:.1f} tok/s" for _ in distributed.LINKS) + " |")
    for mode in ("expert", "pipeline"):
        rp = distributed.rank_plan(plan, checkpoint, 2, 2, mode)
        experts = critical_experts(plan.num_experts, plan.top_k, 2) if mode == "expert" \
            else plan.top_k  # fmt: skip
        read = plan.resident_active_bytes + int(plan.moe_layers * experts * plan.expert_bytes)
        bounds = []
        for _, link_bw, latency in distributed.LINKS:
            net = rp.network_seconds(link_bw, latency)
            bounds.append(f"{1 / (read / bandwidth + net):.1f} tok/s ({net * 1e3:.2f} ms net)")
        print(f"| {mode} ({rp.part}) | {rp.resident_bytes / 1e9:.2f} + "
              f"{rp.expert_bytes / 1e9:.2f} + {rp.reserve_bytes / 1e9:.2f} = "
              f"{rp.rank_bytes / 1e9:.2f} GB | {rp.sent_bytes_per_token:,} B | "
              f"{rp.exchanges_per_token} | {read / 1e9:.2f} GB | " + " | ".join(bounds) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a 4-bit MoE directory (default: built)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--arithmetic", type=Path, metavar="DIR",
                        help="only the two-Mac arithmetic for this full-size checkpoint")
    args = parser.parse_args()
    if args.arithmetic:
        arithmetic(args.arithmetic)
        return
    if args.latency:
        print(json.dumps(latency_worker(args.latency, 500)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return

    from model import distributed, weights
    from model.memory_plan import memory_plan

    path = args.model
    if path is None:
        from benchmarks.bench_decode import convert
        from benchmarks.make_checkpoint import make_checkpoint

        path = convert(make_checkpoint(args.out / "mixtral-790m-f16"), args.out / "mixtral-790m-q4", [])
    checkpoint = weights.locate(path)
    compute = weights.compute_dtype(checkpoint).size
    plan = memory_plan(checkpoint, compute)
    configs = {"1 process": (1, "expert"), "2 ranks, expert": (2, "expert"),
               "2 ranks, pipeline": (2, "pipeline")}  # fmt: skip
    results: dict[str, list] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (ranks, mode) in configs.items():
            results[name].append(run(path, args.max_tokens, ranks, mode))
    lat = [run(path, 0, 2, latency=checkpoint.args.hidden_size) for _ in range(args.rounds)]
    allsum = statistics.median(max(r["allsum"] for r in x) for x in lat)
    hop = statistics.median(max(r["hop"] for r in x) for x in lat)
    reference = results["1 process"][0][0]["text"]
    print("| run | decode tok/s | vs 1 process | prompt tok/s | vs 1 process | sent per token "
          "rank 0 / rank 1 | peak RSS rank 0 loaded / end | peak RSS rank 1 | same text |")
    print("|---|---|---|---|---|---|---|---|---|")
    med = statistics.median
    base = med(r[0]["tps"] for r in results["1 process"])
    base_prompt = med(r[0]["prompt_tps"] for r in results["1 process"])
    for name, runs in results.items():
        tps = med(r[0]["tps"] for r in runs)
        ptps = med(r[0]["prompt_tps"] for r in runs)
        sent = " / ".join(f"{med(r[i]['sent_per_token'] for r in runs):,.0f} B"
                          for i in range(len(runs[0])))  # fmt: skip
        rss0 = med(r[0]["peak_rss"] for r in runs)
        loaded0 = med(r[0]["peak_rss_loaded"] for r in runs)
        rss1 = med(r[1]["peak_rss"] for r in runs) if len(runs[0]) > 1 else None
        same = all(r[0]["text"] == reference for r in runs)
        print(
            f"| {name} | {tps:.2f} | {tps / base:.2f}x | {ptps:.1f} | {ptps / base_prompt:.2f}x "
            f"| {sent} | {loaded0 / 1e9:.2f} / {rss0 / 1e9:.2f} GB | "
            f"{'-' if rss1 is None else f'{rss1 / 1e9:.2f} GB'} | {'yes' if same else 'NO'} |"
        )
    print(f"\nprompt: {results['1 process'][0][0]['prompt_tokens']} tokens")
    for mode in ("expert", "pipeline"):
        p = distributed.rank_plan(plan, checkpoint, 2, compute, mode)
        print(
            f"predicted, {mode}: {p.sent_bytes_per_token:,} B sent per token by the busiest "
            f"rank in {p.exchanges_per_token} exchanges; the largest rank holds "
            f"{p.resident_bytes / 1e9:.3f} GB resident + {p.expert_bytes / 1e9:.3f} GB experts "
            f"(one process: {plan.resident_bytes / 1e9:.3f} + "
            f"{plan.total_expert_bytes / 1e9:.3f} GB)"
        )
    print(f"float32 [{checkpoint.args.hidden_size}] over 127.0.0.1: one all_sum {allsum * 1e6:.0f}"
          f" µs, one send/recv hop {hop * 1e6:.0f} µs (medians of {args.rounds} runs of 500)")
    for name, runs in results.items():
        for i, r in enumerate(runs):
            print(
                f"round {i + 1}: {name}: "
                + json.dumps([{k: v for k, v in x.items() if k != "text"} for x in r])
            )


if __name__ == "__main__":
    main()
