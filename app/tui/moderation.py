"""Safe mode in the chat app (issue 20): what is checked, with which policy, and how a stopped
reply is remembered.

With safe mode on (the chat's switch, or `mixchat chat --safe` / `--guard-model M` for every
chat), the user's message is checked before it is sent (the lexical guard, plus the Llama Guard
checkpoint when one is given); a long paste's document part is framed as data and checked for
injection; the reply is checked as it streams, in sentence windows (the lexical guard, as `ask`
does). A stopped reply is saved whole (what was written up to the flagged window), with
``finish_reason: "content_filter"``, the categories, the guard and whether it was revealed in
its stats: the fold survives a restart, and so does a reveal. The model's context keeps what was
generated up to the stop, as `ask` does (folding hides it from the eye, not from the model).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from app.moderation.policy import Policy
from app.moderation.result import ModerationResult
from app.moderation.stream import (
    ReplyGuard,
    check_document,
    check_message,
    frame_message,
    split_paste,
)
from app.store import ChatSettings

CONTENT_FILTER = "content_filter"


class ChatModeration:
    """The chat app's checks: ``policy`` (None: the offline lexical default); ``forced``: on for
    every chat (`mixchat chat --safe`), else only for chats whose safe-mode switch is on."""

    def __init__(self, policy: Policy | None = None, *, forced: bool = False) -> None:
        self.policy = policy
        self.forced = forced

    def active(self, settings: ChatSettings) -> bool:
        return self.forced or settings.safe_mode

    def effective(self, settings: ChatSettings) -> ChatSettings:
        """The settings a reply is built with: --safe puts the guardrail prompt in every chat."""
        return replace(settings, safe_mode=True) if self.forced else settings

    def check_prompt(self, text: str) -> tuple[str, ModerationResult] | None:
        """("message" | "paste", the result) when the text must not be sent, else None. A long
        paste's document part is checked for injection only (a document may describe violence:
        it is data), the instruction around it as a message."""
        instruction, document = split_paste(text)
        if document:
            if (result := check_document(document, self.policy)) is not None:
                return "paste", result
            text = instruction
        result = check_message(text, self.policy)
        return None if result is None else ("message", result)

    def frame(self, messages: list[dict]) -> list[dict]:
        """The chat's messages as the model reads them: long pastes framed as data."""
        return [
            {**m, "content": frame_message(m["content"])} if m["role"] == "user" else m
            for m in messages
        ]

    def reply_guard(self, messages: list[dict] | None = None) -> ReplyGuard:
        """The reply's check, as `ask --safe` does it: the lexical guard every sentence window;
        a guard model (--guard-model), if any, judges the reply so far as Llama Guard's agent
        turn after the user's last message, every few windows and at the end."""
        users = [m for m in messages or [] if m.get("role") == "user"]
        return ReplyGuard(self.policy, context=users[-1:])


def stopped_stats(stats: dict[str, Any] | None, result: ModerationResult) -> dict[str, Any]:
    """A stopped reply's stats as the store keeps them (flat values only)."""
    return {
        **(stats or {}),
        "finish_reason": CONTENT_FILTER,
        "flagged": ", ".join(result.flagged_categories),
        "guard": result.guard,
        "revealed": False,
    }


def is_folded(stats: dict[str, Any] | None) -> bool:
    """A stored reply that was stopped by safe mode and not revealed since."""
    return bool(stats) and stats.get("finish_reason") == CONTENT_FILTER and not stats.get("revealed")
