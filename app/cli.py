"""The `mixchat` command: chat (default), ask, models, info, download, quantize.

Exit codes: 0 ok, 1 error (one line on stderr), 2 usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from model.errors import MixchatError
from model.sizes import format_bytes, format_count


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> Parser:
    parser = Parser(prog="mixchat", description="Chat with Mixture-of-Experts models, locally.")
    commands = parser.add_subparsers(dest="command", parser_class=Parser)

    chat = commands.add_parser("chat", help="open the chat app (the default)")
    add_model_option(chat)
    chat.add_argument("--lang", help="interface language (en, fr); default from LANG")
    add_budget_option(chat)
    chat.set_defaults(func=cmd_chat)

    ask = commands.add_parser("ask", help="answer one prompt, streaming to stdout")
    add_model_option(ask)
    ask.add_argument("prompt", nargs="?", help="the prompt; '-' or absent with a pipe: stdin")
    ask.add_argument("--system", help="system prompt")
    ask.add_argument("--max-tokens", type=int, default=512, metavar="N")
    ask.add_argument(
        "--temp", type=float, default=0.0, metavar="T",
        help="sampling temperature (default 0: greedy, reproducible one-shot answers)",
    )
    ask.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling")
    ask.add_argument("--min-p", type=float, default=0.0, metavar="P", help="min-p sampling")
    ask.add_argument("--seed", type=int, metavar="N")
    ask.add_argument("--json", action="store_true", help="print one JSON object instead")
    ask.add_argument("--quiet", "-q", action="store_true", help="no statistics on stderr")
    ask.add_argument("--local", action="store_true", help="answer in-process, not via `mixchat serve`")
    add_budget_option(ask)
    ask.set_defaults(func=cmd_ask)

    models = commands.add_parser("models", help="list the models mixchat can find")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    info = commands.add_parser("info", help="describe a model without loading it")
    info.add_argument("model", nargs="?", help="path, cached repo id, or omit for the default")
    info.add_argument("--json", action="store_true")
    info.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                      help="compute dtype override")  # fmt: skip
    info.add_argument("--remeasure", action="store_true",
                      help="measure this machine's disk, memory and kernel speed again "
                      "(they are kept in the data directory)")  # fmt: skip
    add_budget_option(info)
    info.set_defaults(func=cmd_info)

    try:
        from quantize.cli import register
    except ImportError:
        pass
    else:
        register(commands)
    from app.serve.cli import register as register_serve

    register_serve(commands)
    return parser


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", help="model directory, .gguf file or cached HF repo id (default: embedded)"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), help="compute dtype override"
    )


def memory_size(text: str) -> int | str:
    """argparse type of --memory-budget: bytes, or "auto" (resolved when used)."""
    from model.memory_plan import parse_budget

    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def context_size(text: str) -> int:
    """argparse type of --max-context: a positive number of tokens (8192, 32k)."""
    s = text.strip().lower()
    try:
        value = int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of tokens: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"the context must be at least 1 token, not {text}")
    return value


def add_budget_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory-budget", type=memory_size, metavar="SIZE",
        help="most memory the model may use, e.g. 12GB, 800MB, auto (a safe share of this "
        "machine's memory) or none (load everything); experts that do not fit are read from "
        "disk on demand. Default: everything in memory when it fits, else auto",
    )  # fmt: skip
    parser.add_argument(
        "--max-context", type=context_size, metavar="TOKENS",
        help="longest conversation, in tokens (e.g. 8192 or 32k); the KV cache is planned for "
        "it. Default: the model's, or under a budget the longest that leaves room for experts",
    )  # fmt: skip
    parser.add_argument(
        "--kv-bits", type=int, choices=(8, 4), metavar="BITS",
        help="store the KV cache in 8 (or 4) bits: a long context in less memory",
    )  # fmt: skip


def clean_text(text: str) -> str:
    """Undecodable bytes (surrogate escapes from argv) become U+FFFD instead of crashing."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is None and sys.stdin.isatty():
        raise UsageError("no prompt: give one as an argument or pipe it on stdin")
    if args.prompt in (None, "-"):
        data = sys.stdin.buffer.read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MixchatError(f"stdin is not valid UTF-8 (byte {e.start})") from None
    else:
        prompt = clean_text(args.prompt)
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return prompt


