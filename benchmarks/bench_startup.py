"""Where `mixchat ask`'s time to the first token goes, on the embedded default model.

Each measurement is a fresh process (the OS file cache is warm after the first run); with
`--baseline DIR` (a checkout of an earlier commit, run with this same virtual environment) the
two code bases alternate within each round, so both see the same machine load.

- end to end: `mixchat ask PROMPT` as a user runs it: seconds from spawn to the first byte of
  the reply on stdout, and CPU seconds (user + system, all threads) of the whole process; the
  same for a usage error (`ask --top-p 2 hi`).
- the breakdown: a child interpreter runs cmd_ask's path stage by stage (the calls Engine.load
  and Engine.stream make) and reports each stage's wall and CPU seconds.
- `python -X importtime` of the ask path's imports, self time summed per top-level package.

    python -m benchmarks.bench_startup [--runs 5] [--baseline /tmp/mixchat-before]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIXCHAT = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]
PROMPT = "What is the capital of France? Answer in one word."

# The child: cmd_ask's path, one stage at a time. Prints one JSON object of stage -> seconds.
STAGES = r"""
import time, json, sys
t = [("start", time.time(), time.process_time())]
def mark(name): t.append((name, time.time(), time.process_time()))
import app.cli
mark("import app.cli (argparse, the CLI)")
from model import Engine, GenerationSettings
import model.generate
mark("import the engine (MLX, mlx-lm's parts)")
from model import registry, weights
from model.tokenizer import load_tokenizer
checkpoint = weights.locate(registry.resolve(None))
mark("read the GGUF file (mx.load)")
tokenizer = load_tokenizer(checkpoint.gguf_metadata)
mark("build the tokenizer")
built = weights.build_model(checkpoint)
mark("build the model from the weights")
from model.info import model_info
engine = Engine(built, tokenizer, registry.DEFAULT_MODEL, model_info(checkpoint, "m", 4))
mark("the engine")
stream = engine.stream([{"role": "user", "content": PROMPT}], GenerationSettings(temperature=0))
next(iter(stream))
mark("prompt and first token")
stages = [[n, b - a, q - p] for (n, b, q), (_, a, p) in zip(t[1:], t)]
print(json.dumps({"started": t[0][1], "stages": stages}))
"""


def env(code: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code)}


def end_to_end(code: Path, args: list[str]) -> tuple[float, float]:
    """(seconds to the first stdout byte, CPU seconds) of `mixchat ARGS` run from `code`."""
    start = time.time()
    proc = subprocess.Popen([*MIXCHAT, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env=env(code), cwd="/")  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.time() - start
    proc.stdout.read()
    _, _, usage = os.wait4(proc.pid, 0)
    return first, usage.ru_utime + usage.ru_stime


def breakdown(code: Path) -> list[tuple[str, float, float]]:
    """[(stage, wall seconds, CPU seconds)]; the first stage is the interpreter's start."""
    start = time.time()
    script = f"PROMPT = {PROMPT!r}\n" + STAGES
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env(code),
                         cwd="/", check=True)  # fmt: skip
    data = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return [("python start", data["started"] - start, 0.0)] + [tuple(s) for s in data["stages"]]


def import_costs(code: Path) -> dict[str, float]:
    """Self time of every module imported on the ask path, summed per top-level package."""
    script = "import app.cli; from model import Engine; import model.generate"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", script], capture_output=True,
                         env=env(code), cwd="/", check=True)  # fmt: skip
    per_package: dict[str, float] = defaultdict(float)
    for line in out.stderr.decode().splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = (part.strip() for part in line[len("import time:") :].split("|"))
        per_package[name.split(".")[0]] += int(self_us) / 1e6
    return dict(sorted(per_package.items(), key=lambda kv: -kv[1]))


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="an earlier checkout to compare with")
    args = parser.parse_args()
    codes = {"now": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    for code in codes.values():
        end_to_end(code, ["ask", "--quiet", PROMPT])  # warm the file cache
    ends: dict[str, dict[str, list]] = {name: defaultdict(list) for name in codes}
    stages: dict[str, dict[str, list]] = {name: defaultdict(list) for name in codes}
    for _ in range(args.runs):
        for name, code in codes.items():
            ends[name]["ask: first token"].append(end_to_end(code, ["ask", "--quiet", PROMPT]))
            ends[name]["usage error"].append(end_to_end(code, ["ask", "--top-p", "2", "hi"]))
            for stage, wall, cpu in breakdown(code):
                stages[name][stage].append((wall, cpu))
    names = list(codes)
    header = " | ".join(f"{n} wall s | {n} CPU s" for n in names)
    print(f"Medians of {args.runs} fresh processes per cell, `mixchat ask` on the default model.")
    print(f"\n| end to end | {header} |\n|---|" + "---|---|" * len(names))
    for row in ends[names[0]]:
        cells = " | ".join(
            f"{median([w for w, _ in ends[n][row]]):.2f} | {median([c for _, c in ends[n][row]]):.2f}"
            for n in names
        )
        print(f"| {row} | {cells} |")
    print(f"\n| stage | {header} |\n|---|" + "---|---|" * len(names))
    totals = {n: [0.0, 0.0] for n in names}
    for stage in stages[names[0]]:
        cells = []
        for n in names:
            wall = median([w for w, _ in stages[n][stage]])
            cpu = median([c for _, c in stages[n][stage]])
            totals[n][0] += wall
            totals[n][1] += cpu
            cells.append(f"{wall:.2f} | {cpu:.2f}")
        print(f"| {stage} | {' | '.join(cells)} |")
    cells = " | ".join(f"**{totals[n][0]:.2f}** | **{totals[n][1]:.2f}**" for n in names)
    print(f"| total to the first token | {cells} |")
    for name, code in codes.items():
        costs = import_costs(code)
        top = ", ".join(f"{pkg} {s:.2f}" for pkg, s in list(costs.items())[:6])
        print(f"\nimports ({name}, -X importtime self s): all {sum(costs.values()):.2f}; {top}")


if __name__ == "__main__":
    main()
