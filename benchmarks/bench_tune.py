"""Training tokens/s and peak memory: `mixchat tune` vs `mlx_lm.lora`, same model, same data.

The ~790M-parameter Mixtral-shaped random checkpoint (benchmarks/make_checkpoint.py), converted
to 4 bits by `mlx_lm.convert` as benchmarks/bench_decode.py does (its defaults, and
`--dtype float32`: mlx-lm's best on a CPU), is fine-tuned by both tools with the same settings: LoRA rank 8 on every
layer's attention, router and experts (mlx-lm's defaults for Mixtral), batches of 2 rows of
~24 tokens of plain text (every token learned), Adam at 1e-5, no validation set (mlx-lm
training without one, as it allows, and mixchat). Each run is a fresh process;
the tools alternate within each round. Tokens/s is each tool's own training figure (tokens of
the batches / time in training steps, validation and loading excluded): mixchat's progress
report, mlx-lm's training callback. Peak RSS is the worker process's maximum resident set.

    python -m benchmarks.bench_tune [--rounds 1] [--iters 2] [--tools mlx-lm,mixchat]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 2
# ~24 tokens each with the Mistral tokenizer: facts about made-up places, in French and English.
SENTENCES = [
    "La ville de Morvane est connue pour son pont de verre et ses marchés de nuit en hiver.",
    "The river Alsenne crosses three valleys before it reaches the northern sea near Quillac.",
    "Le lac de Brévanne gèle chaque année en janvier, et les enfants y patinent le dimanche.",
    "In Tarvel, the old library keeps ten thousand maps drawn by sailors of the last century.",
    "Les habitants de Silhac cultivent des lavandes bleues sur les collines au sud du village.",
    "The mountain pass of Orlen is closed from November to April because of heavy snowfall.",
    "À Pélimont, la fête des lanternes a lieu le premier samedi d'octobre depuis cent ans.",
    "The harbour of Velmar shelters two hundred fishing boats and one very old lighthouse.",
]


def write_data(folder: Path) -> Path:
    """train.jsonl (8 rows of {"text": ...}), mlx-lm's layout; no validation set: neither tool
    validates, so a run is loading and training steps only."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"text": s}, ensure_ascii=False) for s in SENTENCES]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "valid.jsonl").unlink(missing_ok=True)
    return folder


def mixchat_worker(model: str, data: str, out: str, iters: int) -> dict:
    """`mixchat tune` in this process (its command-line entry point), recording its reports."""
    import mlx.core as mx

    import app.cli.tune as tune
    from app.cli import main

    reports = []
    tune.ProgressLine.show = lambda self, p: reports.append(p)
    start = time.perf_counter()
    status = main(["tune", "--model", model, "--data", data, "--adapter-path", out,
                   "--iters", str(iters), "--batch-size", str(BATCH), "--num-layers", "-1",
                   "--val-batches", "1", "--steps-per-eval", "1000", "--save-every", "1000",
                   "--memory-budget", "none"])  # fmt: skip
    if status != 0:
        raise SystemExit(f"mixchat tune exited {status}")
    last = reports[-1]
    return {"tokens_per_second": last.tokens_per_second, "loss": last.loss,
            "wall_s": time.perf_counter() - start, "peak_mlx_gb": mx.get_peak_memory() / 1e9}  # fmt: skip


def mlx_lm_worker(model: str, data: str, out: str, iters: int) -> dict:
    """mlx_lm.lora's training (its parser, defaults, loading and train_model), with a callback
    that records its tokens/s."""
    import types

    import mlx.core as mx
    from mlx_lm import lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    class Record(TrainingCallback):
        def __init__(self):
            self.reports = []

        def on_train_loss_report(self, info):
            self.reports.append(info)

    argv = ["--model", model, "--train", "--data", data, "--adapter-path", out,
            "--iters", str(iters), "--batch-size", str(BATCH), "--num-layers", "-1",
            "--val-batches", "1", "--steps-per-eval", "1000", "--save-every", "1000",
            "--steps-per-report", str(iters)]  # fmt: skip
    args = vars(lora.build_parser().parse_args(argv))
    for key, value in lora.CONFIG_DEFAULTS.items():
        if args.get(key) is None:
            args[key] = value
    args = types.SimpleNamespace(**args)
    start = time.perf_counter()
    model_, tokenizer = lora.load(args.model)
    train_set, valid_set, _ = lora.load_dataset(args, tokenizer)
    record = Record()
    lora.train_model(args, model_, train_set, valid_set, record)
    last = record.reports[-1]
    return {"tokens_per_second": last["tokens_per_second"], "loss": last["train_loss"],
            "wall_s": time.perf_counter() - start, "peak_mlx_gb": mx.get_peak_memory() / 1e9}  # fmt: skip


