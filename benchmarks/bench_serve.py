"""`mixchat serve`: whole-process `mixchat ask --max-tokens 1` warm (through a running server)
vs cold (in-process load), and a bounded load test on loopback at 1, 4 and 8 clients, against
a server per `--batches` value (default: `--batch 1`, one request at a time, and `--batch 8`,
batched decode), in the same run.

- floor: `python -c pass` and `python -c "import app.cli, app.cli.ask_server"` (what any
  Python CLI pays before it does anything);
- cold: `mixchat ask --local --max-tokens 1 Hi` (imports MLX and mlx-lm, loads the model);
- warm: `mixchat ask --max-tokens 1 Hi` with MIXCHAT_SERVER pointing at a running server;
- load: N chat requests (distinct prompts, greedy, `--max-tokens` each) from C client threads
  with the official `openai` client: requests/s, completion tokens/s, p50/p99 latency, lost
  requests, the largest batch the server formed (/health), and how many answers equal the
  first server's 1-client run for the same prompt.

    .venv/bin/python -m benchmarks.bench_serve [--model M] [--runs 5] [--requests 200]
        [--small 40] [--max-tokens 8] [--batches 1,8] [--no-ask] [--probe-steps 32]
        [--probe-only]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BIN = Path(sys.executable).parent
MIXCHAT = str(BIN / "mixchat")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wall(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {result.stderr.decode()[-500:]}")
    return elapsed


def timings(cmd: list[str], env: dict, runs: int) -> list[float]:
    return [wall(cmd, env) for _ in range(runs)]


def load_test(url: str, model: str, clients: int, n: int, max_tokens: int):
    import openai

    api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(i: int):
        start = time.perf_counter()
        try:
            r = api.chat.completions.create(
                model=model, max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": f"Request {i}: tell me about {i}."}],
            )  # fmt: skip
        except openai.OpenAIError as e:
            return i, None, 0, time.perf_counter() - start, str(e)
        text = r.choices[0].message.content
        return i, text, r.usage.completion_tokens, time.perf_counter() - start, None

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n)))
    return results, time.perf_counter() - start


def batch_probe(model: str | None, steps: int) -> None:
    """What batched decode could gain: one greedy decode step of the model at batch 1, 4, 8
    (same-length rows, no padding), in this process: no prefill, no padding, no HTTP (the
    server's batches have all three); an upper bound on what batched decode can buy on this machine."""
    import mlx.core as mx

    from model import Engine

    engine = Engine.load(model)
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Tell me a story."}])
    print(f"\nbatched decode probe: {steps} greedy steps after a {len(prompt)}-token prompt\n")
    print("| batch | ms per step | tokens/s | vs batch 1 |\n|---|---|---|---|")
    base = None
    for batch in (1, 4, 8):
        cache = engine.model.make_cache()
        logits = engine.model(mx.array([prompt] * batch), cache=cache)
        token = mx.argmax(logits[:, -1], axis=-1)[:, None]
        mx.eval(token)
        start = time.perf_counter()
        for _ in range(steps):
            token = mx.argmax(engine.model(token, cache=cache)[:, -1], axis=-1)[:, None]
            mx.eval(token)
        per_step = (time.perf_counter() - start) / steps
        base = base or batch / per_step
        print(
            f"| {batch} | {per_step * 1e3:.1f} | {batch / per_step:.1f} | "
            f"{batch / per_step / base:.2f}x |"
        )


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def wait_for(server: subprocess.Popen, url: str) -> str:
    """The served model's name, once the server answers with it loaded."""
    for _ in range(1200):
        try:
            if model := health(url)["model"]:
                return model
        except OSError:
            pass
        if server.poll() is not None:
            raise SystemExit("the server exited")
        time.sleep(0.1)
    raise SystemExit("the server did not start")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def ask_rows(url: str, env: dict, model_args: list[str], runs: int, model: str) -> None:
    """Whole-process `ask` timings: the floor, cold (in-process) and warm (via `url`)."""
    env = env | {"MIXCHAT_SERVER": url}
    ask = [MIXCHAT, "ask", *model_args, "--max-tokens", "1", "Hi"]
    rows = [
        ("python -c pass", timings([sys.executable, "-c", "pass"], env, runs)),
        ("python -c 'import app.cli, app.cli.ask_server'",
         timings([sys.executable, "-c", "import app.cli, app.cli.ask_server"], env, runs)),
        ("cold: mixchat ask --local --max-tokens 1",
         timings([*ask[:2], "--local", *ask[2:]], env, max(1, runs // 2))),
    ]  # fmt: skip
    wall(ask, env)  # the first request fills the prompt cache
    rows.append(("warm: mixchat ask --max-tokens 1 (server running)", timings(ask, env, runs)))
    print(f"model {model}, {runs} runs per row; whole-process wall time (s)\n")
    print("| command | median | min | max |\n|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} |")


def load_tests(servers: dict, model: str, args: argparse.Namespace) -> None:
    """At 1, 4 and 8 clients, each server in turn (so a change in the machine's load hits them
    alike); the first server's 1-client answers are the reference for every other run."""
    print(f"\nload test: greedy, {args.max_tokens} tokens per reply, distinct prompts; servers "
          "alternate at each client count\n")  # fmt: skip
    print("| clients | --batch | requests | lost | req/s | completion tok/s | vs --batch "
          f"{next(iter(servers))} | p50 latency (s) | p99 latency (s) | largest batch | "
          "answers equal to the reference |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    reference: dict[int, str] = {}
    for clients, n in ((1, args.small), (4, args.small), (8, args.requests)):
        base = None
        for batch, (_, url) in servers.items():
            results, elapsed = load_test(url, model, clients, n, args.max_tokens)
            largest = health(url)["largest_batch"]
            ok = [r for r in results if r[1] is not None]
            if not reference and clients == 1:
                reference = {i: text for i, text, *_ in ok}
            same = [reference.get(i) == text for i, text, *_ in ok if i in reference]
            latencies = [r[3] for r in ok]
            tps = sum(r[2] for r in ok) / elapsed
            base = base or tps
            print(
                f"| {clients} | {batch} | {n} | {n - len(ok)} | {len(ok) / elapsed:.2f} | "
                f"{tps:.1f} | {tps / base:.2f}x | {percentile(latencies, 0.5):.2f} | "
                f"{percentile(latencies, 0.99):.2f} | {largest} | {sum(same)}/{len(same)} |",
                flush=True,
            )
            errors = {r[4] for r in results if r[4]}
            if errors:
                print(f"errors: {sorted(errors)[:3]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model to serve (default: the embedded default)")
    parser.add_argument("--runs", type=int, default=5, help="whole-process runs per row")
    parser.add_argument("--requests", type=int, default=200, help="requests at 8 clients")
    parser.add_argument("--small", type=int, default=40, help="requests at 1 and 4 clients")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--batches", default="1,8", help="a server per --batch value (1,8)")
    parser.add_argument("--no-ask", action="store_true", help="no whole-process ask rows")
    parser.add_argument("--probe-steps", type=int, default=32, help="0: no batch probe")
    parser.add_argument("--probe-only", action="store_true", help="only the batch probe")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the server we started
    if args.probe_only:
        batch_probe(args.model, args.probe_steps)
        return 0

    home = tempfile.mkdtemp(prefix="bench-serve-")
    model_args = ["--model", args.model] if args.model else []
    batches = [int(b) for b in args.batches.split(",")]
    servers: dict[int, tuple[subprocess.Popen, str]] = {}
    env = {**os.environ, "MIXCHAT_HOME": home, "HF_HUB_OFFLINE": "1"}
    try:
        for batch in batches:  # all running at once; the load tests alternate between them
            port = free_port()
            server = subprocess.Popen(
                [MIXCHAT, "serve", *model_args, "--port", str(port), "--keep-alive", "-1",
                 "--batch", str(batch), "--max-queue", str(max(32, args.requests))],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            servers[batch] = server, f"http://127.0.0.1:{port}"
        model = ""
        for server, url in servers.values():
            model = wait_for(server, url)
        if not args.no_ask:
            ask_rows(servers[batches[0]][1], env, model_args, args.runs, model)
        load_tests(servers, model, args)
    finally:
        for server, _ in servers.values():
            server.terminate()
        for server, _ in servers.values():
            server.wait(30)
    if args.probe_steps:
        batch_probe(args.model, args.probe_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
