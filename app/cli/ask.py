"""`mixchat ask`: answer one prompt, streaming to stdout; through a running `mixchat serve`
(ask_server.py) when one answers, else in-process."""

from __future__ import annotations

import argparse
import os
import secrets
import stat
import sys
from typing import TextIO

from app.i18n import Strings
from app.prompts import system_prompt
from app.settings import Settings
from model.errors import MixchatError
from model.generation_settings import GenerationSettings
from model.ranks import launched

from .common import (
    FLAGGED,
    UsageError,
    add_adapter_option,
    add_budget_option,
    add_hosts_option,
    add_model_option,
    join_hosts,
    print_end,
    print_flagged,
    print_reply,
    rank_split,
)


def register(commands: argparse._SubParsersAction) -> None:
    ask = commands.add_parser(
        "ask", help="answer one prompt, streaming to stdout",
        description="Answer PROMPT (or stdin) and stream the reply to stdout, with statistics "
        "(prompt and decode tok/s, peak memory) on stderr, in the interface language. Greedy "
        "unless --temp is set. Through `mixchat serve` when one runs, else in-process. Exit "
        "codes: 0 ok, 1 error, 2 usage, 3 flagged by --safe, 130 interrupted; every error is "
        "one line on stderr.",
    )  # fmt: skip
    add_model_option(ask)
    ask.add_argument(
        "prompt", nargs="?",
        help="the prompt; '-' or absent with a pipe: stdin; given with a pipe: the prompt, a "
        "blank line, then stdin (`cat notes.txt | mixchat ask \"Summarize this.\"`)",
    )  # fmt: skip
    ask.add_argument("--system", help="system prompt")
    ask.add_argument(
        "--safe", action="store_true",
        help="safe mode (as the chat app's): Mistral's guardrail system prompt before --system; "
        "the prompt checked before it is sent and piped text framed as data and checked for "
        "injection (flagged: nothing is sent, exit 3); the reply checked as it streams, "
        "stopped when flagged (exit 3)",
    )  # fmt: skip
    ask.add_argument(
        "--guard-model", metavar="M",
        help="with --safe: also check the prompt, and the reply as it streams (every few "
        "sentences and at its end), with this Llama Guard 3 checkpoint",
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
        "(default: a new one each run, reported by --json; greedy decoding ignores it)",
    )  # fmt: skip
    ask.add_argument("--json", action="store_true", help="print one JSON object instead")
    ask.add_argument("--quiet", "-q", action="store_true", help="no statistics on stderr")
    ask.add_argument("--local", action="store_true", help="answer in-process, not via `mixchat serve`")
    think = ask.add_mutually_exclusive_group()
    think.add_argument(
        "--think", dest="think", action="store_const", const=True, default=None,
        help="let a model whose chat template has a thinking switch (Qwen3) think first "
        "(default: as its template does)",
    )  # fmt: skip
    think.add_argument(
        "--no-think", dest="think", action="store_const", const=False,
        help="answer without thinking (Qwen3's enable_thinking=False)",
    )  # fmt: skip
    add_adapter_option(ask)
    add_budget_option(ask)
    add_hosts_option(ask)
    ask.set_defaults(func=cmd_ask)


# --- the prompt ------------------------------------------------------------------------------


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
    instruction, piped = read_parts(argument, stdin)
    return f"{instruction}\n\n{piped}" if piped else instruction


def read_parts(argument: str | None, stdin: TextIO) -> tuple[str, str]:
    """(the prompt, the piped text): the piped text is "" unless there is both an argument and
    a pipe (then the argument is the instruction and the piped text a document)."""
    if argument is None and stdin.isatty():
        raise UsageError("no prompt: give one as an argument or pipe it on stdin")
    piped = ""
    if argument in (None, "-"):
        prompt = decode_stdin(stdin.buffer.read())
    else:
        prompt = clean_text(argument)
        # mlx.launch keeps every rank's stdin open: there the argument is the whole prompt.
        if is_piped(stdin) and not launched():
            if not (piped := decode_stdin(stdin.buffer.read())).strip():
                piped = ""
    if not prompt.strip() and not piped:
        raise UsageError("the prompt is empty")
    return prompt, piped


def ask_messages(prompt: str, system: str | None, safe: bool) -> list[dict]:
    """The conversation `ask` sends: the system prompt (safe-mode guardrail first), then the
    prompt."""
    text = system_prompt(safe_mode=safe, system=clean_text(system or ""))
    return ([{"role": "system", "content": text}] if text else []) + [
        {"role": "user", "content": prompt}
    ]