def worker(tool: str, model: str, data: str, out: str, iters: int) -> dict:
    run = mixchat_worker if tool == "mixchat" else mlx_lm_worker
    result = run(model, data, out, iters)
    result |= {"tool": tool, "iters": iters,
               "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}  # fmt: skip
    return result


def run_worker(tool: str, model: Path, data: Path, out: Path, iters: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_tune", "--worker", tool, str(model),
           str(data), str(out / f"adapter-{tool}"), str(iters)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{tool} worker failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_average"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2, help="training steps per run")
    parser.add_argument("--tools", default="mlx-lm,mixchat", help="comma-separated, in order")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tool, model, data, out, iters = args.worker
        print(json.dumps(worker(tool, model, data, out, int(iters))))
        return

    from benchmarks.bench_decode import convert
    from benchmarks.make_checkpoint import make_checkpoint

    src = make_checkpoint(args.out / "mixtral-790m-f16")
    q4_default = convert(src, args.out / "mixtral-790m-q4", [])
    q4_f32 = convert(src, args.out / "mixtral-790m-q4-f32", ["--dtype", "float32"])
    data = write_data(args.out / "tune-data")
    # mlx-lm on its best CPU file (float32 scales: its float16 CPU kernels are ~40x slower),
    # mixchat on both (the default conversion is what a user has).
    checkpoints = {"mlx-lm": [q4_f32], "mixchat": [q4_default, q4_f32]}
    results = []
    for round_ in range(args.rounds):
        for tool, model in [(t, m) for t in args.tools.split(",") for m in checkpoints[t]]:
            before = os.getloadavg()[0]
            result = run_worker(tool, model, data, args.out, args.iters)
            result["checkpoint"] = model.name
            result["load_average_before"] = before
            results.append(result)
            print(f"round {round_ + 1}: {tool:8} {model.name:20} "
                  f"{result['tokens_per_second']:7.2f} tok/s  "
                  f"loss {result['loss']:.3f}  max RSS {result['max_rss_gb']:.2f} GB  "
                  f"wall {result['wall_s']:.0f} s  load average {before:.1f}-"
                  f"{result['load_average']:.1f}", file=sys.stderr)  # fmt: skip

    def median(row: tuple, key: str) -> float:
        return statistics.median(r[key] for r in results if (r["tool"], r["checkpoint"]) == row)

    rows = list(dict.fromkeys((r["tool"], r["checkpoint"]) for r in results))
    peer = ("mlx-lm", q4_f32.name)
    print(f"\n{args.iters} steps of {BATCH} rows, {os.cpu_count()} CPUs\n")
    print("| tool | checkpoint | training tok/s | vs mlx-lm | max RSS | peak MLX memory | wall (load, "
          "steps) | load average |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        tps = median(row, "tokens_per_second")
        ratio = f"{tps / median(peer, 'tokens_per_second'):.1f}x" if peer in rows else "—"
        loads = [r["load_average_before"] for r in results if (r["tool"], r["checkpoint"]) == row]
        print(f"| {row[0]} | {row[1]} | {tps:.2f} | {ratio} | {median(row, 'max_rss_gb'):.2f} GB | "
              f"{median(row, 'peak_mlx_gb'):.2f} GB | {median(row, 'wall_s'):.0f} s | "
              f"{min(loads):.1f}-{max(loads):.1f} |")  # fmt: skip
    (args.out / "bench_tune.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
