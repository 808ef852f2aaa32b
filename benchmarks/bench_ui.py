"""What the chat UI costs: tokens/s reaching the screen vs the engine's own decode rate.

Same model, same prompt, greedy decoding, KV cache reset before every run, so every run decodes
the same tokens from the same state:

- engine alone: ``Engine.stream`` in a loop, nothing else running;
- UI: the Textual app (headless, full layout and Markdown rendering, no terminal output)
  streams the same reply through its worker thread, buffer, 30 Hz flush and MarkdownStream;
- UI + experts: the same with the experts panel open (routing observer on; MoE models only);
- engine, routing not kept (MoE models only): the engine alone as it was before it kept the
  last reply's routing counts for F4 (``_step`` without routing capture), to price that.

Rates: engine-reported decode tok/s (``stats.generation_tps``), and end to end
= (tokens - 1) / (time from the first token to the last text being in the widget). The UI's cost
is how much lower its end-to-end rate is than the engine alone's. Target: under 5%.

    .venv/bin/python -m benchmarks.bench_ui [--model PATH] [--max-tokens 96] [--runs 3]
    .venv/bin/python -m benchmarks.bench_ui --fake   # scripted engine, no model: UI ceiling
    .venv/bin/python -m benchmarks.bench_ui --model M --routing-cost 9   # A/B, CPU time too
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = (
    "Explain what a sparse mixture-of-experts language model is, with a short Python example "
    "in a code block and a bulleted list of trade-offs."
)


@dataclass
class Run:
    tokens: int
    decode_tps: float  # reported by the engine
    end_to_end_tps: float  # first token → last text in the widget (or out of the stream)


def engine_alone(engine, settings) -> Run:
    engine.reset()
    first = None
    stats = None
    for chunk in engine.stream([{"role": "user", "content": PROMPT}], settings):
        if chunk.text and first is None:
            first = time.perf_counter()
        if chunk.stats is not None:
            stats = chunk.stats
    return _run(stats, first, time.perf_counter())


async def through_the_ui(engine, chat_settings, experts: bool) -> Run:
    """One reply through a fresh headless app (its start-up is not timed)."""
    from app.store import ConversationStore
    from app.tui.app import MixchatApp

    with tempfile.TemporaryDirectory() as directory:
        store = ConversationStore(Path(directory) / "bench.db")
        app = MixchatApp(store=store, engine=engine, lang="en")
        async with app.run_test(size=(120, 40)) as pilot:
            screen = app.chat_screen
            if experts:
                await pilot.press("f4")
            screen.draft_settings = chat_settings
            engine.reset()
            screen.prompt_box.load_text(PROMPT)
            await pilot.press("enter")
            while screen.reply is not None or screen.last_finished_reply is None:
                await asyncio.sleep(0.01)
            reply = screen.last_finished_reply
        engine.routing_observer = None
        store.close()
    return _run(reply.stats, reply.buffer.first_text_at, reply.completed_at)


def engine_without_kept_routing(engine, settings) -> Run:
    """The engine alone with routing captured only for an observer (the code before F4 kept
    the last reply's counts): what keeping them costs is the difference to ``engine alone``."""
    import mlx.core as mx

    from model.generate import Engine

    original = Engine._step

    def step(self, tokens, sampler):
        self.model.routing = None
        hidden = self.model.hidden_states(tokens, cache=self._cache)
        logits = self.model.logits(hidden[:, -1, :])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), None

    Engine._step = step
    try:
        return engine_alone(engine, settings)
    finally:
        Engine._step = original


def routing_cost(engine, settings, rounds: int) -> None:
    """Keeping the last reply's routing (F4 after a reply) against not keeping it, interleaved
    round by round; per decoded token, wall time and this process's CPU time (steadier than wall
    time on a shared machine), medians."""
    timings: dict[str, list[tuple[float, float]]] = {"kept": [], "not kept": []}
    runs = {"kept": engine_alone, "not kept": engine_without_kept_routing}
    for _ in range(rounds):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            result = run(engine, settings)
            tokens = max(result.tokens, 1)
            timings[name].append(
                ((time.perf_counter() - wall) / tokens, (time.process_time() - cpu) / tokens)
            )
    print(f"\nmodel: {engine.name}   max tokens: {settings.max_tokens}   rounds: {rounds}")
    base_wall = statistics.median(w for w, _ in timings["not kept"])
    base_cpu = statistics.median(c for _, c in timings["not kept"])
    for name, values in timings.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        print(
            f"routing {name:<9} wall {wall * 1e3:7.1f} ms/token ({(wall / base_wall - 1) * 100:+.1f}%)"
            f"   cpu {cpu * 1e3:7.1f} ms/token ({(cpu / base_cpu - 1) * 100:+.1f}%)"
        )


