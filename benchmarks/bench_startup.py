"""Where `mixchat ask`'s time to the first token goes, on the embedded default model.

Two measurements, each in fresh processes (the OS file cache is warm after the first run):

- end to end: `mixchat ask PROMPT` as a user runs it; time from spawn to the first byte of the
  reply on stdout, and to exit; plus a usage error (`ask --top-p 2 hi`) and `mixchat --help`.
- the breakdown: a child interpreter runs cmd_ask's path stage by stage (the same calls
  Engine.load and Engine.stream make) and reports each stage's wall time; `python -X importtime`
  of that path, summed per top-level package, says which imports cost what.

    python -m benchmarks.bench_startup [--runs 5]
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
MIXCHAT = str(Path(sys.executable).parent / "mixchat")
PROMPT = "What is the capital of France? Answer in one word."

# The child: cmd_ask's path, one stage at a time. Prints one JSON object of stage -> seconds.
STAGES = r"""
import time, json, sys
t = [("start", time.time())]
def mark(name): t.append((name, time.time()))
import app.cli
mark("import app.cli (argparse, the CLI)")
from model import Engine, GenerationSettings
import model.generate
mark("import the engine (MLX, mlx-lm parts)")
from model import registry, weights
from model.tokenizer import load_tokenizer
checkpoint = weights.locate(registry.resolve(None))
mark("locate the checkpoint (GGUF header)")
tokenizer = load_tokenizer(checkpoint.gguf_metadata)
mark("load the tokenizer")
built = weights.build_model(checkpoint)
mark("load the weights")
from model.info import model_info
engine = Engine(built, tokenizer, registry.DEFAULT_MODEL, model_info(checkpoint, "m", 4))
mark("build the engine")
stream = engine.stream([{"role": "user", "content": PROMPT}], GenerationSettings(temperature=0))
next(iter(stream))
mark("prompt and first token")
print(json.dumps({"spawn_to_start": t[0][1], "stages": [[n, b - a] for (n, b), (_, a) in zip(t[1:], t)]}))
"""


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "0"}


def end_to_end(args: list[str]) -> tuple[float, float]:
    """(seconds to the first stdout byte, seconds to exit) of `mixchat ARGS`."""
    start = time.time()
    proc = subprocess.Popen([MIXCHAT, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env=env())
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.time() - start
    proc.stdout.read()
    proc.wait()
    return first, time.time() - start


def breakdown() -> list[tuple[str, float]]:
    start = time.time()
    code = f"PROMPT = {PROMPT!r}\n" + STAGES
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env(), check=True)
    data = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return [("python start", data["spawn_to_start"] - start)] + [tuple(s) for s in data["stages"]]


def import_costs() -> dict[str, float]:
    """Self time of every module imported on the ask path, summed per top-level package."""
    code = "import app.cli; from model import Engine; import model.generate"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True,
                         env=env(), check=True)
    per_package: dict[str, float] = defaultdict(float)
    for line in out.stderr.decode().splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = (part.strip() for part in line[len("import time:"):].split("|"))
        per_package[name.split(".")[0]] += int(self_us) / 1e6
    return dict(sorted(per_package.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    end_to_end(["ask", "--quiet", PROMPT])  # warm the file cache
    runs = {"first token": [], "exit": [], "usage error": [], "--help": []}
    stages: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.runs):
        first, done = end_to_end(["ask", "--quiet", PROMPT])
        runs["first token"].append(first)
        runs["exit"].append(done)
        runs["usage error"].append(end_to_end(["ask", "--top-p", "2", "hi"])[1])
        runs["--help"].append(end_to_end(["--help"])[1])
        for name, seconds in breakdown():
            stages[name].append(seconds)
    print(f"`mixchat ask` on the default model, medians of {args.runs} fresh processes:")
    for name, values in runs.items():
        print(f"  {name:<14} {statistics.median(values):6.2f} s")
    print("Breakdown (a child running cmd_ask's path stage by stage):")
    total = 0.0
    for name, values in stages.items():
        median = statistics.median(values)
        total += median
        print(f"  {name:<40} {median:6.2f} s")
    print(f"  {'total to the first token':<40} {total:6.2f} s")
    print("Import self time per top-level package (one run, -X importtime):")
    costs = import_costs()
    for name, seconds in list(costs.items())[:12]:
        print(f"  {name:<20} {seconds:6.2f} s")
    print(f"  {'all imports':<20} {sum(costs.values()):6.2f} s")


if __name__ == "__main__":
    main()
