"""What safe mode does on the chat screen (app/tui/moderation.py says what is checked): a
flagged message is held back in the prompt box with a notice naming its categories, until it
is edited or sent anyway (Ctrl+G: unchecked, once); a reply stopped by the reply guard is
folded behind a notice, and revealed on a click or Enter (the reveal is saved with it)."""

from __future__ import annotations

from app.i18n import Strings
from app.store import ConversationStore, StoredMessage
from app.tui.moderation import CONTENT_FILTER, ChatModeration, is_folded
from app.tui.widgets.message_view import MessageView

HELD_CLASS = "held-by-safe-mode"


class SafeModeActions:
    """Mixed into ChatScreen (app/tui/screens/chat.py), which provides the state below and
    ``settings``, ``send_prompt``, ``chat_log``, ``prompt_box``, and Textual's ``notify`` and
    ``refresh_bindings``."""

    store: ConversationStore
    strings: Strings
    history: list[StoredMessage]
    moderation: ChatModeration
    held: str | None = None  # the text safe mode held back, while its notice stands
    _send_unchecked: bool = False

    async def held_back(self, text: str) -> bool:
        """Check ``text`` before it is sent; True when it is held back (nothing sent, nothing
        saved: the text is back in the prompt box and a notice says why)."""
        unchecked, self._send_unchecked = self._send_unchecked, False
        await self.chat_log.query(f".{HELD_CLASS}").remove()
        self.held = None
        if unchecked or not self.moderation.active(self.settings):
            self.refresh_bindings()
            return False
        flagged = self.moderation.check_prompt(text)
        if flagged is None:
            self.refresh_bindings()
            return False
        kind, result = flagged
        if not self.prompt_box.text.strip():
            self.prompt_box.set_prompt(text)
        t = self.strings
        notice = t(f"notice.held_{kind}", categories=", ".join(result.flagged_categories),
                   guard=result.guard)  # fmt: skip
        await self.chat_log.add_notice(notice, kind="warning", classes=HELD_CLASS)
        self.chat_log.follow()  # the notice, just above the prompt box (no toast over it)
        self.held = text
        self.refresh_bindings()
        return True

    async def action_send_anyway(self) -> None:
        """Ctrl+G: send what the prompt box holds, without the check, once."""
        if self.held is None:
            return
        text = self.prompt_box.prompt_text
        if not text.strip():
            text = self.held
        self.prompt_box.clear_prompt()
        self._send_unchecked = True
        try:
            await self.send_prompt(text)
        finally:  # not sent (a reply still being written): the next try is checked again
            self._send_unchecked = False

    def fold_if_stopped(self, view: MessageView, message: StoredMessage) -> None:
        """A reply stopped by safe mode, not revealed: behind its notice."""
        if is_folded(message.stats):
            stats = message.stats or {}
            view.fold(self.strings("message.folded", categories=stats.get("flagged", "?"),
                                   guard=stats.get("guard", "?")))  # fmt: skip

    def on_message_view_revealed(self, event: MessageView.Revealed) -> None:
        """Remember the reveal: the reply shows after a restart too."""
        for message in self.history:
            if message.id == event.view.message_id and message.stats:
                if message.stats.get("finish_reason") == CONTENT_FILTER:
                    message.stats["revealed"] = True
                    self.store.update_message(message.id, message.content, complete=True,
                                              stats=message.stats)  # fmt: skip
                break
