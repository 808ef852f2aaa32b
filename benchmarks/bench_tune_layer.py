"""Memory of one full-size Mixtral 8x7B layer trained under a budget, forward and backward.

Layers at Mixtral 8x7B's real size (hidden 4096, 8 experts of FFN 14336, 4-bit, 32/8 heads;
benchmarks/make_full_checkpoint.py --layers 8 by default, 7.1 GB, random weights in the packed
layout; enough layers that the model is larger than the budget, so its experts stream) go
through `mixchat tune` itself, in this process: its budget check, the expert cache it sizes,
StreamedTrainer's forward (layer inputs kept) and backward (each layer recomputed, its routed
experts read again from disk), LoRA rank 8 on attention, router and
every expert, one row of 512 tokens, one step. Each phase is measured on its own: the peak of
MLX's allocations (`mx.get_peak_memory`, reset before the phase) and the peak RSS (VmHWM,
reset through /proc/self/clear_refs), against the size of one expert (3 packed projections)
and of one expert dequantized to float32.

    python -m benchmarks.bench_tune_layer [--budget 6.5GB] [--layers 8] [--tokens 512] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

GB = 1e9
TEXT = ("Les modèles à mélange d'experts activent, pour chaque mot, seulement une petite partie "
        "de leurs paramètres : un routeur choisit deux experts parmi huit dans chaque couche. ")


def rss() -> tuple[float, float]:
    """(current, peak since the last reset) resident set, in GB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024 / GB, int(fields["VmHWM"].split()[0]) * 1024 / GB


def reset_peaks() -> None:
    import mlx.core as mx

    mx.reset_peak_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def measure(budget: str, tokens: int, checkpoint: Path, layers: int) -> dict:
    import mlx.core as mx

    import app.cli.tune as tune
    from app.cli import main
    from benchmarks.make_full_checkpoint import make_full_checkpoint
    from model.tune.streamed import StreamedTrainer

    make_full_checkpoint(checkpoint, layers=layers)
    phases: dict[str, dict] = {}

    def record(name: str) -> None:
        current, peak = rss()
        phases[name] = {"peak_mlx_gb": mx.get_peak_memory() / GB, "peak_rss_gb": peak,
                        "rss_after_gb": current, "mlx_active_gb": mx.get_active_memory() / GB,
                        "mlx_cache_gb": mx.get_cache_memory() / GB}  # fmt: skip

    forward, step_grads = StreamedTrainer._forward, StreamedTrainer.step_grads

    def timed_forward(self, inputs):
        if "forward" in phases:  # the backward's recomputation does not call _forward
            return forward(self, inputs)
        record("load")
        reset_peaks()
        out = forward(self, inputs)
        record("forward")
        reset_peaks()
        return out

    def timed_step(self, rows):
        out = step_grads(self, rows)
        record("backward")
        return out

    StreamedTrainer._forward, StreamedTrainer.step_grads = timed_forward, timed_step
    tune.ProgressLine.show = lambda self, p: None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        words = (TEXT * (tokens // 20 + 2)).split()
        (data / "train.jsonl").write_text(json.dumps({"text": " ".join(words)}) + "\n")
        status = main(["tune", "--model", str(checkpoint), "--data", str(data),
                       "--adapter-path", str(Path(tmp) / "adapter"), "--iters", "1",
                       "--batch-size", "1", "--num-layers", "-1", "--max-seq-length", str(tokens),
                       "--memory-budget", budget, "--save-every", "1000"])  # fmt: skip
    if status != 0:
        raise SystemExit(f"mixchat tune exited {status}")
    config = json.loads((checkpoint / "config.json").read_text())
    H, F = config["hidden_size"], config["intermediate_size"]
    group = config["quantization"]["group_size"]
    expert = 3 * H * F * (4 / 8 + 2 * 2 / group)  # packed 4-bit + float16 scales and biases
    return {"budget": budget, "tokens": tokens, "phases": phases,
            "one_expert_packed_gb": expert / GB, "one_expert_float32_gb": 3 * H * F * 4 / GB}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="6.5GB")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8, help="enough that the experts stream")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/mixchat-bench/mixtral-8x7b-layers"))
    args = parser.parse_args()
    print(json.dumps(measure(args.budget, args.tokens, args.dir, args.layers), indent=1))


if __name__ == "__main__":
    main()
