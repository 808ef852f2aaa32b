"""Streaming experts under a memory budget: memory, hit rate, bytes read, decode tok/s vs bound.

The 4-bit Mixtral-shaped checkpoint of benchmarks/bench_decode.py (`mixtral-790m-q4`) runs with
a budget whose expert cache holds half of its expert bytes (resident weights + KV/activation
reserve + 50% of the experts), each configuration in a fresh process:

* peak RSS against the process's baseline (after imports, before loading) + the budget;
* expert cache hit rate, bytes read per decoded token, load vs compute time, decode tok/s;
* that tok/s as a share of the bound `mixchat info` predicts: min(memory bandwidth / bytes read
  per token, disk bandwidth / expert bytes missed per token), with the disk measured the way
  `info` measures it (O_DIRECT where available);
* eviction policies (LRU, LFU, global or per layer) and prefetch on/off, live, and replayed
  offline on the routing the unbudgeted run recorded, at several cache sizes.

Expert reads bypass the page cache (MIXCHAT_OFFLOAD_NOCACHE=1: evicted after each read with
posix_fadvise on Linux, F_NOCACHE on macOS), as on a machine whose memory cannot hold the file.
Greedy output must equal the unbudgeted run's; the table says so.

    python -m benchmarks.bench_offload [--max-tokens 48] [--share 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("lru", "lfu", "lru-layer", "lfu-layer")
PROMPT = "Explique la différence entre un modèle dense et un mélange d'experts, en trois phrases."


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def worker(path: str, budget: int, max_tokens: int, record: str | None) -> dict:
    """One measured generation in this (fresh) process."""
    import mlx.core as mx
    import numpy as np

    from model import Engine, GenerationSettings
    from model.offload import runtime_of

    baseline = rss_bytes()
    engine = Engine.load(path, memory_budget=budget or None)
    loaded = rss_bytes()
    routing: list[list[list[int]]] = []
    if record:

        def observe(counts: np.ndarray) -> None:
            routing.append([np.repeat(np.arange(c.size), c).tolist() for c in counts])

        engine.routing_observer = observe
    messages = [{"role": "user", "content": PROMPT}]
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0)
    start = time.perf_counter()
    chunks = list(engine.stream(messages, settings))
    elapsed = time.perf_counter() - start
    stats = chunks[-1].stats
    runtime = runtime_of(engine.model)
    if record:
        Path(record).write_text(json.dumps(routing))
    result = {
        "budget": budget,
        "text": "".join(c.text for c in chunks),
        "prompt_tokens": stats.prompt_tokens,
        "generation_tokens": stats.generation_tokens,
        "prompt_tps": stats.prompt_tps,
        "generation_tps": stats.generation_tps,
        "elapsed": elapsed,
        "expert_hit_rate": stats.expert_hit_rate,
        "bytes_read_per_token": stats.bytes_read_per_token,
        "load_seconds": stats.load_seconds,
        "compute_seconds": stats.compute_seconds,
        "baseline_rss": baseline,
        "loaded_rss": loaded,
        "peak_rss": peak_rss_bytes(),
        "peak_mlx": mx.get_peak_memory(),
        "policy": os.environ.get("MIXCHAT_OFFLOAD_POLICY", "lru"),
        "prefetch": os.environ.get("MIXCHAT_OFFLOAD_PREFETCH", "0") == "1",
    }
    if runtime is not None:
        c = runtime.snapshot()
        result |= {
            "cache_capacity": runtime.cache.capacity,
            "cache_peak": runtime.cache.peak,
            "prefetch_reads": c.prefetch_reads,
            "prefetch_hits": c.prefetch_hits,
            "wasted_prefetches": runtime.cache.wasted_prefetches,
        }
    return result


def run_worker(path: Path, budget: int, max_tokens: int, env: dict, record: str | None = None):
    cmd = [sys.executable, "-m", "benchmarks.bench_offload", "--worker", str(path), str(budget),
           str(max_tokens), record or "-"]  # fmt: skip
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def replay(routing_file: Path, plan, fractions=(0.25, 0.5, 0.75)) -> dict:
    """Hit rates of each policy on the recorded decode routing, at several cache sizes."""
    from model.offload import ExpertCache

    steps = json.loads(routing_file.read_text())
    layers = list(range(len(steps[0])))
    table = {}
    for fraction in fractions:
        capacity = int(plan.total_expert_bytes * fraction)
        for policy in POLICIES:
            cache = ExpertCache(capacity, policy, layers)
            hits = total = 0
            for step in steps:
                for layer, experts in enumerate(step):
                    for e in experts:
                        hits += cache.access((layer, e), plan.expert_bytes)
                        total += 1
            table[(fraction, policy)] = hits / total
    return table


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--share", type=float, default=0.5, help="share of expert bytes cached")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, budget, tokens, record = args.worker
        print(json.dumps(worker(path, int(budget), int(tokens), None if record == "-" else record)))
        return

    from benchmarks.bench_decode import convert
    from benchmarks.make_checkpoint import make_checkpoint
    from model import weights
    from model.budget import (
        expert_regions,
        measure_disk_bandwidth,
        measure_memory_bandwidth,
        memory_plan,
        predict,
    )

    src = make_checkpoint(args.out / "mixtral-790m-f16")
    path = convert(src, args.out / "mixtral-790m-q4", [])
    checkpoint = weights.locate(path)
    plan = memory_plan(checkpoint, weights.compute_dtype(checkpoint).size)
    budget = plan.resident_bytes + plan.reserve_bytes + int(plan.total_expert_bytes * args.share)
    print(
        f"checkpoint {path.name}: {mb(checkpoint.size_bytes)} on disk; in memory "
        f"{mb(plan.resident_bytes)} resident + {mb(plan.total_expert_bytes)} experts; reserve "
        f"{mb(plan.reserve_bytes)}; budget {mb(budget)} (cache {mb(plan.cache_bytes(budget))} = "
        f"{plan.cached_fraction(budget):.0%} of the experts; minimum {mb(plan.minimum_budget)})",
        file=sys.stderr,
    )
    disk_bw, disk_method = measure_disk_bandwidth(expert_regions(checkpoint))
    memory_bw, memory_method = measure_memory_bandwidth()
    prediction = predict(plan, budget, disk_bw, memory_bw)
    cold = {"MIXCHAT_OFFLOAD_NOCACHE": "1"}
    routing_file = args.out / "offload-routing.json"
    low = plan.minimum_budget  # top-k experts per layer: 25% of the experts for top-2 of 8
    share_low = f"{plan.cached_fraction(low):.0%}"
    configs = [("no budget", 0, {}, str(routing_file))]
    configs += [(p, budget, cold | {"MIXCHAT_OFFLOAD_POLICY": p}, None) for p in POLICIES]
    configs += [("lru + prefetch", budget, cold | {"MIXCHAT_OFFLOAD_PREFETCH": "1"}, None)]
    configs += [
        (f"{p}, {share_low} cached", low, cold | {"MIXCHAT_OFFLOAD_POLICY": p}, None)
        for p in POLICIES
    ]
    configs += [(f"lru + prefetch, {share_low} cached", low,
                 cold | {"MIXCHAT_OFFLOAD_PREFETCH": "1"}, None)]  # fmt: skip
    results: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for name, b, env, record in configs:
            r = run_worker(path, b, args.max_tokens, env, record if round_ == 0 else None)
            results.setdefault(name, []).append(r)
            print(f"round {round_ + 1}: {name:28} decode {r['generation_tps']:6.2f} tok/s  hit "
                  f"{r['expert_hit_rate'] or 0:.2f}", file=sys.stderr)  # fmt: skip

    def med(name: str, key: str) -> float:
        values = [r[key] for r in results[name] if r[key] is not None]
        return statistics.median(values) if values else float("nan")

    reference = results["no budget"][0]["text"]
    resident_tps = med("no budget", "generation_tps")
    print(f"\n{path.name}, {args.max_tokens} greedy tokens, budget {mb(budget)} "
          f"(expert cache {plan.cached_fraction(budget):.0%} of {mb(plan.total_expert_bytes)}); "
          f"disk {disk_bw / 1e9:.2f} GB/s ({disk_method}); memory {memory_bw / 1e9:.1f} GB/s "
          f"({memory_method})\n")  # fmt: skip
    print("| run | decode tok/s | bound tok/s | share of bound | hit rate | read/token | load s | "
          "compute s | peak RSS | baseline + budget | same tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, b, _, _ in configs:
        rs = results[name]
        tps = med(name, "generation_tps")
        peak = max(r["peak_rss"] for r in rs)
        base = min(r["baseline_rss"] for r in rs)
        bound = predict(plan, b or plan.full_bytes, disk_bw, memory_bw).tps
        hit = med(name, "expert_hit_rate")
        read = med(name, "bytes_read_per_token")
        same = all(r["text"] == reference for r in rs)
        limit = f"{mb(base + b)} ({(peak - base) / b:.0%} of budget)" if b else "—"
        load = f"{med(name, 'load_seconds'):.2f}" if b else "—"
        compute = f"{med(name, 'compute_seconds'):.2f}" if b else "—"
        hit_text = f"{hit:.0%}" if hit == hit else "—"
        read_text = mb(read) if read == read else "—"
        print(
            f"| {name} | {tps:.2f} | {bound:.1f} | {tps / bound:.0%} | {hit_text} | {read_text} | "
            f"{load} | {compute} | {mb(peak)} | {limit} | {'yes' if same else 'NO'} |"
        )
    p = prediction
    print(
        f"\nbound with the budget: min(memory {memory_bw / 1e9:.1f} GB/s / "
        f"{mb(p.memory_bytes_per_token)} per token = {p.memory_bound_tps:.1f}, disk "
        f"{disk_bw / 1e9:.2f} GB/s / {mb(p.disk_bytes_per_token)} missed per token = "
        f"{p.disk_bound_tps:.1f}) = {p.tps:.1f} tok/s (expected hit rate {p.expected_hit_rate:.0%})"
    )
    lru_read = med("lru", "bytes_read_per_token")
    serial = 1 / (1 / resident_tps + lru_read / disk_bw)
    print(
        f"serial estimate (compute at the unbudgeted speed, then read the misses, no overlap): "
        f"1 / (1/{resident_tps:.2f} + {mb(lru_read)}/{disk_bw / 1e9:.2f} GB/s) = {serial:.2f} tok/s;"
        f" measured LRU {med('lru', 'generation_tps'):.2f}"
    )
    for name in ("lru + prefetch", f"lru + prefetch, {share_low} cached"):
        pf = results[name][0]
        print(f"{name}: {pf['prefetch_reads']} prefetch reads, {pf['prefetch_hits']} demanded "
              f"before eviction, {pf['wasted_prefetches']} evicted unused")  # fmt: skip
    table = replay(routing_file, plan)
    fractions = sorted({f for f, _ in table})
    print("\nEviction policies replayed on the unbudgeted run's decode routing (hit rate):\n")
    print("| cache share | " + " | ".join(POLICIES) + " |")
    print("|---|" + "---|" * len(POLICIES))
    for f in fractions:
        print(f"| {f:.0%} | " + " | ".join(f"{table[(f, pol)]:.1%}" for pol in POLICIES) + " |")


if __name__ == "__main__":
    main()
