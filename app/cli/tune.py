"""`mixchat tune`: LoRA fine-tuning on chat data (mlx-lm's flags and adapter files).

Every argument is checked before MLX is imported; bad input is one line and exit 1 (data,
model) or 2 (usage), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from app.settings import SettingsError
from model.errors import MixchatError

from .common import add_model_option, memory_size, positive

DEFAULTS = {  # mlx_lm.lora's CONFIG_DEFAULTS where it has the flag
    "iters": 1000, "batch_size": 4, "learning_rate": 1e-5, "num_layers": None, "rank": 8,
    "max_seq_length": 2048, "seed": 0, "steps_per_eval": 200, "save_every": 100,
    "val_batches": 25, "adapter_path": "adapters", "test_batches": 500,
}  # fmt: skip


def register(commands: argparse._SubParsersAction) -> None:
    """Add the `tune` subcommand to the `mixchat` parser's subparsers."""
    tune = commands.add_parser(
        "tune", help="fine-tune a model with LoRA on your data",
        description="Train a LoRA adapter (mlx-lm's files) on chat, prompt/completion or text "
        "rows; then `mixchat ask --adapter-path OUT`. Ctrl-C keeps the last save: the same "
        "command with --resume continues it.",
        epilog="example: mixchat tune --data examples/facts-fr --adapter-path fr-facts "
        "--iters 30 --learning-rate 2e-4 --steps-per-eval 10 (README: Fine-tuning)",
    )  # fmt: skip
    add_model_option(tune)
    tune.add_argument("--data", required=True, metavar="PATH",
                      help="a folder with train.jsonl (valid.jsonl, test.jsonl optional) or one "
                      ".jsonl file; rows: chat messages, prompt/completion or text")  # fmt: skip
    tune.add_argument("--adapter-path", default=DEFAULTS["adapter_path"], metavar="OUT",
                      help="where adapters.safetensors and adapter_config.json go "
                      "(default %(default)s)")  # fmt: skip
    for flag, kind, text in (
        ("--iters", steps, "training steps; 0 with --test: evaluate --adapter-path only"),
        ("--batch-size", positive, "rows per step"),
        ("--learning-rate", float, "Adam's learning rate"),
        (
            "--num-layers",
            int,
            "layers to adapt, from the last; -1: all; default 16 or all when fewer",
        ),
        ("--rank", positive, "LoRA rank"),
        ("--max-seq-length", positive, "longer rows are truncated"),
        ("--seed", int, "random seed: the same seed, the same run"),
        ("--steps-per-eval", positive, "validation every N steps"),
        ("--save-every", positive, "save (and resume point) every N steps"),
        ("--val-batches", int, "validation batches; -1: the whole validation set"),
        ("--test-batches", int, "test batches (with --test); -1: the whole test set"),
    ):
        dest = flag[2:].replace("-", "_")
        tune.add_argument(flag, type=kind, default=DEFAULTS[dest],
                          help=text if DEFAULTS[dest] is None else f"{text} (default %(default)s)")  # fmt: skip
    tune.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=True,
                      help="learn the assistant's tokens only (default: on)")  # fmt: skip
    tune.add_argument("--memory-budget", type=memory_size, metavar="SIZE",
                      help="most memory training may use: above it, experts stream from disk "
                      "layer by layer (default: automatic, as for inference)")  # fmt: skip
    tune.add_argument("--resume", action="store_true",
                      help="continue the run saved in --adapter-path")  # fmt: skip
    tune.add_argument("--test", action="store_true",
                      help="evaluate the adapter on the folder's test.jsonl after training (test "
                      "loss and perplexity); with --iters 0, the adapter already in "
                      "--adapter-path ('': the base model)")  # fmt: skip
    tune.set_defaults(func=run)


