"""Does the memory budget hold on this machine's MLX backend (an Apple GPU: Metal)? Peak memory
against --memory-budget while decoding.

Loads a model under the budget (the 4-bit Mixtral-8x7B-shaped checkpoint of
benchmarks/make_full_checkpoint.py by default, written first when missing), reads a prompt and
decodes N greedy tokens, sampling MLX's active and buffer-cache memory after every token, and
reports against the budget:
- MLX's peak (mx.get_peak_memory: the most its arrays held), during the load and the decode;
- the most MLX held at once while decoding: active + buffer cache (freed buffers MLX keeps,
  evicted experts among them: what model/device_limits.py bounds on Metal);
- the process's peak RSS (on a Mac, GPU buffers are unified memory and count in it);
- the limits set (wired, cache), decode tok/s, expert hit rate, bytes read per token.
It says which backend ran: on MLX's CPU backend nothing is set and the buffer cache stays
(nearly) empty, so only a Metal run tests the cache bound.

    python -m benchmarks.bench_metal_budget --memory-budget 12GB [--model DIR] [--tokens 32]
    python -m benchmarks.bench_metal_budget --memory-budget 1.5GB --layers 2   # a quick try
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

PROMPT = (
    "Explain the difference between a dense model and a mixture of experts, then give three "
    "concrete examples in Python."
)


def peak_rss() -> int:
    """The process's peak resident set, in bytes (ru_maxrss: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def backend() -> str:
    import mlx.core as mx

    info = mx.device_info()
    name = info.get("device_name") or info.get("architecture") or "?"
    if mx.metal.is_available():
        return f"Metal GPU ({name})"
    return f"{mx.default_device().type.name.upper()} ({name})"


def measure(model: str, budget: str, tokens: int, max_context: int | None) -> dict:
    import mlx.core as mx

    from model import Engine, GenerationSettings

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    engine = Engine.load(model, memory_budget=budget, max_context=max_context)
    load_s = time.perf_counter() - t0
    load_peak = mx.get_peak_memory()
    limits = getattr(engine.model, "device_limits", None)  # None: nothing set (not Metal)
    mx.reset_peak_memory()
    most_held = most_active = most_cache = 0
    final = None
    settings = GenerationSettings(max_tokens=tokens, temperature=0.0)
    for chunk in engine.stream_text(PROMPT, settings):
        active, cache = mx.get_active_memory(), mx.get_cache_memory()
        most_active, most_cache = max(most_active, active), max(most_cache, cache)
        most_held = max(most_held, active + cache)
        final = chunk.stats or final
    budget_bytes = engine.model.memory.budget
    stats = final.to_json() if final else {}
    return {
        "backend": backend(),
        "model": engine.name,
        "memory_budget": budget,
        "budget_bytes": budget_bytes,  # None: no budget (everything resident)
        "experts_stream": engine.offload is not None,
        "context": engine.context_length,
        "memory_notice": engine.memory_notice,
        "wired_limit": limits.wired_limit if limits else None,
        "cache_limit": limits.cache_limit if limits else None,
        "working_set": limits.working_set if limits else None,
        "load_s": round(load_s, 2),
        "load_peak": load_peak,
        "decode_peak": mx.get_peak_memory(),
        "decode_most_active": most_active,
        "decode_most_cache": most_cache,
        "decode_most_held": most_held,
        "peak_rss": peak_rss(),
        "prompt_tokens": stats.get("prompt_tokens_prefilled"),
        "tokens": stats.get("generation_tokens"),
        "decode_tps": stats.get("generation_tps"),
        "expert_hit_rate": stats.get("expert_hit_rate"),
        "bytes_read_per_token": stats.get("bytes_read_per_token"),
    }


def report(r: dict) -> str:
    from model.sizes import format_bytes

    budget = r["budget_bytes"]

    def against(n: int | None) -> str:
        if n is None or not budget:
            return "-" if n is None else format_bytes(n)
        return f"{format_bytes(n)} ({n / budget:.0%} of the budget)"

    limits = (
        f"wired {format_bytes(r['wired_limit'])} (of a {format_bytes(r['working_set'])} "
        f"working set), buffer cache "
        + (format_bytes(r["cache_limit"]) if r["cache_limit"] is not None else "not bounded")
        if r["wired_limit"] is not None
        else "none set (not a Metal GPU)"
    )
    held = r["decode_most_held"]
    if not budget:
        verdict = "no budget"
    elif held <= budget:
        verdict = "within the budget"
    else:
        verdict = f"OVER the budget by {format_bytes(held - budget)}"
    hit = r["expert_hit_rate"]
    read = r["bytes_read_per_token"]
    lines = [
        f"backend: {r['backend']}",
        f"model: {r['model']}, --memory-budget {r['memory_budget']}"
        f"{f' = {format_bytes(budget)}' if budget else ' (everything resident)'}, "
        f"experts {'stream' if r['experts_stream'] else 'resident'}, context {r['context']:,}",
        f"limits: {limits}",
        f"load: {r['load_s']} s, MLX peak {against(r['load_peak'])}",
        f"decode: {r['tokens']} tokens after a {r['prompt_tokens']}-token prompt, "
        f"{r['decode_tps'] or 0:.2f} tok/s"
        + (f", hit rate {hit:.0%}" if hit is not None else "")
        + (f", {format_bytes(read)} read per token" if read is not None else ""),
        f"decode MLX peak (active): {against(r['decode_peak'])}",
        f"decode most held (active + cache): {against(held)}, of it cache at most "
        f"{format_bytes(r['decode_most_cache'])}: {verdict}",
        f"process peak RSS: {against(r['peak_rss'])}",
    ]
    if r["memory_notice"]:
        lines.append(f"notice: {r['memory_notice']}")
    return "\n".join(lines)


def main() -> None:
    from benchmarks.make_full_checkpoint import DEFAULT_DIR, make_full_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", help=f"a checkpoint (default: {DEFAULT_DIR}, written if missing)"
    )
    parser.add_argument("--memory-budget", required=True, help="e.g. 12GB, auto, none")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to decode (default 32)")
    parser.add_argument("--max-context", type=int, help="tokens the KV cache is planned for")
    parser.add_argument("--layers", type=int,
                        help="the default checkpoint with fewer layers (a quick try)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object instead")
    args = parser.parse_args()
    model = args.model
    if model is None:
        where = DEFAULT_DIR if args.layers is None else DEFAULT_DIR.with_name(
            f"{DEFAULT_DIR.name}-{args.layers}l"
        )  # fmt: skip
        model = str(make_full_checkpoint(where, layers=args.layers))
    from model.errors import MixchatError

    try:
        result = measure(model, args.memory_budget, args.tokens, args.max_context)
    except MixchatError as e:
        sys.exit(f"bench_metal_budget: {e}")
    print(json.dumps(result) if args.json else report(result))


if __name__ == "__main__":
    main()