def _run(stats, first: float | None, end: float | None) -> Run:
    tokens = stats.generation_tokens if stats else 0
    elapsed = (end - first) if (first is not None and end is not None) else 0.0
    return Run(
        tokens=tokens,
        decode_tps=stats.generation_tps if stats else 0.0,
        end_to_end_tps=(tokens - 1) / elapsed if tokens > 1 and elapsed > 0 else 0.0,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path or id (default: embedded)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fake", action="store_true", help="scripted engine instead of a model")
    parser.add_argument(
        "--routing-cost", type=int, default=0, metavar="ROUNDS",
        help="only price keeping the last reply's routing (MoE model), over ROUNDS rounds",
    )  # fmt: skip
    args = parser.parse_args()

    from app.store import ChatSettings

    if args.fake:
        from tests.fake_engine import FakeEngine

        reply = " ".join(f"word{i}" for i in range(args.max_tokens))
        engine = FakeEngine(reply, token_delay=0.02, num_layers=32, num_experts=8)  # ~50 tok/s

        def settings_for(max_tokens: int):
            from model.generate import GenerationSettings

            return GenerationSettings(max_tokens=max_tokens, temperature=0.0)
    else:
        from model import Engine, GenerationSettings

        started = time.perf_counter()
        engine = Engine.load(args.model)
        print(f"loaded {engine.name} in {time.perf_counter() - started:.1f}s")

        def settings_for(max_tokens: int):
            return GenerationSettings(max_tokens=max_tokens, temperature=0.0, seed=0)

    settings = settings_for(args.max_tokens)
    chat_settings = ChatSettings(temperature=0.0, max_tokens=args.max_tokens)
    engine_alone(engine, settings_for(8))  # warm-up
    if args.routing_cost:
        routing_cost(engine, settings, args.routing_cost)
        return 0

    has_experts = bool(getattr(engine.info, "num_experts", 0))
    modes = {
        "engine alone": lambda: engine_alone(engine, settings),
        "UI": lambda: asyncio.run(through_the_ui(engine, chat_settings, False)),
    }
    if has_experts:
        modes["UI + experts panel"] = lambda: asyncio.run(
            through_the_ui(engine, chat_settings, True)
        )
        if not args.fake:
            modes["engine, routing not kept"] = lambda: engine_without_kept_routing(
                engine, settings
            )
    results: dict[str, list[Run]] = {name: [] for name in modes}
    for _ in range(args.runs):  # modes alternate within each round: drift hits all alike
        for name, measure in modes.items():
            results[name].append(measure())
    rows = list(results.items())
    baseline = statistics.median(r.end_to_end_tps for r in rows[0][1])

    print(
        f"\nmodel: {engine.name}   prompt: {len(PROMPT)} chars   max tokens: {args.max_tokens}"
        f"   runs: {args.runs} (medians)"
    )
    header = (
        f"{'mode':<26} {'tokens':>6} {'decode tok/s':>13} {'end-to-end tok/s':>17} {'UI cost':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, runs in rows:
        tokens = int(statistics.median(r.tokens for r in runs))
        decode = statistics.median(r.decode_tps for r in runs)
        end_to_end = statistics.median(r.end_to_end_tps for r in runs)
        cost = "—" if name == "engine alone" else f"{(1 - end_to_end / baseline) * 100:.1f}%"
        print(f"{name:<26} {tokens:>6} {decode:>13.1f} {end_to_end:>17.1f} {cost:>8}")
    if not has_experts:
        print("(dense model: no experts panel row; pass --model with a MoE checkpoint)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
