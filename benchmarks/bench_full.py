"""Mixtral 8x7B at full size under memory budgets: memory, prompt and decode cost, vs `info`.

On the full-size 8x7B-shaped 4-bit checkpoint of benchmarks/make_full_checkpoint.py (~26 GB,
written if missing; delete it when done), each configuration runs in a fresh process, with the
page cache dropped first (as root), so every expert read is a real disk read:

* no budget (what a new user types: the automatic budget when the model does not fit),
  --memory-budget 12GB and 7GB (a 16 GB and an 8 GB Mac less the OS);
* peak RSS against the budget; load time;
* a ~10-token and a ~200-token prompt: time to first token, expert bytes read per prompt token,
  against one read of the experts the prompt needs at the measured disk speed + 2 decode steps;
* a few greedy decode steps: tok/s and expert bytes read per token;
* `mixchat info`'s prediction for the same budget (measured kernels, disk and memory), next to
  the measured decode speed; greedy tokens compared across budgets.

    python -m benchmarks.bench_full [--model DIR] [--tokens 3] [--budgets auto,12GB,7GB]
    python -m benchmarks.bench_full --qwen3 [--budgets 8GB,12GB]  # Qwen3-30B-A3B-shaped

Works on any MLX-quantized Mixtral directory (e.g. the 790M benchmark model) with --model, and
on the families' (Qwen3-MoE, Qwen2-MoE, OLMoE: experts streamed the same way): `--qwen3` writes
(if missing) and runs benchmarks/make_qwen3_checkpoint.py's Qwen3-30B-A3B-shaped ~17 GB one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHORT = "Bonjour ! Comment vas-tu ?"  # ~10 tokens with the chat template
LONG = (
    "Voici un texte à résumer. Les modèles à mélange d'experts activent, pour chaque mot, "
    "seulement une petite partie de leurs paramètres : un routeur choisit deux experts parmi "
    "huit dans chaque couche. Cela rend le calcul par mot proche de celui d'un modèle dense "
    "bien plus petit, mais la mémoire doit toujours contenir tous les experts, car le choix "
    "change d'un mot à l'autre. Sur un ordinateur portable qui a moins de mémoire que le "
    "modèle, on peut garder en mémoire tout ce qui n'est pas un expert, et lire les experts "
    "depuis le disque au moment où le routeur les choisit, en gardant les plus utiles dans un "
    "cache. The cost is then dominated by the disk: each token may need dozens of experts of "
    "about a hundred megabytes each. Résume ce texte en deux phrases, en français, puis donne "
    "un titre en anglais."
)


def peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(path: str, budget: str, tokens: int, long_prompt: bool = True) -> dict:
    """One configuration, in this fresh process."""
    from app.settings import data_dir
    from model import Engine, GenerationSettings, weights
    from model.machine import CACHE_FILE, MeasurementCache
    from model.predict import fit_report
    from model.sizes import parse_budget

    baseline = rss()
    requested = None if budget == "default" else parse_budget(budget)
    checkpoint = weights.locate(Path(path))
    dtype = weights.compute_dtype(checkpoint)
    start = time.perf_counter()
    engine = Engine.load(path, memory_budget=requested)
    load_seconds = time.perf_counter() - start
    decision = engine.model.memory
    report = fit_report(
        checkpoint, dtype, decision.budget if decision.offload else None, None,
        decision.context, decision.plan.kv_bits,
        MeasurementCache(data_dir() / CACHE_FILE), False, weights.stream_count(),
    )  # fmt: skip
    result = {
        "budget": budget,
        "chosen_budget": decision.budget,
        "offload": decision.offload,
        "notice": engine.memory_notice,
        "context": decision.context,
        "baseline_rss": baseline,
        "load_seconds": load_seconds,
        "predicted_tps": report.prediction.tps,
        "predicted_bound": report.prediction.bound,
        "predicted_hit_rate": report.prediction.expected_hit_rate,
        "disk_bandwidth": report.disk_bandwidth.bytes_per_second if report.disk_bandwidth else None,
        "decode_timing": report.timing.as_dict(),
        "expert_disk_bytes": decision.plan.expert_disk_bytes,
        "cache_capacity": engine.offload.capacity if engine.offload else None,
    }
    prompts = [("short", SHORT, tokens)] + ([("long", LONG, 1)] if long_prompt else [])
    for name, prompt, max_tokens in prompts:
        engine.reset()
        ids: list[int] = []
        start = time.perf_counter()
        first = None
        chunks = []
        for chunk in engine.stream([{"role": "user", "content": prompt}],
                                   GenerationSettings(max_tokens=max_tokens, temperature=0.0)):  # fmt: skip
            if first is None:
                first = time.perf_counter() - start
            chunks.append(chunk)
        stats = chunks[-1].stats
        ids = engine._cache_tokens[stats.context_tokens - stats.generation_tokens :]
        result[name] = {
            "prompt_tokens": stats.prompt_tokens,
            "ttft": stats.prompt_tokens / stats.prompt_tps if stats.prompt_tps else first,
            "prompt_bytes_read_per_token": stats.prompt_bytes_read_per_token,
            "generation_tokens": stats.generation_tokens,
            "generation_tps": stats.generation_tps,
            "bytes_read_per_token": stats.bytes_read_per_token,
            "hit_rate": stats.expert_hit_rate,
            "load_seconds": stats.load_seconds,
            "compute_seconds": stats.compute_seconds,
            "tokens": ids,
            "text": "".join(c.text for c in chunks),
        }
    result["peak_rss"] = peak_rss()
    return result


def drop_page_cache() -> str:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "dropped"
    except OSError:
        return "not dropped (not root)"


def gb(n: float | None) -> str:
    return "—" if n is None else f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an MLX-quantized MoE directory")
    parser.add_argument("--qwen3", action="store_true",
                        help="the Qwen3-30B-A3B-shaped checkpoint (make_qwen3_checkpoint.py)")
    parser.add_argument("--tokens", type=int, default=3, help="greedy decode steps")
    parser.add_argument("--budgets", default="default,12GB,7GB")
    parser.add_argument("--no-long", action="store_true",
                        help="skip the ~200-token prompt (hours at full size on a slow CPU)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, budget, tokens, long_prompt = args.worker
        print(json.dumps(worker(path, budget, int(tokens), long_prompt == "1")))
        return
    if args.model is None and args.qwen3:
        from benchmarks.make_qwen3_checkpoint import make_qwen3_checkpoint

        args.model = make_qwen3_checkpoint()
    elif args.model is None:
        from benchmarks.make_full_checkpoint import make_full_checkpoint

        args.model = make_full_checkpoint()
    results = []
    for budget in args.budgets.split(","):
        cache = drop_page_cache()
        cmd = [sys.executable, "-m", "benchmarks.bench_full", "--worker", str(args.model),
               budget, str(args.tokens), "0" if args.no_long else "1"]  # fmt: skip
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        if out.returncode != 0:
            print(f"{budget}: exit {out.returncode}: {out.stderr.strip()[-500:]}", file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["wall"], r["page_cache"] = time.perf_counter() - start, cache
        results.append(r)
        print(f"{budget}: done in {r['wall']:.0f} s", file=sys.stderr)
    print(f"\n{args.model.name}: {args.tokens} greedy tokens; page cache dropped before each run\n")
    print("| budget | chosen | peak RSS (baseline) | RSS - baseline / budget | load s "
          "| short prompt: TTFT s | read/prompt token | long prompt: TTFT s | read/prompt token "
          "| decode tok/s | read/token | hit rate | info predicts | measured / predicted "
          "| same tokens |")
    print("|" + "---|" * 15)
    reference = results[0]["short"]["tokens"] if results else None
    for r in results:
        chosen = gb(r["chosen_budget"]) if r["offload"] else "everything resident"
        within = (
            f"{(r['peak_rss'] - r['baseline_rss']) / r['chosen_budget']:.0%}"
            if r["offload"] and r["chosen_budget"] else "—"
        )
        s = r["short"]
        long = r.get("long") or {"ttft": float("nan"), "prompt_tokens": 0,
                                 "prompt_bytes_read_per_token": None}  # fmt: skip
        ratio = s["generation_tps"] / r["predicted_tps"] if r["predicted_tps"] else float("nan")
        print(
            f"| {r['budget']} | {chosen} | {gb(r['peak_rss'])} ({gb(r['baseline_rss'])}) | "
            f"{within} | "
            f"{r['load_seconds']:.0f} | {s['ttft']:.1f} ({s['prompt_tokens']} tok) | "
            f"{gb(s['prompt_bytes_read_per_token'])} | {long['ttft']:.1f} "
            f"({long['prompt_tokens']} tok) | {gb(long['prompt_bytes_read_per_token'])} | "
            f"{s['generation_tps']:.3g} | {gb(s['bytes_read_per_token'])} | "
            f"{(s['hit_rate'] or 0):.0%} | {r['predicted_tps']:.2g} ({r['predicted_bound']}) | "
            f"{ratio:.2f} | {'yes' if s['tokens'] == reference else 'NO'} |"
        )
    for r in results:
        s = r["short"]
        if not r["offload"] or not r["disk_bandwidth"] or not s["generation_tps"]:
            continue
        read = s["prompt_bytes_read_per_token"] * s["prompt_tokens"]
        step = 1 / s["generation_tps"]
        print(
            f"\n{r['budget']}: the short prompt read {gb(read)} "
            f"({read / r['expert_disk_bytes']:.0f} experts) = {read / r['disk_bandwidth']:.1f} s "
            f"at the measured {r['disk_bandwidth'] / 1e9:.2f} GB/s; target TTFT <= that + 2 decode "
            f"steps = {read / r['disk_bandwidth'] + 2 * step:.1f} s; measured {s['ttft']:.1f} s. "
            f"Notice: {r['notice'] or '(none)'}"
        )
    print("\n" + json.dumps([{k: v for k, v in r.items() if k not in ("short", "long")}
                             for r in results], indent=None)[:4000])  # fmt: skip


if __name__ == "__main__":
    main()
