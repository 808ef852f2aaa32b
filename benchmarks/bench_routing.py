"""Expert-cache hit rate vs cached share on Mixtral-like routing, per policy, with bounds.

For Mixtral 8x7B (8 experts top-2, 32 layers) and 8x22B (8 experts top-2, 56 layers), and the
families' shapes (Qwen3-30B-A3B: 128 experts top-8, 48 layers; Qwen1.5-MoE: 60 top-4, 24;
OLMoE: 64 top-8, 16; `--models` picks some): a trace
from model/routing_trace.py (per-layer locality interpolating the published ranges) of one
prompt chunk then decoded tokens, replayed for caches holding 10%..90% of the experts under
each of mixchat's policies (lru, lfu, lru-layer, lfu-layer: per-layer ones get capacity //
layers experts per layer, as ExpertCache; next-use: evict what the forward pass reaches last;
auto, the default: next-use below top_k x layers experts, else lru), per-layer LRU with the remainder
spread over the layers (not in ExpertCache: what a balanced quota gives), "static" (pin
the most demanded experts of the whole trace), Belady's MIN (the upper bound on any policy),
and LRU and next-use on uniformly random routing (the no-locality reference).
Every access of the trace is counted, the prompt pass's cold reads included (< 0.3% of them).
It also prints the locality the traces measure against their targets, per-layer hit rates,
and how long `expected_hit_rate` takes on its first call (what `mixchat info` pays).

    python -m benchmarks.bench_routing [--decode-tokens 2048] [--prompt-tokens 512] [--seed 0]
        [--models "Mixtral 8x7B,Qwen3-30B-A3B"]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from model import routing_trace as rt

# (name, experts per layer, top-k, MoE layers): each family's own, as their config.json have them
MODELS = (
    ("Mixtral 8x7B", 8, 2, 32),
    ("Mixtral 8x22B", 8, 2, 56),
    ("Qwen3-30B-A3B", 128, 8, 48),
    ("Qwen1.5-MoE-A2.7B", 60, 4, 24),
    ("OLMoE-1B-7B", 64, 8, 16),
)
SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SPREAD = "lru-layer, spread"  # per-layer LRU whose quotas use the whole capacity
COLUMNS = (*rt.POLICIES, rt.AUTO_POLICY, SPREAD, "static", "belady")
RANDOM_COLUMNS = ("lru", "next-use")  # replayed on random routing too


def rate(trace: rt.Trace, policy: str, capacity: int) -> float | None:
    """Hit rate, or None where the runtime would refuse the cache (< top_k per layer)."""
    spread = policy == SPREAD
    policy = "lru-layer" if spread else policy
    if policy.endswith("-layer") and capacity // trace.num_layers < trace.top_k:
        return None
    return rt.replay(trace, policy, capacity, spread_quota=spread).hit_rate


def cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def first_call_ms(num_experts: int, top_k: int, num_layers: int) -> tuple[float, float]:
    """(wall, CPU) milliseconds of a first, uncached expected_hit_rate call."""
    rt._estimate_trace.cache_clear()
    rt._estimate.cache_clear()
    wall, cpu = time.perf_counter(), time.process_time()
    rt.expected_hit_rate(0.5, num_experts, top_k, num_layers)
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def bench_model(name: str, E: int, k: int, L: int, args) -> dict[str, list[float | None]]:
    trace = rt.generate_trace(E, k, L, args.decode_tokens, prompt_tokens=args.prompt_tokens,
                              prompt_chunk=args.prompt_tokens or 1, seed=args.seed)  # fmt: skip
    random_profile = [rt.random_locality(E, k)] * L
    random = rt.generate_trace(E, k, L, args.decode_tokens, prompt_tokens=args.prompt_tokens,
                               prompt_chunk=args.prompt_tokens or 1, seed=args.seed,
                               profile=random_profile)  # fmt: skip
    decoded = trace.routes[args.prompt_tokens :]
    measured = rt.measure_locality(decoded, E)
    targets = rt.default_profile(L, E, k)
    accesses = sum(len(s[2]) for s in rt.demand_steps(trace))
    print(f"\n### {name}: {E} experts top-{k}, {L} layers\n")
    print(f"Trace: {args.prompt_tokens}-token prompt in one pass, {args.decode_tokens} decoded "
          f"tokens, seed {args.seed}: {accesses:,} expert demands.\n")  # fmt: skip
    print("| layer | share >= 1 with previous (target) | same first (target) | load min–max |")
    print("|---|---|---|---|")
    for layer in (0, L // 2, L - 1):
        load = measured.load[layer]
        print(f"| {layer} | {measured.share[layer]:.1%} ({targets[layer].share:.1%}) | "
              f"{measured.same_first[layer]:.1%} ({targets[layer].same_first:.1%}) | "
              f"{load.min():.1%}–{load.max():.1%} |")  # fmt: skip
    rand = rt.measure_locality(random.routes[args.prompt_tokens :], E)
    print(f"| random routing, all layers | {rand.share.mean():.1%} | {rand.same_first.mean():.1%}"
          f" | {rand.load.min():.1%}–{rand.load.max():.1%} |\n")  # fmt: skip

    header = ["cached share", "experts", *COLUMNS, *(f"random: {c}" for c in RANDOM_COLUMNS)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    table: dict[str, list[float | None]] = {c: [] for c in COLUMNS}
    for share in SHARES:
        capacity = round(share * E * L)
        print(f"  {name}: {share:.0%} cached", file=sys.stderr)
        row = {c: rate(trace, c, capacity) for c in COLUMNS}
        for c in COLUMNS:
            table[c].append(row[c])
        quota = capacity // L
        experts = f"{capacity} ({quota}/layer = {quota / E:.1%})"
        cells = [cell(row[c]) for c in COLUMNS]
        cells += [cell(rate(random, c, capacity)) for c in RANDOM_COLUMNS]
        print(f"| {share:.0%} | {experts} | " + " | ".join(cells) + " |")

    capacity = round(0.5 * E * L)
    print(f"\nPer-layer hit rate at 50% cached ({capacity} experts):\n")
    print("| policy | layer 0 | layer " + str(L // 2) + f" | layer {L - 1} | all |")
    print("|---|---|---|---|---|")
    for policy in ("lru", "lru-layer", "next-use", "belady"):
        r = rt.replay(trace, policy, capacity)
        per = r.layer_hit_rates
        print(f"| {policy} | {per[0]:.1%} | {per[L // 2]:.1%} | {per[L - 1]:.1%} | "
              f"{r.hit_rate:.1%} |")  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-tokens", type=int, default=2048)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=",".join(m[0] for m in MODELS),
                        help="comma-separated names of MODELS (default: all)")  # fmt: skip
    args = parser.parse_args()
    wanted = [n.strip() for n in args.models.split(",")]
    unknown = [n for n in wanted if n not in {m[0] for m in MODELS}]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r} (known: {', '.join(m[0] for m in MODELS)})")
    models = [m for m in MODELS if m[0] in wanted]

    for name, E, k, L in models:
        runs = sorted(first_call_ms(E, k, L) for _ in range(5))
        wall, cpu = np.median([r[0] for r in runs]), np.median([r[1] for r in runs])
        print(f"`expected_hit_rate` first call (trace + replay), {name} shapes: median of 5 "
              f"{wall:.0f} ms wall, {cpu:.0f} ms CPU")  # fmt: skip
    totals: dict[str, list[float]] = {c: [] for c in COLUMNS}
    for name, E, k, L in models:
        table = bench_model(name, E, k, L, args)
        for c in COLUMNS:  # shares where every policy runs (per-layer ones need >= k/layer)
            totals[c] += [v for v, lru_layer in zip(table[c], table["lru-layer"]) if lru_layer]
    print("\nMean hit rate over the shares where every policy runs, all models above:\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    print("| " + " | ".join(f"{np.mean(totals[c]):.1%}" for c in COLUMNS) + " |")
    ranked = sorted(
        (*rt.POLICIES, rt.AUTO_POLICY, SPREAD), key=lambda c: -np.mean(totals[c])
    )
    print("\nCache policies by mean hit rate: " + ", ".join(
        f"{c} {np.mean(totals[c]):.1%}" for c in ranked))  # fmt: skip


if __name__ == "__main__":
    main()