# --- the answer ------------------------------------------------------------------------------


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    """The sampling arguments, checked (a usage error) before MLX is imported."""
    generation = GenerationSettings(max_tokens=args.max_tokens, temperature=args.temp,
                                    top_p=args.top_p, min_p=args.min_p, seed=args.seed)  # fmt: skip
    try:
        generation.validate()
    except MixchatError as e:
        raise UsageError(str(e)) from None
    if generation.temperature == 0 and generation.seed is not None:
        print(f"mixchat: --seed {generation.seed} is ignored: without --temp the reply is greedy "
              "(the same every run)", file=sys.stderr)  # fmt: skip
        generation.seed = None
    elif generation.temperature > 0 and generation.seed is None:
        generation.seed = secrets.randbits(32)  # chosen here, so --json can report it
    args.seed_used = generation.seed  # None: greedy
    return generation


def cmd_ask(args: argparse.Namespace) -> int:
    generation = generation_settings(args)
    instruction, piped = read_parts(args.prompt, sys.stdin)
    if args.raw and (args.system or args.safe):
        raise UsageError("--system and --safe need a chat template; a raw completion has none")
    if args.guard_model and not args.safe:
        raise UsageError("--guard-model needs --safe")
    args.reply_guard = None
    if args.safe:
        if (flagged := check_input(args, instruction, piped)) is not None:
            return flagged
        from app.moderation.stream import ReplyGuard, frame_document

        # The reply: the lexical guard sentence by sentence; a guard model every few windows,
        # judging the reply so far as the agent turn after the user's message.
        args.reply_guard = ReplyGuard(args.policy, context=[{"role": "user", "content": instruction}])
        prompt = f"{instruction}\n\n{frame_document(piped)}" if piped else instruction
    else:
        prompt = f"{instruction}\n\n{piped}" if piped else instruction
    messages = ask_messages(prompt, args.system, args.safe)
    if not (args.local or args.raw or args.hosts):  # `mixchat serve` answers (adapter included)
        from .ask_server import ask_server

        if (code := ask_server(args, messages, generation)) is not None:
            return code
    return ask_in_process(args, prompt, messages, generation)


def ask_in_process(args: argparse.Namespace, prompt: str, messages: list[dict],
                   generation: GenerationSettings) -> int:  # fmt: skip
    settings: Settings = args.settings
    from model import registry

    registry.resolve(settings.model)  # a missing model fails now, not after MLX loads
    join_hosts(args)
    from app.moderation.policy import chat_load_options

    options, budget_line = chat_load_options(settings.load_options, getattr(args, "policy", None))
    if budget_line:  # --guard-model under a --memory-budget
        print(f"mixchat: {budget_line}", file=sys.stderr)
    show_progress = sys.stderr.isatty() and not args.quiet
    if show_progress:
        key = "ask.loading" if settings.model else "ask.loading_default"
        print(Strings(settings.lang)(key, model=settings.model), file=sys.stderr, end="\r")
    from model import Engine  # MLX and the model code: only now

    engine = Engine.load(settings.model, options, split=rank_split(settings))
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
    if raw:
        stream = engine.stream_text(prompt, generation)
    else:
        from model.tokenizer.hf import template_options

        if args.think is not None and getattr(engine.tokenizer, "thinking_default", None) is None:
            flag = "--think" if args.think else "--no-think"
            raise MixchatError(f"{flag}: {engine.name}'s chat template has no thinking switch")
        with template_options(enable_thinking=args.think):  # the prompt is encoded now
            stream = engine.stream(messages, generation)
    stats = None

    def pieces():
        nonlocal stats
        for chunk in stream:
            stats = chunk.stats or stats
            yield chunk.text

    guard = args.reply_guard
    text = print_reply(pieces(), args, guard)
    if guard is not None and guard.result is not None:  # --safe: stopped at a flagged window
        engine.cancel()
        return print_flagged(text, guard.result, args)
    assert stats is not None
    return print_end(text, engine.name, stats, args)


# --- safe mode -------------------------------------------------------------------------------


def check_input(args: argparse.Namespace, instruction: str, piped: str) -> int | None:
    """--safe: the prompt and the piped text checked before anything is sent (or loaded):
    exit 3 and one line when either is flagged, else None."""
    from app.moderation import Policy
    from app.moderation.stream import blocked_line, check_document, check_message

    policy = Policy.build(args.guard_model, args.settings.load_options) if args.guard_model else None
    args.policy = policy  # the reply is checked with it too
    for guard in policy.guards if policy else []:
        notice = getattr(getattr(guard, "engine", None), "memory_notice", "")
        if notice:  # the guard's own memory decision, said as the chat model's is
            print(f"mixchat: guard model: {notice}", file=sys.stderr)
    if (result := check_message(instruction, policy)) is not None:
        print(f"mixchat: {blocked_line(result, 'prompt')}", file=sys.stderr)
        return FLAGGED
    if piped and (result := check_document(piped, policy)) is not None:
        print(f"mixchat: the piped text was not sent: it looks like a prompt injection "
              f"({', '.join(result.flagged_categories)}, by {result.guard})", file=sys.stderr)  # fmt: skip
        return FLAGGED
    return None
