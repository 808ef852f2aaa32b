"""From a chat's settings and history to the messages the engine receives.

Pure functions, no UI: the system prompt (safe mode guardrail, the user's own prompt, the
reply-language instruction) and fitting the conversation into the model's context window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# The system prompt's parts live in app/prompts.py (shared with `mixchat ask --safe`).
from app.prompts import (  # noqa: F401 (SAFE_MODE_PROMPT, reply_language_instruction: re-exported)
    SAFE_MODE_PROMPT,
    reply_language_instruction,
    system_prompt,
)
from app.store import ChatSettings

Message = dict[str, str]


def system_prompt_for(settings: ChatSettings) -> str:
    """Safe-mode guardrail, then the chat's system prompt, then the language instruction."""
    return system_prompt(settings.safe_mode, settings.system_prompt, settings.reply_language)


def build_messages(settings: ChatSettings, history: Sequence[Message]) -> list[Message]:
    """The engine's messages: an optional system message, then the chat's turns."""
    system = system_prompt_for(settings)
    turns = [
        {"role": message["role"], "content": message["content"]}
        for message in history
        if message["role"] in ("user", "assistant")
    ]
    return ([{"role": "system", "content": system}] if system else []) + turns


@dataclass(frozen=True)
class FittedPrompt:
    messages: list[Message]
    max_tokens: int  # what is left for the reply (at most the chat's max_tokens)
    dropped_messages: int  # oldest messages left out to fit the context
    prompt_tokens: int
    fits: bool  # False: even the last user message alone does not fit


MIN_REPLY_TOKENS = 16


def fit_to_context(
    messages: Sequence[Message],
    count_tokens: Callable[[list[Message]], int],
    context_length: int,
    max_tokens: int,
) -> FittedPrompt:
    """Drop the oldest turns (never the system prompt nor the last user message) until the
    prompt plus the reply's ``max_tokens`` fits in ``context_length``. When only the last
    message is left and still leaves too little room, the reply's budget shrinks instead.
    """
    messages = list(messages)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    dropped = 0
    prompt_tokens = count_tokens(system + turns)
    while prompt_tokens + max_tokens > context_length and len(turns) > 1:
        # Drop one whole exchange: the oldest message and any replies up to the next user turn.
        cut = 1
        while cut < len(turns) - 1 and turns[cut]["role"] != "user":
            cut += 1
        turns = turns[cut:]
        dropped += cut
        prompt_tokens = count_tokens(system + turns)
    room = context_length - prompt_tokens
    fits = room >= min(MIN_REPLY_TOKENS, max_tokens)
    return FittedPrompt(
        messages=system + turns,
        max_tokens=max(0, min(max_tokens, room)),
        dropped_messages=dropped,
        prompt_tokens=prompt_tokens,
        fits=fits,
    )
