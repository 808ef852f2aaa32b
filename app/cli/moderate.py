"""`mixchat moderate [--json] [--guard-model M] [TEXT | -]`: check a text offline.

The lexical guard always runs (no model loaded); --guard-model adds a Llama Guard 3
checkpoint, --self-check the chat model (--model) checking itself. Exit 0 when nothing flags,
3 when the text is flagged (a script can branch on it), 1 for bad input (one line).
"""

from __future__ import annotations

import argparse
import json
import sys

from model.errors import MixchatError

from .common import add_budget_option, add_model_option

FLAGGED = 3


def register(commands: argparse._SubParsersAction) -> None:
    """Add the `moderate` subcommand to the `mixchat` parser's subparsers."""
    moderate = commands.add_parser(
        "moderate", help="check a text for harmful content, offline (exit 3 when flagged)"
    )
    moderate.add_argument("text", nargs="?", metavar="TEXT",
                          help="the text; '-' or absent: stdin")  # fmt: skip
    moderate.add_argument("--json", action="store_true",
                          help="print one JSON object: flagged, categories, category_scores, "
                          "guard, seconds")  # fmt: skip
    moderate.add_argument("--guard-model", metavar="M",
                          help="a Llama Guard 3 checkpoint (directory, .gguf or cached repo id)")  # fmt: skip
    moderate.add_argument("--self-check", action="store_true",
                          help="also ask the chat model (--model) to classify the text")  # fmt: skip
    moderate.add_argument("--role", choices=("user", "assistant"), default="user",
                          help="check the text as a user's message or a model's reply")  # fmt: skip
    moderate.add_argument("--flag-advice", action="store_true",
                          help="health, financial and law advice flag too")  # fmt: skip
    add_model_option(moderate)
    add_budget_option(moderate)
    moderate.set_defaults(func=run)


def read_text(argument: str | None) -> bytes | str:
    if argument is not None and argument != "-":
        return argument
    if sys.stdin is None or sys.stdin.isatty():
        raise MixchatError("no text: give TEXT, or pipe it (`... | mixchat moderate -`)")
    return sys.stdin.buffer.read()


def run(args: argparse.Namespace) -> int:
    from app.moderation import Policy, check_text

    text = check_text(read_text(args.text))  # bad input fails before any model loads
    engine = None
    if args.self_check and not args.guard_model:
        from model import Engine

        engine = Engine.load(args.settings.model, args.settings.load_options)
    policy = Policy.build(args.guard_model, args.settings.load_options, engine,
                          self_check=args.self_check, flag_advice=args.flag_advice)  # fmt: skip
    result = policy.check(text, role=args.role)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print(result.notice() or f"not flagged (by {result.guard}, {result.seconds * 1000:.1f} ms)")
    return FLAGGED if result.flagged else 0
