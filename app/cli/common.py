"""What every `mixchat` command shares (below every command module): the usage error and its
parser, the options several commands take, argument types, and `ask`'s output (its statistics
lines and its JSON object, the same in-process and through a server)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from app.i18n import Strings
from app.settings import DTYPES
from model.ranks import launched
from model.sizes import format_bytes, format_number, parse_budget, parse_size
from model.stats import GenerationStats


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# --- argument types --------------------------------------------------------------------------


def size(text: str) -> int:
    """argparse type of a SIZE (--prompt-cache): bytes, as model/sizes.py parses them."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def memory_size(text: str) -> int | str:
    """argparse type of --memory-budget: bytes, or "auto"/"none" (resolved when used)."""
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


# --- options several commands take -----------------------------------------------------------


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", help="model directory, .gguf file or cached HF repo id (default: embedded)"
    )
    parser.add_argument("--dtype", choices=DTYPES, help="compute dtype override")


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


def add_adapter_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter-path", metavar="PATH", type=adapter_dir,
                        help="apply a LoRA adapter: a directory with adapters.safetensors and "
                        "adapter_config.json (mixchat tune's or mlx_lm.lora's)")  # fmt: skip


def adapter_dir(text: str) -> str:
    """argparse type of --adapter-path: an existing directory, made absolute (a server, whose
    working directory is another, may load it)."""
    path = Path(text).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise argparse.ArgumentTypeError(f"no adapter at {text} (no adapter_config.json there)")
    return str(path.resolve())


def add_hosts_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", metavar="HOSTFILE", help="run over several Macs: this one is "
                        "rank 0 and starts the others of this mlx.launch hostfile (README)")


def join_hosts(args: argparse.Namespace) -> None:
    """With --hosts, this process is rank 0 and starts the other ranks."""
    if args.hosts:
        from model.distributed.launch import join_hosts as start

        settings = args.settings
        start(args.hosts, args.argv, settings.rank_variables, settings.parallel)


def rank_split(settings):
    """This process's part of a model split over several ranks (joined as MIXCHAT_PARALLEL
    says), or None: one process loads the whole model."""
    if not launched():
        return None
    from model.distributed import rank_split as split

    return split(settings.parallel)


# --- `ask`'s output ----------------------------------------------------------------------------


def stats_lines(stats: GenerationStats, lang: str) -> list[str]:
    """The statistics `ask` prints on stderr, in the interface language (numbers too: 12,3
    jetons/s, 530 Mo)."""
    strings = Strings(lang)

    def number(value: float, decimals: int = 0) -> str:
        return format_number(value, decimals, strings.language)

    reason = stats.finish_reason
    lines = [
        strings(
            "ask.stats",
            prompt=number(stats.prompt_tokens),
            prompt_tps=number(stats.prompt_tps, 1),
            reply=number(stats.generation_tokens),
            reply_tps=number(stats.generation_tps, 1),
            memory=format_bytes(stats.peak_memory_gb * 1e9, strings.language),
            reason=strings(f"ask.{reason}") if strings.has(f"ask.{reason}") else reason,
        )
    ]
    if stats.expert_hit_rate is not None:
        lines.append(
            strings(
                "ask.experts",
                hits=strings("ask.percent").format(number(stats.expert_hit_rate * 100)),
                read=format_bytes(stats.bytes_read_per_token or 0, strings.language),
                load=number(stats.load_seconds or 0, 2),
                compute=number(stats.compute_seconds or 0, 2),
            )
        )
    return lines


ANSWER_FIGURES = ("prompt_tokens", "generation_tokens", "prompt_tps", "generation_tps",
                  "peak_memory_gb", "finish_reason")  # fmt: skip
EXPERT_FIGURES = ("expert_hit_rate", "bytes_read_per_token", "prompt_bytes_read_per_token",
                  "load_seconds", "compute_seconds")  # fmt: skip


def answer_json(text: str, model: str | None, stats: GenerationStats,
                seed: int | None = None) -> dict[str, Any]:  # fmt: skip
    """`ask --json`'s object, the same in-process and through a server: the text, the figures
    (GenerationStats' names), the model, the seed the reply was sampled with (None: greedy;
    `--seed` it to sample the same reply again)."""
    return ({"text": text} | {name: getattr(stats, name) for name in ANSWER_FIGURES}
            | {"model": model, "seed": seed}
            | {name: getattr(stats, name) for name in EXPERT_FIGURES})  # fmt: skip


def print_reply(pieces: Iterable[str], args: argparse.Namespace, guard=None) -> str:
    """Stream the reply's text to stdout (not with --json); return the whole text. With a
    `guard` (app.moderation.stream.ReplyGuard, `--safe`), stop reading at the first flagged
    sentence window: the text printed so far stays."""
    text = []
    for piece in pieces:
        text.append(piece)
        if piece and not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
        if guard is not None and guard.feed(piece):
            break
    else:
        if guard is not None:
            guard.finish()
    return "".join(text)


def print_end(text: str, model: str | None, stats: GenerationStats,
              args: argparse.Namespace) -> int:  # fmt: skip
    """After the reply: the JSON object (--json), else a newline and the statistics on stderr
    (not with --quiet)."""
    if args.json:
        seed = getattr(args, "seed_used", None)
        print(json.dumps(answer_json(text, model, stats, seed), ensure_ascii=False))
        return 0
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        for line in stats_lines(stats, args.settings.lang):
            print(line, file=sys.stderr)
    return 0


FLAGGED = 3  # exit status: --safe stopped the prompt or the reply


def print_flagged(text: str, result, args: argparse.Namespace) -> int:
    """The reply was stopped by --safe: the text printed so far stays; one line on stderr
    (--json: the text, finish_reason content_filter and the moderation result); exit 3."""
    from app.moderation.stream import folded_line

    if args.json:
        print(json.dumps({"text": text, "finish_reason": "content_filter",
                          "moderation": result.to_json()}, ensure_ascii=False))  # fmt: skip
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(f"mixchat: {folded_line(result)}", file=sys.stderr)
    return FLAGGED
