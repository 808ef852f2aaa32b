"""Moderation: precision and recall of each guard and of the policy combining them, on the
labelled set (tests/data/moderation_set.jsonl: 5 languages, harmful texts per category and
harmless look-alikes), latency per checked message, and the lexical guard's overhead on a
streamed reply checked in sentence windows.

Guards: lexical (the offline default), self-check (the chat model classifying the text:
--model, default the embedded SmolLM2-135M), and a Llama Guard 3 checkpoint with
--guard-model (none ships offline: benchmarks/make_guard_checkpoint.py writes a random one of
Llama Guard 3 1B's shape, for its timings and memory only; pass --unchecked-guard to skip the
check that it answers safe/unsafe, which random weights fail). With a guard model the streamed
reply is also measured with it on reply windows (ReplyGuard's interval), and its RSS reported.

    python -m benchmarks.bench_moderation [--split heldout] [--model M] [--guard-model M]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from app.moderation.lexical import LexicalGuard
from app.moderation.policy import Policy

ROOT = Path(__file__).resolve().parent.parent
SET = ROOT / "tests" / "data" / "moderation_set.jsonl"
REPLY_PROMPT = ("Write a short story, in about ten sentences, about a cook who opens a small "
                "restaurant by the sea.")  # fmt: skip


def figures(rows: list[dict], flagged: list[bool]) -> dict:
    tp = sum(f and r["label"] != "safe" for r, f in zip(rows, flagged))
    fp = sum(f and r["label"] == "safe" for r, f in zip(rows, flagged))
    harmful = sum(r["label"] != "safe" for r in rows)
    harmless = len(rows) - harmful
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / max(harmful, 1),
            "false_positive_rate": fp / max(harmless, 1), "harmful": harmful, "harmless": harmless}  # fmt: skip


def run_guard(policy: Policy, rows: list[dict]) -> tuple[list[bool], list[float]]:
    flagged, seconds = [], []
    for r in rows:
        start = time.perf_counter()
        flagged.append(policy.check(r["text"]).flagged)
        seconds.append(time.perf_counter() - start)
    return flagged, seconds


def stream_overhead(engine, tokens: int, policy: Policy | None = None) -> dict:
    """Decode a reply and check it as `--safe` does (app.moderation.stream.ReplyGuard: the
    lexical guard on sentence windows, a guard model in `policy` at its interval, fed every
    piece, the tail at the end). Overhead = time in feed()/finish() / decode time (decode time
    from the engine's own figure, which does not include the checks)."""
    from app.moderation.stream import ReplyGuard
    from model import GenerationSettings

    guard = ReplyGuard(policy, context=[{"role": "user", "content": REPLY_PROMPT}])
    settings = GenerationSettings(max_tokens=tokens, temperature=0.0)
    check_time, inside, flags, stats = 0.0, 0.0, 0, None
    for chunk in engine.stream([{"role": "user", "content": REPLY_PROMPT}], settings):
        start = time.perf_counter()
        guard.feed(chunk.text)
        if chunk.stats is None:  # the engine's decode clock ran while this check did
            inside += time.perf_counter() - start
        else:
            stats = chunk.stats
            guard.finish()
        check_time += time.perf_counter() - start
        if guard.result is not None:  # a random guard's verdict: counted, then ignored, so
            flags, guard.result = flags + 1, None  # the whole reply is checked as a safe one is
    # The engine's decode time is wall time from the first token: without the checks in it.
    decode = stats.generation_tokens / stats.generation_tps if stats.generation_tps else 0.0
    decode = max(decode - inside, 1e-9)
    return {"tokens": stats.generation_tokens, "decode_s": decode,
            "checks": guard.window_checks + guard.model_checks, "model_checks": guard.model_checks,
            "check_s": check_time, "overhead": check_time / decode, "flags": flags}  # fmt: skip


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="heldout", choices=("heldout", "tune", "all"))
    parser.add_argument("--model", default=None, help="chat model for the self-check")
    parser.add_argument("--guard-model", default=None, help="a Llama Guard 3 checkpoint")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="model guards: the first N texts only (seconds a text on a CPU)")
    parser.add_argument("--unchecked-guard", action="store_true",
                        help="load --guard-model without checking that it answers safe/unsafe "
                        "(a random-weight checkpoint: timings and memory only)")  # fmt: skip
    parser.add_argument("--no-self-check", action="store_true")
    parser.add_argument("--reply-tokens", type=int, default=160)
    args = parser.parse_args()
    rows = [json.loads(line) for line in SET.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if args.split == "all" or r["split"] == args.split]
    print(f"labelled set: {len(rows)} texts ({args.split}), "
          f"{sum(r['label'] != 'safe' for r in rows)} harmful")  # fmt: skip

    policies = {"lexical": Policy()}
    engine = guard = None
    if args.guard_model:  # loaded first: its RSS is what the process grows by
        from app.moderation.llama_guard import LlamaGuard
        from model import Engine

        before = rss_mb()
        guard_engine = Engine.load(args.guard_model)
        guard = LlamaGuard(guard_engine, check=not args.unchecked_guard)
        guard.check("Hello.")  # weights read and the first pass compiled
        print(f"guard model {guard_engine.name}: RSS +{rss_mb() - before:.0f} MB after load and one "
              f"check; its memory decision: {guard_engine.memory_notice or 'loaded whole (fits)'}")  # fmt: skip
    if not args.no_self_check or args.reply_tokens:
        from model import Engine

        before = rss_mb()
        engine = Engine.load(args.model)
        print(f"chat model {engine.name}: RSS +{rss_mb() - before:.0f} MB; its memory decision: "
              f"{engine.memory_notice or 'loaded whole (fits)'}")  # fmt: skip
    if guard is not None:
        policies["llama-guard"] = Policy([guard])
        policies["lexical+llama-guard"] = Policy([LexicalGuard(), guard])
    elif not args.no_self_check:
        from app.moderation.self_check import SelfCheck

        check = SelfCheck(engine)
        policies[f"self-check ({engine.name})"] = Policy([check])
        policies["lexical+self-check"] = Policy([LexicalGuard(), check])

    print("\n| guard | precision | recall | false positives | median ms/message | p95 ms |")
    print("|---|---|---|---|---|---|")
    for name, policy in policies.items():
        # --limit: every k-th text, so both labels stay in the sample
        some = rows if name == "lexical" or not args.limit else rows[:: max(1, len(rows) // args.limit)][: args.limit]
        flagged, seconds = run_guard(policy, some)
        f = figures(some, flagged)
        ms = sorted(s * 1000 for s in seconds)
        print(f"| {name}{f' ({len(some)} texts)' if len(some) < len(rows) else ''} | {f['precision']:.2f} | {f['recall']:.2f} "
              f"| {f['false_positive_rate']:.1%} of {f['harmless']} | {statistics.median(ms):.3f} "
              f"| {ms[int(0.95 * (len(ms) - 1))]:.3f} |")  # fmt: skip
        if name == "lexical":
            lexical_flags = flagged
    print("\nlexical recall per category and language:")
    for key in ("label", "lang"):
        groups: dict[str, list[bool]] = {}
        for r, f in zip(rows, lexical_flags):
            if r["label"] != "safe":
                groups.setdefault(r[key], []).append(f)
        print("  " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in sorted(groups.items())))
    missed = [r["text"] for r, f in zip(rows, lexical_flags) if f != (r["label"] != "safe")]
    print(f"lexical errors ({len(missed)}):")
    for text in missed:
        print(f"  - {text}")
    if engine is not None and args.reply_tokens:
        o = stream_overhead(engine, args.reply_tokens)
        print(f"\nstreamed reply ({engine.name}, {o['tokens']} tokens): decode {o['decode_s']:.2f} s, "
              f"{o['checks']} sentence-window checks {o['check_s'] * 1000:.2f} ms in all, "
              f"overhead {o['overhead']:.3%} of decode time")  # fmt: skip
        if guard is not None:
            o = stream_overhead(engine, args.reply_tokens, Policy([LexicalGuard(), guard]))
            print(f"streamed reply with the guard model on reply windows ({o['tokens']} tokens): "
                  f"decode {o['decode_s']:.2f} s, {o['checks']} window checks of which "
                  f"{o['model_checks']} by the guard model, {o['check_s']:.2f} s in all, overhead "
                  f"{o['overhead']:.1%} of decode time"
                  + (f"; {o['flags']} flags ignored (random weights)" if o["flags"] else ""))  # fmt: skip
        print(f"process RSS at the end: {rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
