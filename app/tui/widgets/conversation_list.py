"""The sidebar list of saved chats, the most recent first."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from app.store import Conversation


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
                Text(conversation.title, no_wrap=True, overflow="ellipsis"), id=str(conversation.id)
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
