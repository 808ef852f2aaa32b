"""What every tokenizer offers (`Tokenizer`, `StreamingDetokenizer`) and the chat check they share."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import MixchatError

ROLES = ("system", "user", "assistant")


class StreamingDetokenizer:
    """Turns generated token ids into text one token at a time.

    `add` returns the text that became final with this token (possibly ""), never a partial
    multi-byte character; `finish` returns whatever was held back, whole characters only (the
    reply may end mid-character: max tokens, a stop, a cancel). The concatenation of every `add`
    output and `finish` equals `Tokenizer.decode(all_ids)`, less the U+FFFD that decode gives an
    incomplete last character.
    """

    def add(self, token_id: int) -> str:
        raise NotImplementedError

    def finish(self) -> str:
        raise NotImplementedError


class Tokenizer:
    """Common interface of every tokenizer.

    `bos_id` is the id this format puts at the start of a prompt (None when it puts none there);
    `eos_ids` are the ids that end a reply. `encode` never adds BOS; `decode` drops control tokens.
    """

    bos_id: int | None
    eos_ids: set[int]
    vocab_size: int
    has_chat_template: bool = True  # False: encode_chat refuses; complete raw text instead

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids for `messages` (ending with a user message), ready for generation."""
        raise NotImplementedError

    def encode_tool_chat(self, messages: list[dict], tools: list | None) -> list[int]:
        """Ids of a chat with tool definitions, assistant `tool_calls` and `tool` messages, as
        transformers' `apply_chat_template(messages, tools=tools, add_generation_prompt=True)`
        renders it (what mlx-lm's ChatDataset trains on); the chat may end with any role.
        Raises MixchatError (one line) when this chat format cannot encode tools."""
        raise MixchatError("this model's chat format has no tool calls")

    def detokenizer(self) -> StreamingDetokenizer:
        raise NotImplementedError


def check_messages(messages: list[dict]) -> list[tuple[str, str]]:
    """Validate a chat (roles, string contents, ends with a user message) as (role, content)."""
    if not messages:
        raise MixchatError("the conversation has no messages")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:
            raise MixchatError(f"message {i} has role {role!r}; expected system, user or assistant")
        if not isinstance(content, str):
            raise MixchatError(f"message {i} ({role}) has no text content")
        out.append((role, content))
    if out[-1][0] != "user":
        raise MixchatError(f"the last message must be a user message, not {out[-1][0]}")
    return out
