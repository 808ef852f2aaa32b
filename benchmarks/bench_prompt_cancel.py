"""How soon Esc acts while a long prompt is read, and what sizing prompt passes costs.

The default model reads a ~5,500-token prompt; ``cancel()`` comes after ``--cancel-after``
seconds from a timer thread; measured: the time from cancel() to the stream's final chunk, and
the prompt tokens read per second until then. Two pass sizings, alternated for ``--rounds``:

- timed: as the engine does (a 16-token first pass, then passes sized to take ~1 s, at most
  the engine's chunk);
- fixed: every pass the engine's full chunk (512 here; what the engine did before).

    .venv/bin/python -m benchmarks.bench_prompt_cancel [--cancel-after 5] [--rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEXT = " ".join(["La mer est calme et bleue ce matin, les bateaux dorment au port."] * 250)


def one_run(engine, settings, cancel_after: float) -> tuple[float, float, int]:
    """(seconds from cancel() to the final chunk, prompt tokens/s until then, tokens read)."""
    engine.reset()
    cancelled_at: list[float] = []

    def cancel() -> None:
        cancelled_at.append(time.perf_counter())
        engine.cancel()

    started = time.perf_counter()
    timer = threading.Timer(cancel_after, cancel)
    stream = engine.stream([{"role": "user", "content": TEXT}], settings)
    timer.start()
    read = 0
    for chunk in stream:
        if chunk.progress is not None:
            read = chunk.progress[0]
        if chunk.stats is not None:
            read = chunk.stats.prompt_tokens
    ended = time.perf_counter()
    timer.cancel()
    latency = ended - cancelled_at[0] if cancelled_at else float("nan")
    return latency, read / (ended - started), read


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cancel-after", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    from model import Engine, GenerationSettings
    from model import generate as generate_module

    engine = Engine.load(None)
    settings = GenerationSettings(max_tokens=1, temperature=0.0)
    total = engine.count_tokens([{"role": "user", "content": TEXT}])
    print(f"model: {engine.name}   prompt: {total} tokens   engine chunk: {engine._chunk}")
    sizings = {
        "timed": (generate_module.FIRST_PROMPT_CHUNK, generate_module.CANCEL_WITHIN),
        "fixed": (engine._chunk, 1e9),  # any speed gives a full chunk
    }
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in sizings}
    for _ in range(args.rounds):
        for name, (first, within) in sizings.items():
            generate_module.FIRST_PROMPT_CHUNK, generate_module.CANCEL_WITHIN = first, within
            results[name].append(one_run(engine, settings, args.cancel_after))
    print(f"cancel() after {args.cancel_after:g} s, medians of {args.rounds}")
    for name, runs in results.items():
        latency = statistics.median(r[0] for r in runs)
        rate = statistics.median(r[1] for r in runs)
        read = int(statistics.median(r[2] for r in runs))
        print(f"{name:<6} stopped {latency:6.1f} s after cancel()   read {read:5d} tokens"
              f" at {rate:6.1f} tok/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
