"""Moderation: precision and recall of each guard and of the policy combining them, on the
labelled set (tests/data/moderation_set.jsonl: 5 languages, harmful texts per category and
harmless look-alikes), latency per checked message, and the lexical guard's overhead on a
streamed reply checked in sentence windows.

Guards: lexical (the offline default), self-check (the chat model classifying the text:
--model, default the embedded SmolLM2-135M), and a Llama Guard 3 checkpoint with
--guard-model (none ships offline: without it that row is not measured).

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
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / harmful,
            "false_positive_rate": fp / harmless, "harmful": harmful, "harmless": harmless}  # fmt: skip


def run_guard(policy: Policy, rows: list[dict]) -> tuple[list[bool], list[float]]:
    flagged, seconds = [], []
    for r in rows:
        start = time.perf_counter()
        flagged.append(policy.check(r["text"]).flagged)
        seconds.append(time.perf_counter() - start)
    return flagged, seconds


def stream_overhead(engine, tokens: int) -> dict:
    """Decode a reply and check it as `--safe` does (app.moderation.stream.ReplyGuard: the
    lexical guard on sentence windows, fed every piece, the tail at the end). Overhead =
    time in feed()/finish() / decode time."""
    from app.moderation.stream import ReplyGuard
    from model import GenerationSettings

    guard = ReplyGuard()
    settings = GenerationSettings(max_tokens=tokens, temperature=0.0)
    checks, check_time, stats = 0, 0.0, None
    for chunk in engine.stream([{"role": "user", "content": REPLY_PROMPT}], settings):
        if chunk.stats is not None:
            stats = chunk.stats
        start = time.perf_counter()
        before = len(guard.sentences), guard.checked
        guard.feed(chunk.text)
        if chunk.stats is not None:
            guard.finish()
        check_time += time.perf_counter() - start
        checks += (len(guard.sentences), guard.checked) != before
    decode = stats.generation_tokens / stats.generation_tps if stats.generation_tps else 0.0
    return {"tokens": stats.generation_tokens, "decode_s": decode, "checks": checks,
            "check_s": check_time, "overhead": check_time / decode if decode else 0.0}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="heldout", choices=("heldout", "tune", "all"))
    parser.add_argument("--model", default=None, help="chat model for the self-check")
    parser.add_argument("--guard-model", default=None, help="a Llama Guard 3 checkpoint")
    parser.add_argument("--no-self-check", action="store_true")
    parser.add_argument("--reply-tokens", type=int, default=160)
    args = parser.parse_args()
    rows = [json.loads(line) for line in SET.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if args.split == "all" or r["split"] == args.split]
    print(f"labelled set: {len(rows)} texts ({args.split}), "
          f"{sum(r['label'] != 'safe' for r in rows)} harmful")  # fmt: skip

    policies = {"lexical": Policy()}
    engine = None
    if not args.no_self_check or args.reply_tokens:
        from model import Engine

        engine = Engine.load(args.model)
    if args.guard_model:
        from app.moderation.llama_guard import LlamaGuard

        guard = LlamaGuard.load(args.guard_model)
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
        flagged, seconds = run_guard(policy, rows)
        f = figures(rows, flagged)
        ms = sorted(s * 1000 for s in seconds)
        print(f"| {name} | {f['precision']:.2f} | {f['recall']:.2f} "
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


if __name__ == "__main__":
    main()
