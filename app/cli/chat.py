"""`mixchat chat` (the default command): open the chat app."""

from __future__ import annotations

import argparse

from app.settings import LANGUAGES, Settings
from model.ranks import launched

from .common import (
    add_adapter_option,
    add_budget_option,
    add_hosts_option,
    add_model_option,
    join_hosts,
)


def register(commands: argparse._SubParsersAction) -> None:
    chat = commands.add_parser(
        "chat", help="open the chat app (the default)",
        description="Open the chat app (what `mixchat` alone does): conversations kept in the "
        "data directory, the reply streamed with its statistics, settings per chat, help (F1), "
        "model info (F3) and expert activity (F4), in English or French. The model loads in-process, "
        "or is used through `mixchat serve` when one runs. Under --memory-budget (or when the "
        "model does not fit) experts are read from disk as the router picks them.",
    )  # fmt: skip
    add_model_option(chat)
    chat.add_argument(
        "--lang", help=f"interface language ({', '.join(LANGUAGES)}); default from LC_ALL or LANG"
    )
    add_budget_option(chat)
    add_adapter_option(chat)
    add_hosts_option(chat)
    chat.add_argument(
        "--safe", action="store_true",
        help="safe mode in every chat: Mistral's guardrail system prompt; your message checked "
        "before it is sent (a flagged one is held back: edit it, or Ctrl+G sends it anyway), "
        "long pastes framed as data and checked for injection, the reply checked as it streams "
        "(stopped and folded when flagged; a click shows it)",
    )  # fmt: skip
    chat.add_argument(
        "--guard-model", metavar="M",
        help="implies --safe: also check your messages with this Llama Guard 3 checkpoint "
        "(loaded before the chat opens, under the memory budget)",
    )  # fmt: skip
    chat.add_argument("--local", action="store_true",
                      help="load the model in-process, not via `mixchat serve`")  # fmt: skip
    chat.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    join_hosts(args)
    if settings.memory_budget is not None and not launched():  # ranks agree on it as they load
        check_memory_budget(args)  # a budget that cannot work fails before the UI opens
    from app.tui.run import run_chat

    moderation = None
    if args.safe or args.guard_model:
        from app.moderation import Policy
        from app.tui.moderation import ChatModeration

        policy = Policy.build(args.guard_model, settings.load_options) if args.guard_model else None
        moderation = ChatModeration(policy, forced=True)  # a guard that fails: one line, exit 1

    return run_chat(
        model=settings.model,
        lang=settings.lang,
        data_dir=settings.data_dir,
        load_options=settings.load_options,
        server=None if args.local or args.hosts or launched() else settings.server,  # ranks: local
        api_key=settings.api_key,
        moderation=moderation,
    )


def check_memory_budget(args: argparse.Namespace) -> None:
    """Raise the one-line BudgetError a budget too small for the model gets, without loading."""
    from model import registry, weights

    settings: Settings = args.settings
    checkpoint = weights.locate(registry.resolve(settings.model))
    weights.plan_memory(checkpoint, settings.dtype, settings.memory_budget, settings.max_context,
                        settings.kv_bits)  # fmt: skip
