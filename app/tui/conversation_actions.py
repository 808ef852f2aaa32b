"""What the chat screen's keys do to the open conversation: stop or take back a reply (Esc,
Ctrl+C), new, regenerate, edit the last message, copy a reply, settings, rename, delete, export
(F9, and the folder it proposes).

``ConversationActions`` is mixed into ``ChatScreen`` (app/tui/screens/chat.py): Textual finds
``action_<name>`` there. It works on the screen's state (``conversation``, ``history``,
``editing``, ``draft_settings``, the store) and through the few screen methods named below; the
keys themselves are listed in app/tui/actions.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from textual import work
from textual.widgets import TextArea

from app.i18n import Strings
from app.store import ChatSettings, Conversation, ConversationStore, StoredMessage
from app.tui.clipboard import copy_text
from app.tui.engine import thinking_switch
from app.tui.reply_session import ActiveReply
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.settings import SettingsScreen
from app.tui.screens.text_prompt import TextPromptScreen
from app.tui.widgets.message_view import MessageView
from app.tui.widgets.reply_flow import ReplyFlow


class ConversationActions:
    """The conversation's actions of the chat screen (a mixin: ``ChatScreen`` provides the
    state below and ``settings``, ``notify_busy``, ``start_reply``, ``start_new_chat``,
    ``discard_from``, ``stop_editing``, ``show_empty_chat``, ``refresh_sidebar``, ``chat_log``,
    ``prompt_box``, ``status_bar``, and Textual's ``notify``, ``app``, ``focused``,
    ``refresh_bindings``)."""

    store: ConversationStore
    strings: Strings
    conversation: Conversation | None
    draft_settings: ChatSettings
    history: list[StoredMessage]
    editing: StoredMessage | None
    reply_flow: ReplyFlow

    async def action_cancel(self) -> None:
        """Esc: stop the reply (what was written stays), take back a message still waiting for
        the model (its text returns to the prompt box), or leave editing."""
        if self.reply_flow.session.reply is not None:
            self.reply_flow.cancel()
            return
        waiting = self.reply_flow.cancel()
        if waiting is not None:
            await self.take_back(waiting)
            return
        if self.editing is not None:
            self.stop_editing()
            self.prompt_box.clear_prompt()
            self.refresh_bindings()

    async def take_back(self, waiting: ActiveReply) -> None:
        """Unsend the message that waited for the model: out of the chat, back in the box."""
        await waiting.view.remove()
        message = self.history[-1] if self.history else None
        if message is None or message.role != "user" or self.conversation is None:
            return
        await self.discard_from(message)
        if not self.history:  # the chat held only this message
            self.store.delete_conversation(self.conversation.id)
            self.conversation = None
            self.refresh_sidebar()
            await self.show_empty_chat()
        self.prompt_box.set_prompt(message.content)
        self.status_bar.set_state(self.strings("status.loading"))
        self.refresh_bindings()

    async def action_interrupt(self) -> None:
        """Ctrl+C: stops the reply being written, as Esc does; otherwise says how to quit."""
        if self.reply_flow.busy:
            await self.action_cancel()
            return
        focused = self.focused
        if isinstance(focused, TextArea) and focused.selected_text:
            focused.action_copy()  # Ctrl+C still copies a selection in the prompt box
            return
        self.notify(self.strings("notify.how_to_quit"))

    async def action_new_chat(self) -> None:
        """Ctrl+N: like Enter and Ctrl+R, it never stops a reply behind the user's back."""
        if self.reply_flow.busy:
            self.notify_busy()
            return
        await self.start_new_chat()

    async def action_regenerate(self) -> None:
        t = self.strings
        if self.reply_flow.engine is None:
            self.notify(t("notify.still_loading"), severity="warning")
            return
        if self.reply_flow.busy:
            self.notify_busy()
            return
        if self.history and self.history[-1].role == "assistant":
            await self.discard_from(self.history[-1])
        if not self.history or self.history[-1].role != "user":
            self.notify(t("notify.nothing_to_regenerate"), severity="warning")
            return
        self.chat_log.follow()
        await self.start_reply()

    def action_edit_last(self) -> None:
        t = self.strings
        if self.reply_flow.busy:
            self.notify_busy()
            return
        last_user = next((m for m in reversed(self.history) if m.role == "user"), None)
        if last_user is None:
            self.notify(t("notify.nothing_to_edit"), severity="warning")
            return
        self.editing = last_user
        prompt_box = self.prompt_box
        prompt_box.set_prompt(last_user.content)
        prompt_box.add_class("-editing")
        prompt_box.border_title = t("prompt.editing")
        prompt_box.focus()
        self.refresh_bindings()

    def action_copy_reply(self) -> None:
        focused = self.focused
        reply = self.reply_flow.session.reply
        if isinstance(focused, MessageView):
            text = focused.content
        elif reply is not None and reply.text:
            text = reply.text
        else:
            last = next((m for m in reversed(self.history) if m.role == "assistant"), None)
            text = last.content if last else ""
        if not text:
            self.notify(self.strings("notify.nothing_to_copy"), severity="warning")
            return
        self.app.copy_to_clipboard(text)  # OSC 52: the terminal may or may not pass it on
        tool = copy_text(text)
        if tool is not None:
            self.notify(self.strings("notify.copied", tool=tool))
        else:
            self.notify(self.strings("notify.copied_osc52"), severity="warning", timeout=8)

    def action_settings(self) -> None:
        engine = self.reply_flow.engine
        screen = SettingsScreen(self.settings, self.strings,
                                getattr(engine, "adapter_path", None) or "",
                                thinking_switch(engine) is not None)  # fmt: skip

        def apply(result: ChatSettings | None) -> None:
            if result is None:
                return
            if engine is not None and screen.adapter_path != (
                getattr(engine, "adapter_path", None) or ""
            ):
                if self.reply_flow.busy:  # the model is in use: not changed under the reply
                    self.notify(self.strings("notify.adapter_failed", error="a reply is running"),
                                severity="warning")  # fmt: skip
                else:
                    self.change_adapter(engine, screen.adapter_path or None)
            if self.conversation is not None:
                self.store.update_settings(self.conversation.id, result)
                self.conversation = replace(self.conversation, settings=result)
            else:
                self.draft_settings = result
            self.notify(self.strings("notify.settings_saved"))

        self.app.push_screen(screen, apply)

    @work(thread=True, exclusive=True, group="adapter")
    def change_adapter(self, engine, path: str | None) -> None:
        """Apply the adapter in `path` (None: remove it) in a thread, then say so."""
        t = self.strings
        try:
            engine.set_adapter(path)
        except Exception as error:  # one line for the user
            message, severity = t("notify.adapter_failed", error=str(error)), "error"
        else:
            message = t("notify.adapter_applied", path=path) if path else t("notify.adapter_removed")
            severity = "information"
        self.app.call_from_thread(self.notify, message, severity=severity)

    def action_rename_chat(self) -> None:
        t = self.strings
        conversation = self.conversation
        if conversation is None:
            self.notify(t("notify.no_chat"), severity="warning")
            return

        def apply(title: str | None) -> None:
            if not title or self.conversation is None:
                return
            self.store.rename_conversation(conversation.id, title)
            if self.conversation.id == conversation.id:
                self.conversation = replace(self.conversation, title=title)
            self.refresh_sidebar()
            self.notify(t("notify.renamed"))

        self.app.push_screen(
            TextPromptScreen(
                t("rename.title"), conversation.title, t("rename.ok"), t("dialog.cancel")
            ),
            apply,
        )

    def action_delete_chat(self) -> None:
        t = self.strings
        conversation = self.conversation
        if conversation is None:
            self.notify(t("notify.no_chat"), severity="warning")
            return

        if self.reply_flow.busy:
            self.notify_busy()
            return

        async def apply(confirmed: bool | None) -> None:
            if not confirmed or self.reply_flow.busy:
                return
            self.store.delete_conversation(conversation.id)
            await self.start_new_chat()
            self.notify(t("notify.deleted"))

        self.app.push_screen(
            ConfirmScreen(
                t("delete.title"),
                t("delete.body", title=conversation.title),
                t("delete.ok"),
                t("dialog.cancel"),
            ),
            apply,
        )

    def action_export_chat(self) -> None:
        """F9: asks where to write the Markdown file (the last folder used, else the user's
        documents folder, else home), then writes it there."""
        t = self.strings
        conversation = self.conversation
        if conversation is None:
            self.notify(t("notify.no_chat"), severity="warning")
            return
        role_names = {role: t(f"role.{role}") for role in ("system", "user", "assistant")}
        default = export_directory(self.store) / self.store.export_filename(conversation.id)

        def apply(value: str | None) -> None:
            if not value:
                return
            path = Path(value).expanduser()
            try:
                written = self.store.export_to_path(conversation.id, path, role_names)
            except OSError as error:
                self.notify(t("notify.export_failed", error=str(error)), severity="error")
                return
            self.store.set_preference("export_dir", str(written.parent))
            self.notify(t("notify.exported", path=str(written)), timeout=8)

        self.app.push_screen(
            TextPromptScreen(t("export.title"), str(default), t("export.ok"), t("dialog.cancel")),
            apply,
        )


def export_directory(store: ConversationStore) -> Path:
    """Where F9 proposes to write: the last folder used, else Documents, else home."""
    last = store.get_preference("export_dir")
    if last and Path(last).is_dir():
        return Path(last)
    from platformdirs import user_documents_dir

    documents = Path(user_documents_dir())
    return documents if documents.is_dir() else Path.home()
