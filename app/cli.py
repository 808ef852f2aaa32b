"""The `mixchat` command: chat (default), ask, models, info, download, quantize.

Exit codes: 0 ok, 1 error (one line on stderr), 2 usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Sequence
from typing import TextIO

from app.prompts import system_prompt
from app.settings import DTYPES, LANGUAGES, Settings, SettingsError, read_settings
from model.errors import MixchatError
from model.generation_settings import GenerationSettings
from model.ranks import launched
from model.sizes import format_bytes, format_count, format_number


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
    chat.add_argument(
        "--lang", help=f"interface language ({', '.join(LANGUAGES)}); default from LC_ALL or LANG"
    )
    add_budget_option(chat)
    add_hosts_option(chat)
    chat.add_argument("--local", action="store_true",
                      help="load the model in-process, not via `mixchat serve`")  # fmt: skip
    chat.set_defaults(func=cmd_chat)

    ask = commands.add_parser("ask", help="answer one prompt, streaming to stdout")
    add_model_option(ask)
    ask.add_argument(
        "prompt", nargs="?",
        help="the prompt; '-' or absent with a pipe: stdin; given with a pipe: the prompt, a "
        "blank line, then stdin (`cat notes.txt | mixchat ask \"Summarize this.\"`)",
    )  # fmt: skip
    ask.add_argument("--system", help="system prompt")
    ask.add_argument(
        "--safe", action="store_true",
        help="safe mode: put Mistral's guardrail system prompt before --system (as the chat "
        "app's safe mode does)",
    )  # fmt: skip
    ask.add_argument(
        "--max-tokens", type=int, default=512, metavar="N",
        help="most tokens in the reply (default %(default)s; fewer if the context is full)",
    )  # fmt: skip
    ask.add_argument(
        "--raw", action="store_true",
        help="complete the prompt as plain text (BOS, then the prompt), without the chat format",
    )  # fmt: skip
    ask.add_argument(
        "--temp", type=float, default=0.0, metavar="T",
        help="sampling temperature (default 0: greedy, reproducible one-shot answers)",
    )  # fmt: skip
    ask.add_argument(
        "--top-p", type=float, default=1.0, metavar="P",
        help="nucleus sampling, in (0, 1] (default %(default)s: off)",
    )  # fmt: skip
    ask.add_argument(
        "--min-p", type=float, default=0.0, metavar="P",
        help="min-p sampling, in [0, 1) (default %(default)s: off)",
    )  # fmt: skip
    ask.add_argument(
        "--seed", type=int, metavar="N",
        help="random seed, 0 to 2**64-1, for reproducible sampling with --temp > 0 "
        "(default: a new one each run)",
    )  # fmt: skip
    ask.add_argument("--json", action="store_true", help="print one JSON object instead")
    ask.add_argument("--quiet", "-q", action="store_true", help="no statistics on stderr")
    ask.add_argument("--local", action="store_true", help="answer in-process, not via `mixchat serve`")
    ask.add_argument("--adapter-path", metavar="PATH",
                     help="apply a LoRA adapter (mixchat tune's or mlx_lm.lora's); in-process")  # fmt: skip
    add_budget_option(ask)
    add_hosts_option(ask)
    ask.set_defaults(func=cmd_ask)

    models = commands.add_parser("models", help="list the models mixchat can find")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    info = commands.add_parser("info", help="describe a model without loading it")
    info.add_argument("model", nargs="?", help="path, cached repo id, or omit for the default")
    info.add_argument("--json", action="store_true")
    info.add_argument("--dtype", choices=DTYPES, help="compute dtype override")
    info.add_argument("--remeasure", action="store_true",
                      help="measure this machine's disk, memory and kernel speed again "
                      "(they are kept in the data directory)")  # fmt: skip
    info.add_argument("--hosts", metavar="HOSTFILE", help="memory per rank and speed over a "
                      "hostfile's machines (mlx.launch's or the ring backend's)")  # fmt: skip
    add_budget_option(info)
    info.set_defaults(func=cmd_info)

    from quantize.cli import register  # `download` and `quantize` (argparse only: cheap)

    register(commands)
    from app.serve.cli import register as register_serve

    register_serve(commands)
    from app.tune_cli import register as register_tune  # `tune` (argparse only: cheap)

    register_tune(commands)
    return parser


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", help="model directory, .gguf file or cached HF repo id (default: embedded)"
    )
    parser.add_argument("--dtype", choices=DTYPES, help="compute dtype override")


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


def is_piped(stdin: TextIO) -> bool:
    """Whether stdin is a pipe or a redirected file (not a terminal, nor nothing at all)."""
    try:
        mode = os.fstat(stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):  # closed, or a stand-in without a descriptor
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def decode_stdin(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MixchatError(f"stdin is not valid UTF-8 (byte {e.start})") from None


def read_prompt(argument: str | None, stdin: TextIO) -> str:
    """The prompt: the argument; stdin for '-' or no argument; with an argument and a pipe, the
    argument (an instruction), a blank line, then the piped text, as `llm` and others join them."""
    if argument is None and stdin.isatty():
        raise UsageError("no prompt: give one as an argument or pipe it on stdin")
    if argument in (None, "-"):
        prompt = decode_stdin(stdin.buffer.read())
    else:
        prompt = clean_text(argument)
        # mlx.launch keeps every rank's stdin open: there the argument is the whole prompt.
        if is_piped(stdin) and not launched():
            if (piped := decode_stdin(stdin.buffer.read())).strip():
                prompt = f"{prompt}\n\n{piped}"
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return prompt


def ask_messages(prompt: str, system: str | None, safe: bool) -> list[dict]:
    """The conversation `ask` sends: the system prompt (safe-mode guardrail first), then the
    prompt."""
    text = system_prompt(safe_mode=safe, system=clean_text(system or ""))
    return ([{"role": "system", "content": text}] if text else []) + [
        {"role": "user", "content": prompt}
    ]


def cmd_ask(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    generation = GenerationSettings(
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
    )
    try:
        generation.validate()  # every argument is checked before MLX is imported
    except MixchatError as e:
        raise UsageError(str(e)) from None
    prompt = read_prompt(args.prompt, sys.stdin)
    if args.raw and (args.system or args.safe):
        raise UsageError("--system and --safe need a chat template; a raw completion has none")
    messages = ask_messages(prompt, args.system, args.safe)
    if not args.local and not args.raw and not args.hosts and not args.adapter_path:  # `mixchat serve` answers (app/client.py)
        from app.client import ask_server

        if (code := ask_server(args, messages)) is not None:
            return code
    from model import registry

    registry.resolve(settings.model)  # a missing model fails now, not after MLX loads
    join_hosts(args)
    strings = STRINGS.get(settings.lang, STRINGS["en"])
    show_progress = sys.stderr.isatty() and not args.quiet
    if show_progress:
        key = "loading" if settings.model else "loading_default"
        print(strings[key].format(model=settings.model), file=sys.stderr, end="\r")
    from model import Engine  # MLX and the model code: only now

    engine = Engine.load(
        settings.model,
        dtype=settings.dtype,
        memory_budget=settings.memory_budget,
        max_context=args.max_context,
        kv_bits=args.kv_bits,
        streams=settings.streams,
    )
    if args.adapter_path:
        from model.tune.lora import load_adapter

        load_adapter(engine.model, args.adapter_path)
    if show_progress:
        print("\r\033[K", file=sys.stderr, end="")  # erase the loading line
    if engine.memory_notice:  # chosen for the user (or a warning): always said, in one line
        print(f"mixchat: {engine.memory_notice}", file=sys.stderr)
    raw = args.raw or not engine.has_chat_template
    if raw and not args.raw and not args.quiet:
        print(f"[{engine.name} has no chat template: completing the prompt as plain text]",
              file=sys.stderr)  # fmt: skip
    if raw and (args.system or args.safe):
        raise MixchatError(f"{engine.name} has no chat template: --system and --safe need one")
    stream = engine.stream_text(prompt, generation) if raw else engine.stream(messages, generation)
    text, stats = [], None
    for chunk in stream:
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
            for line in stats_lines(stats, settings.lang):
                print(line, file=sys.stderr)
    return 0


# `ask`'s stderr lines, in the interface language (numbers too: 12,3 jetons/s, 530 Mo).
STRINGS = {
    "en": {
        "loading": "Loading {model}…",
        "loading_default": "Loading the default model…",
        "stats": "[prompt {prompt} tokens, {prompt_tps} tok/s | reply {reply} tokens, "
        "{reply_tps} tok/s | peak memory {memory} | {reason}]",
        "experts": "[experts: {hits} cache hits, {read} read per token, {load} s loading, "
        "{compute} s computing]",
        "percent": "{}%",
        "stop": "stop",
        "length": "length",
        "cancelled": "cancelled",
    },
    "fr": {
        "loading": "Chargement de {model}…",
        "loading_default": "Chargement du modèle par défaut…",
        "stats": "[invite {prompt} jetons, {prompt_tps} jetons/s | réponse {reply} jetons, "
        "{reply_tps} jetons/s | mémoire max {memory} | {reason}]",
        "experts": "[experts : {hits} trouvés en cache, {read} lus par jeton, {load} s de "
        "lecture, {compute} s de calcul]",
        "percent": "{}\u202f%",
        "stop": "fin",
        "length": "limite de jetons",
        "cancelled": "interrompu",
    },
}


def stats_lines(stats, lang: str) -> list[str]:
    """The statistics `ask` prints on stderr, with numbers written as `lang` writes them."""
    strings = STRINGS.get(lang, STRINGS["en"])

    def number(value: float, decimals: int = 0) -> str:
        return format_number(value, decimals, lang)

    lines = [
        strings["stats"].format(
            prompt=number(stats.prompt_tokens),
            prompt_tps=number(stats.prompt_tps, 1),
            reply=number(stats.generation_tokens),
            reply_tps=number(stats.generation_tps, 1),
            memory=format_bytes(stats.peak_memory_gb * 1e9, lang),
            reason=strings.get(stats.finish_reason, stats.finish_reason),
        )
    ]
    if stats.expert_hit_rate is not None:
        lines.append(
            strings["experts"].format(
                hits=strings["percent"].format(number(stats.expert_hit_rate * 100)),
                read=format_bytes(stats.bytes_read_per_token or 0, lang),
                load=number(stats.load_seconds or 0, 2),
                compute=number(stats.compute_seconds or 0, 2),
            )
        )
    return lines


def add_hosts_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", metavar="HOSTFILE", help="run over several Macs: this one is "
                        "rank 0 and starts the others of this mlx.launch hostfile (README)")


def join_hosts(args: argparse.Namespace) -> None:
    if args.hosts:  # this process is rank 0 and starts the other ranks
        from model.distributed.launch import join_hosts as start

        start(args.hosts, args.argv)


def cmd_chat(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    join_hosts(args)
    if settings.memory_budget is not None and not launched():  # ranks agree on it as they load
        check_memory_budget(args)  # a budget that cannot work fails before the UI opens
    from app.tui import run_chat

    return run_chat(
        model=settings.model,
        lang=settings.lang,
        data_dir=settings.data_dir,
        dtype=settings.dtype,
        memory_budget=settings.memory_budget,
        max_context=args.max_context,
        kv_bits=args.kv_bits,
        streams=settings.streams,
        server=None if args.local or args.hosts or launched() else settings.server,  # ranks: local
        api_key=settings.api_key,
    )


def check_memory_budget(args: argparse.Namespace) -> None:
    """Raise the one-line BudgetError a budget too small for the model gets, without loading."""
    from model import registry, weights

    settings: Settings = args.settings
    checkpoint = weights.locate(registry.resolve(settings.model))
    weights.plan_memory(checkpoint, settings.dtype, settings.memory_budget, args.max_context,
                        args.kv_bits)  # fmt: skip


def cmd_models(args: argparse.Namespace) -> int:
    from model.registry import list_models

    entries = list_models(args.settings.data_dir)
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
    settings: Settings = args.settings
    dtype = weights.compute_dtype(checkpoint, settings.dtype)
    info = model_info(checkpoint, name, dtype.size)
    fit = fit_report(
        checkpoint, dtype, settings.memory_budget, args.model, args.max_context, args.kv_bits,
        MeasurementCache(settings.data_dir / CACHE_FILE), args.remeasure,
        weights.stream_count(settings.streams),
    )
    hosts = None
    if args.hosts:
        from model.distributed import hosts_report

        hosts = hosts_report(checkpoint, dtype.size, args.hosts)
    if args.json:
        extra = {"memory": fit.as_dict()} | ({"hosts": hosts[1]} if hosts else {})
        print(json.dumps(info.as_dict() | extra, ensure_ascii=False, indent=1))
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
        *([("tensor types", info.tensor_types)] if info.tensor_types else []),
        ("size on disk", format_bytes(info.size_bytes)),
        ("memory to run", f"{format_bytes(info.memory_bytes)} weights + "
                          f"{format_bytes(info.kv_bytes_per_token * 1024)} KV cache per 1K tokens"),
        ("context", f"{info.context_length} tokens"
                    + (f", sliding window {info.sliding_window}" if info.sliding_window else "")),
    ]
    rows += fit.rows() + (hosts[0] if hosts else [])
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
    settings = None
    try:
        args = parser.parse_args(argv)
        args.argv = argv  # as given (`mixchat serve --detach` runs the same in the background)
        args.settings = settings = read_settings(args)  # the one read of the environment
        args.argv = argv  # --hosts starts the other ranks with the same command line
        if args.command in ("ask", "chat") and launched():
            from model import distributed

            if not distributed.world().leader:  # rank 0 leads, this rank follows
                return distributed.follow(settings.model, dtype=settings.dtype,
                                          memory_budget=settings.memory_budget,
                                          max_context=args.max_context, kv_bits=args.kv_bits,
                                          streams=settings.streams)  # fmt: skip
        return args.func(args)
    except (UsageError, SettingsError) as e:
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
        if settings is not None and settings.debug:
            raise
        if distributed := sys.modules.get("model.distributed"):
            distributed.after_failure(e)  # a lost rank: one line from the watchdog
        print(f"mixchat: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