def cmd_ask(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    messages = [{"role": "system", "content": clean_text(args.system)}] if args.system else []
    messages.append({"role": "user", "content": prompt})
    if not args.local:  # a running `mixchat serve` answers at once (app/client.py)
        from app.client import ask_server

        if (code := ask_server(args, messages)) is not None:
            return code
    from model import Engine, GenerationSettings

    settings = GenerationSettings(
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
    )
    try:
        settings.validate()
    except MixchatError as e:
        raise UsageError(str(e)) from None
    if sys.stderr.isatty() and not args.quiet:
        print(f"Loading {args.model or 'the default model'}…", file=sys.stderr, end="\r")
    engine = Engine.load(args.model, dtype=args.dtype, memory_budget=args.memory_budget,
                         max_context=args.max_context, kv_bits=args.kv_bits)  # fmt: skip
    if sys.stderr.isatty() and not args.quiet:
        print(" " * 60, file=sys.stderr, end="\r")
    if engine.memory_notice:  # chosen for the user (or a warning): always said, in one line
        print(f"mixchat: {engine.memory_notice}", file=sys.stderr)
    text, stats = [], None
    for chunk in engine.stream(messages, settings):
        text.append(chunk.text)
        if not args.json and chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        stats = chunk.stats or stats
    assert stats is not None
    if args.json:
        result = {
            "text": "".join(text),
            "prompt_tokens": stats.prompt_tokens,
            "generation_tokens": stats.generation_tokens,
            "prompt_tps": stats.prompt_tps,
            "generation_tps": stats.generation_tps,
            "peak_memory_gb": stats.peak_memory_gb,
            "finish_reason": stats.finish_reason,
            "model": engine.name,
            "expert_hit_rate": stats.expert_hit_rate,
            "bytes_read_per_token": stats.bytes_read_per_token,
            "prompt_bytes_read_per_token": stats.prompt_bytes_read_per_token,
            "load_seconds": stats.load_seconds,
            "compute_seconds": stats.compute_seconds,
        }
        print(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.quiet:
            print(
                f"[prompt {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s | "
                f"reply {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tok/s | "
                f"peak memory {stats.peak_memory_gb:.2f} GB | {stats.finish_reason}]",
                file=sys.stderr,
            )
            if stats.expert_hit_rate is not None:
                print(
                    f"[experts: {stats.expert_hit_rate:.0%} cache hits, "
                    f"{format_bytes(stats.bytes_read_per_token or 0)} read per token, "
                    f"{stats.load_seconds:.2f} s loading, {stats.compute_seconds:.2f} s computing]",
                    file=sys.stderr,
                )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from app.tui import run_chat

    if args.memory_budget is not None:
        check_memory_budget(args)  # a budget that cannot work fails before the UI opens
    return run_chat(args.model, lang=args.lang, dtype=args.dtype,
                    memory_budget=args.memory_budget, max_context=args.max_context,
                    kv_bits=args.kv_bits)  # fmt: skip


def check_memory_budget(args: argparse.Namespace) -> None:
    """Raise the one-line BudgetError a budget too small for the model gets, without loading."""
    from model import registry, weights

    checkpoint = weights.locate(registry.resolve(args.model))
    weights.plan_memory(checkpoint, args.dtype, args.memory_budget, args.max_context,
                        args.kv_bits)  # fmt: skip


def cmd_models(args: argparse.Namespace) -> int:
    from model.registry import list_models

    entries = list_models()
    if args.json:
        rows = [{"name": e.name, "source": e.source, "path": str(e.path)} for e in entries]
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    width = max((len(e.name) for e in entries), default=4)
    for entry in entries:
        print(f"{entry.name:<{width}}  {entry.source:<9}  {entry.path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from model import registry, weights
    from model.info import model_info
    from model.machine import CACHE_FILE, MeasurementCache
    from model.predict import fit_report

    path = registry.resolve(args.model)
    checkpoint = weights.locate(path)
    name = registry.DEFAULT_MODEL if args.model is None else args.model
    dtype = weights.compute_dtype(checkpoint, args.dtype)
    info = model_info(checkpoint, name, dtype.size)
    fit = fit_report(
        checkpoint, dtype, args.memory_budget, args.model, args.max_context, args.kv_bits,
        MeasurementCache(registry.data_dir() / CACHE_FILE), args.remeasure,
        weights.stream_count(),
    )
    if args.json:
        print(json.dumps(info.as_dict() | {"memory": fit.as_dict()}, ensure_ascii=False, indent=1))
        return 0
    experts = (
        f"{info.num_experts} per layer, {info.experts_per_token} used per token"
        if info.num_experts
        else "none (dense)"
    )
    rows = [
        ("model", info.name),
        ("path", info.path),
        ("architecture", f"{info.architecture}, {info.num_layers} layers, hidden {info.hidden_size}"),
        ("experts", experts),
        ("parameters", f"{format_count(info.total_params)} total, "
                       f"{format_count(info.active_params)} active per token"),
        ("quantization", info.quantization),
        ("size on disk", format_bytes(info.size_bytes)),
        ("memory to run", f"{format_bytes(info.memory_bytes)} weights + "
                          f"{format_bytes(info.kv_bytes_per_token * 1024)} KV cache per 1K tokens"),
        ("context", f"{info.context_length} tokens"
                    + (f", sliding window {info.sliding_window}" if info.sliding_window else "")),
    ]
    rows += fit.rows()
    for key, value in rows:
        print(f"{key:<14} {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help")):
        argv.insert(0, "chat")  # `mixchat` alone, or `mixchat --model M`, opens the chat app
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UsageError as e:
        print(f"mixchat: usage error: {e}", file=sys.stderr)
        return 2
    except MixchatError as e:
        print(f"mixchat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmixchat: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mixchat ask ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug: still one line, unless debugging
        if os.environ.get("MIXCHAT_DEBUG"):
            raise
        print(f"mixchat: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