def steps(text: str) -> int:
    """--iters: a number of steps, 0 allowed (with --test: evaluate only)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, not {text!r}")
    return value


def check(args: argparse.Namespace) -> None:
    """Usage errors (exit 2), before MLX is imported."""
    if args.learning_rate <= 0:
        raise SettingsError(f"--learning-rate must be positive, not {args.learning_rate}")
    if args.num_layers is not None and (args.num_layers == 0 or args.num_layers < -1):
        raise SettingsError(
            f"--num-layers must be -1 (all) or a number of layers, not {args.num_layers}"
        )
    if args.val_batches == 0 or args.val_batches < -1:
        raise SettingsError(f"--val-batches must be -1 (all) or at least 1, not {args.val_batches}")
    if args.test_batches == 0 or args.test_batches < -1:
        raise SettingsError(
            f"--test-batches must be -1 (all) or at least 1, not {args.test_batches}"
        )
    if not Path(args.data).exists():
        raise SettingsError(f"no dataset at {args.data}")
    if args.test and not (Path(args.data) / "test.jsonl").is_file():
        raise SettingsError(f"--test needs a folder with test.jsonl; {args.data} has none")
    if args.iters == 0 and not args.test:
        raise SettingsError("--iters 0 trains nothing: add --test to evaluate the adapter in "
                            "--adapter-path on test.jsonl")  # fmt: skip
    if args.iters == 0 and args.adapter_path and not Path(args.adapter_path).is_dir():
        raise SettingsError(f"--test --iters 0: no adapter in {args.adapter_path} (train one "
                            "first, or --adapter-path '' to test the base model)")  # fmt: skip
    if args.resume and not Path(args.adapter_path).is_dir():
        raise SettingsError(f"--resume: no run saved in {args.adapter_path}")


def run(args: argparse.Namespace) -> int:
    check(args)
    settings = args.settings
    import mlx.core as mx

    from model import load
    from model.tune.data import load_dataset
    from model.tune.lora import apply_lora, lora_config, read_config
    from model.tune.streamed import StreamedTrainer, prepare
    from model.tune.train import TrainConfig, Trainer

    model, tokenizer = load(
        settings.model, settings.load_options.but(max_context=args.max_seq_length)
    )
    streamed = prepare(model)  # experts stream under the budget: train layer by layer
    if args.iters == 0:
        return test_only(args, model, tokenizer, StreamedTrainer if streamed else Trainer)
    data = load_dataset(args.data, tokenizer, args.max_seq_length, args.mask_prompt)
    for line in data.warnings(args.max_seq_length):
        print(f"mixchat: warning: {line}", file=sys.stderr)
    out = Path(args.adapter_path)
    layers = args.num_layers if args.num_layers is not None else min(16, len(model.layers))
    config = lora_config(model, layers, args.rank)
    if streamed:
        fit_training_budget(model, data, args, config["num_layers"])
    if args.resume:
        saved = read_config(out)
        if saved != config:
            raise MixchatError(f"--resume: {out} holds an adapter with other settings")
    mx.random.seed(args.seed)  # the same seed: the same LoRA start, the same run
    apply_lora(model, config)
    train = TrainConfig(args.iters, args.batch_size, args.learning_rate, args.seed,
                        args.steps_per_eval, args.save_every, args.val_batches)  # fmt: skip
    bar = ProgressLine(sys.stderr)
    trainer = (StreamedTrainer if streamed else Trainer)(model, data, train, out, config, bar.show)
    try:
        trainer.run(resume=args.resume)
    except KeyboardInterrupt:
        bar.end()
        if trainer.saved_step is not None:  # Ctrl-C: say where the run can continue from
            print(f"mixchat: stopped at step {trainer.step}; {out} holds the save of step "
                  f"{trainer.saved_step}: the same command with --resume continues from there",
                  file=sys.stderr)  # fmt: skip
        raise
    bar.end()
    if args.resume and trainer.steps_run == 0:
        print(f"mixchat: the run in {out} is already at step {trainer.step} of --iters "
              f"{args.iters}: raise --iters to train on", file=sys.stderr)  # fmt: skip
    print(f"adapter saved in {out} (step {trainer.step}); use it with "
          f"`mixchat ask --adapter-path {out}`", file=sys.stderr)  # fmt: skip
    if args.test:
        report_test(args, type(trainer), model, data.test)
    return 0


def test_only(args: argparse.Namespace, model, tokenizer, trainer_class) -> int:
    """--test --iters 0: the adapter in --adapter-path ('' : none) on test.jsonl, no training."""
    from model.tune.data import Dataset, Split, read_split
    from model.tune.lora import load_adapter

    path = Path(args.data) / "test.jsonl"
    test = read_split(path, tokenizer, args.max_seq_length, args.mask_prompt)
    for line in Dataset(Split(path), test=test).warnings(args.max_seq_length):
        print(f"mixchat: warning: {line}", file=sys.stderr)
    if args.adapter_path:
        load_adapter(model, args.adapter_path)
    report_test(args, trainer_class, model, test)
    return 0


def report_test(args: argparse.Namespace, trainer_class, model, test) -> None:
    """mlx_lm.lora's --test line on stdout: test loss and perplexity."""
    import math

    from model.tune.train import evaluate

    loss = evaluate(trainer_class, model, test.rows, args.batch_size, args.test_batches)
    if loss is None:
        raise MixchatError(f"--test: {test.path} has nothing to learn (no assistant turn)")
    print(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}.")


def fit_training_budget(model, data, args: argparse.Namespace, num_layers: int) -> None:
    """Refuse a budget below training's minimum (one line); give the expert cache the rest."""
    from model.memory_plan import check_training_budget, training_minimum
    from model.offload import runtime_of

    memory = model.memory
    seq = min(args.max_seq_length, max(len(r.ids) for r in data.train.rows))
    parts = training_minimum(memory.plan, model.args, args.batch_size, seq, args.rank,
                             num_layers, model.model.norm.weight.dtype.size)  # fmt: skip
    capacity = check_training_budget(parts, memory.budget, "this model")
    runtime = runtime_of(model)
    runtime.capacity = capacity
    runtime.cache.resize(capacity)
    from model.sizes import format_bytes

    print(f"mixchat: training layer by layer within {format_bytes(memory.budget)} (the minimum "
          f"is {format_bytes(sum(parts.values()))}): {runtime.describe()}", file=sys.stderr)  # fmt: skip


class ProgressLine:
    """One line, redrawn: steps, loss, validation loss, tokens/s, ETA, peak memory. Not a
    terminal: a line per validation and save only."""

    WIDTH = 20

    def __init__(self, stream):
        self.stream, self.tty = stream, stream.isatty()
        self.drawn = 0.0

    def show(self, p) -> None:
        from model.sizes import format_bytes

        done = p.step / p.iters if p.iters else 1.0
        filled = int(done * self.WIDTH)
        bar = "█" * filled + "░" * (self.WIDTH - filled)
        loss = "-" if p.loss is None else f"{p.loss:.3f}"
        val = "-" if p.val_loss is None else f"{p.val_loss:.3f}"
        eta = (
            "-" if p.eta_seconds is None else time.strftime("%H:%M:%S", time.gmtime(p.eta_seconds))
        )
        line = (f"{bar} {p.step}/{p.iters} | loss {loss} | val {val} | "
                f"{p.tokens_per_second:.0f} tok/s | ETA {eta} | peak {format_bytes(p.peak_memory)}")  # fmt: skip
        if self.tty:
            self.stream.write(f"\r\033[K{line}")
            self.stream.flush()
        elif p.event != "step":
            print(f"[{p.event}] {line}", file=self.stream)

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")
