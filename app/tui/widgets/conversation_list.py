"""The sidebar list of saved chats, the most recent first."""

from __future__ import annotations

import re
from collections.abc import Sequence

from rich.text import Text
from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from app.store import Conversation

# Sequences whose width terminals disagree on (Rich counts a skin-toned or ZWJ-joined emoji as
# one 2-cell glyph, many terminals as 4 or 6 cells; a flag's two regional indicators as one
# glyph or two): in the sidebar's fixed frame they would push its right border out of line.
_JOINED = re.compile("\u200d.")  # a zero-width joiner and the emoji it joins on
_MODIFIERS = re.compile("[\U0001F3FB-\U0001F3FF\uFE00-\uFE0F]")  # skin tones, variation selectors
_FLAG = re.compile("([\U0001F1E6-\U0001F1FF])([\U0001F1E6-\U0001F1FF])?")


def sidebar_title(title: str) -> str:
    """The title as the sidebar shows it: each character as wide in every terminal as Rich
    measures it (a family emoji is its first person, a flag its country's letters)."""
    title = _MODIFIERS.sub("", _JOINED.sub("", title))
    return _FLAG.sub(
        lambda m: "".join(chr(ord(c) - 0x1F1E6 + ord("A")) for c in m.groups() if c), title
    )


class ConversationList(OptionList):
    """Saved chats; choosing one posts ``ConversationList.Chosen``."""

    class Chosen(Message):
        def __init__(self, conversation_id: int) -> None:
            super().__init__()
            self.conversation_id = conversation_id

    def __init__(self, *, empty_text: str, id: str | None = None) -> None:
        super().__init__(id=id)
        self._empty_text = empty_text
        self._conversation_ids: list[int] = []

    def show_conversations(
        self, conversations: Sequence[Conversation], current_id: int | None
    ) -> None:
        """Replace the list; the open chat is highlighted."""
        self.clear_options()
        self._conversation_ids = [conversation.id for conversation in conversations]
        if not conversations:
            self.add_option(Option(Text(self._empty_text, style="italic"), disabled=True))
            return
        self.add_options(
            Option(
                Text(sidebar_title(conversation.title), no_wrap=True, overflow="ellipsis"), id=str(conversation.id)
            )
            for conversation in conversations
        )
        if current_id in self._conversation_ids:
            self.highlighted = self._conversation_ids.index(current_id)
        else:
            self.highlighted = None

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is not None:
            self.post_message(self.Chosen(int(event.option.id)))
