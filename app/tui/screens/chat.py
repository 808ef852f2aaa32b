"""The main screen: saved chats on the left, the open chat, the prompt, the status line and the
experts panel.

A turn: the prompt box posts ``PromptBox.Submitted`` → the user message is saved → a thread
worker fits the messages to the context and runs ``engine.stream``, appending text to a
``TextBuffer`` → a timer ticking 30 times a second drains the buffer into the reply's
``MarkdownStream`` whenever the ``UpdatePacer`` allows (at most 30 updates a second, fewer when
updates are costly) and saves the partial reply every second → ``ReplyFinished`` flushes the
last text and saves the reply with its stats.
The worker never touches a widget: it only fills thread-safe buffers and posts messages.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, LoadingIndicator
from textual.widgets.markdown import MarkdownStream

from app.store import (
    ChatSettings,
    Conversation,
    ConversationStore,
    StoredMessage,
    data_dir,
    stats_to_dict,
    title_from_prompt,
)
from app.tui.actions import chat_bindings, translate_bindings
from app.tui.errors import describe_error
from app.tui.i18n import Strings
from app.tui.prompting import build_messages, fit_to_context
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.help import HelpScreen
from app.tui.screens.model_info import ModelInfoScreen
from app.tui.screens.settings import SettingsScreen
from app.tui.screens.text_prompt import TextPromptScreen
from app.tui.streaming import RoutingAccumulator, TextBuffer, UpdatePacer
from app.tui.widgets.chat_log import ChatLog
from app.tui.widgets.conversation_list import ConversationList
from app.tui.widgets.experts_panel import ExpertsPanel
from app.tui.widgets.message_view import MessageView, stats_line
from app.tui.widgets.prompt_box import PromptBox
from app.tui.widgets.status_bar import StatusBar

TICK_INTERVAL = 1 / 30  # how often a streaming reply checks for new text (updates: UpdatePacer)
UI_CPU_BUDGET = 0.05  # share of a core the UI thread aims to use while a reply streams
SAVE_INTERVAL = 1.0  # a streaming reply is saved at least this often
NARROW_SCREEN_WIDTH = 120  # below this, showing the experts panel hides the chats sidebar


def generation_settings(settings: ChatSettings, max_tokens: int) -> Any:
    """The engine's GenerationSettings for a chat's settings (imported late: ``model`` loads MLX)."""
    from model.generate import GenerationSettings

    return GenerationSettings(
        max_tokens=max_tokens, temperature=settings.temperature, top_p=settings.top_p
    )


@dataclass(eq=False)
class ActiveReply:
    """The reply being written: where its text goes and what has been saved of it."""

    conversation_id: int
    view: MessageView
    stream: MarkdownStream
    buffer: TextBuffer = field(default_factory=TextBuffer)
    pacer: UpdatePacer = field(default_factory=lambda: UpdatePacer(cpu_budget=UI_CPU_BUDGET))
    text: str = ""
    message: StoredMessage | None = None
    saved_length: int = 0
    last_saved_at: float = field(default_factory=time.monotonic)
    cancel_requested: bool = False
    finished: bool = False
    last_text_at: float | None = None  # when text last went to the Markdown stream
    completed_at: float | None = None  # when all its text was in the Markdown widget
    stats: Any = None


class ChatScreen(Screen[None]):
    BINDINGS = chat_bindings()
    AUTO_FOCUS = "#prompt"

    class ReplyFinished(Message):
        """The worker is done (finished, cancelled or failed)."""

        def __init__(self, reply: ActiveReply, stats: Any, error: BaseException | None) -> None:
            super().__init__()
            self.reply = reply
            self.stats = stats
            self.error = error

    class ContextTrimmed(Message):
        """Old messages were left out, or the reply's budget shrank, to fit the context."""

        def __init__(
            self, reply: ActiveReply, dropped_messages: int, reply_budget: int | None
        ) -> None:
            super().__init__()
            self.reply = reply
            self.dropped_messages = dropped_messages
            self.reply_budget = reply_budget

    class PromptTooLong(Message):
        def __init__(self, reply: ActiveReply, tokens: int, context_length: int) -> None:
            super().__init__()
            self.reply = reply
            self.tokens = tokens
            self.context_length = context_length

    def __init__(self, store: ConversationStore, strings: Strings) -> None:
        super().__init__()
        translate_bindings(self, strings)
        self.store = store
        self.strings = strings
        self.engine: Any = None
        self.conversation: Conversation | None = None
        self.draft_settings = ChatSettings()  # settings of a chat not saved yet
        self.history: list[StoredMessage] = []
        self.reply: ActiveReply | None = None
        self.last_finished_reply: ActiveReply | None = None  # for tests and benchmarks
        self.editing: StoredMessage | None = None
        self.routing = RoutingAccumulator()
        self._after_reply: list[Callable[[], Awaitable[None]]] = []
        self._flush_timer: Timer | None = None

    # Layout

    def compose(self) -> ComposeResult:
        t = self.strings
        with Horizontal(id="layout"):
            yield ConversationList(empty_text=t("chat.no_conversations"), id="sidebar")
            with Vertical(id="main"):
                yield ChatLog(id="chat-log")
                yield PromptBox(placeholder=t("prompt.placeholder"), id="prompt")
                yield StatusBar(t, id="status")
            yield ExpertsPanel(t, id="experts-panel")
        yield Footer(compact=True)

    @property
    def chat_log(self) -> ChatLog:
        return self.query_one(ChatLog)

    @property
    def prompt_box(self) -> PromptBox:
        return self.query_one(PromptBox)

    @property
    def status_bar(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def settings(self) -> ChatSettings:
        return self.conversation.settings if self.conversation else self.draft_settings

    @property
    def is_generating(self) -> bool:
        return self.reply is not None

    async def on_mount(self) -> None:
        self.query_one("#sidebar").border_title = self.strings("chat.conversations")
        self._refresh_sidebar()
        await self._show_empty_chat()
        if self.engine is None:
            await self.chat_log.add_notice(
                self.strings("notice.loading_model"), classes="model-loading"
            )
            await self.chat_log.mount(LoadingIndicator(classes="model-loading"))
            self.status_bar.set_state(self.strings("status.loading"))

    # Engine

    async def engine_ready(self, engine: Any, *, announce: bool = False) -> None:
        """The model is loaded: chatting can start (``announce``: say so in a notification)."""
        self.engine = engine
        await self.query(".model-loading").remove()
        if announce:
            self.notify(self.strings("notice.model_loaded", name=getattr(engine, "name", "")))
        if not getattr(engine, "has_chat_template", True):
            await self.chat_log.add_notice(self.strings("notice.no_chat_template"))
        self.status_bar.set_model(str(getattr(engine, "name", "")), engine.context_length)
        self.status_bar.set_state(self.strings("status.ready"))
        self._sync_routing_observer()
        self._redraw_experts()
        self.refresh_bindings()

    async def engine_failed(self, error: str) -> None:
        await self.query(".model-loading").remove()
        self.status_bar.set_state(self.strings("status.no_model"))
        await self.chat_log.add_notice(
            self.strings("notice.model_failed", error=error), kind="error"
        )

    @property
    def _engine_has_experts(self) -> bool | None:
        """True/False when the model says; None when its info does not tell."""
        if self.engine is None:
            return None
        experts = getattr(getattr(self.engine, "info", None), "num_experts", None)
        return None if experts is None else bool(experts)

    def _sync_routing_observer(self) -> None:
        """Observe routing only while the experts panel is shown: hidden, decoding pays nothing."""
        if self.engine is None:
            return
        wanted = self.experts_panel_visible and self._engine_has_experts is not False
        self.engine.routing_observer = self.routing.observe if wanted else None

    # Sending and streaming

    @on(PromptBox.Submitted)
    async def _prompt_submitted(self, event: PromptBox.Submitted) -> None:
        await self.send_prompt(event.text)

    async def send_prompt(self, text: str) -> None:
        """Save the user's message, show it, and start the reply."""
        if not text.strip():
            self.notify(self.strings("notify.empty_prompt"))
            return
        if self.engine is None or self.is_generating:
            self.prompt_box.set_prompt(text)  # give the text back rather than lose it
            key = "notify.still_loading" if self.engine is None else "notify.busy"
            self.notify(self.strings(key), severity="warning")
            return
        if self.editing is not None:
            await self._discard_from(self.editing)
            self._stop_editing()
        if self.conversation is None:
            self.conversation = self.store.create_conversation(
                title_from_prompt(text), self.draft_settings
            )
            self._refresh_sidebar()
        message = self.store.add_message(self.conversation.id, "user", text)
        self.history.append(message)
        for welcome in self.chat_log.query(".welcome"):
            await welcome.remove()
        await self.chat_log.add_message(self._view_for(message))
        self.chat_log.follow()
        await self._start_reply()

    async def _start_reply(self) -> None:
        assert self.conversation is not None
        t = self.strings
        view = MessageView("assistant", role_label=t("role.assistant"))
        await self.chat_log.add_message(view)
        view.set_streaming(True)
        view.show_info(t("status.generating"))
        reply = ActiveReply(self.conversation.id, view, view.get_stream())
        self.reply = reply
        self.routing.reset()
        self._redraw_experts()
        self.status_bar.set_state(t("status.generating"))
        messages = build_messages(
            self.settings, [message.as_chat_message() for message in self.history]
        )
        self._flush_timer = self.set_interval(TICK_INTERVAL, self._flush_reply)
        self.refresh_bindings()
        self._generate(reply, messages, self.settings)

    @work(thread=True, group="generation", exit_on_error=False)
    def _generate(self, reply: ActiveReply, messages: list[dict], settings: ChatSettings) -> None:
        """Runs in a thread: only touches the reply's buffer and posts messages."""
        engine = self.engine
        stats: Any = None
        error: BaseException | None = None
        try:
            fitted = fit_to_context(
                messages, engine.count_tokens, engine.context_length, settings.max_tokens
            )
            if not fitted.fits:
                self.post_message(
                    self.PromptTooLong(reply, fitted.prompt_tokens, engine.context_length)
                )
                return
            shrunk = fitted.max_tokens < settings.max_tokens
            if fitted.dropped_messages or shrunk:
                self.post_message(
                    self.ContextTrimmed(
                        reply, fitted.dropped_messages, fitted.max_tokens if shrunk else None
                    )
                )
            cancel_sent = False
            if not reply.cancel_requested:
                for chunk in engine.stream(
                    fitted.messages, generation_settings(settings, fitted.max_tokens)
                ):
                    if chunk.text:
                        reply.buffer.append(chunk.text)
                    if chunk.stats is not None:
                        stats = chunk.stats
                    if reply.cancel_requested and not cancel_sent:
                        # Esc may have come before the stream started: say it again.
                        engine.cancel()
                        cancel_sent = True
        except Exception as exception:  # shown in the chat, never a crash
            error = exception
        finally:
            self.post_message(self.ReplyFinished(reply, stats, error))

    async def _flush_reply(self) -> None:
        """Timer tick: when the pacer allows, move what the worker wrote (and the routing
        counts) onto the screen; save the partial reply now and then."""
        reply = self.reply
        if reply is None or reply.finished or not reply.pacer.due():
            return
        drained = await self._drain(reply)
        experts_drawn = self._refresh_experts()
        if drained or experts_drawn:
            reply.pacer.updated()
        if len(reply.text) != reply.saved_length and (
            time.monotonic() - reply.last_saved_at >= SAVE_INTERVAL
        ):
            self._save_reply(reply, complete=False)

    async def _drain(self, reply: ActiveReply) -> bool:
        """Hand the buffered text to the reply's Markdown stream; False when there was none."""
        text = reply.buffer.drain()
        if not text:
            return False
        reply.text += text
        reply.last_text_at = time.perf_counter()
        await reply.stream.write(text)
        return True

    def _save_reply(self, reply: ActiveReply, *, complete: bool, stats: Any = None) -> None:
        """Save the reply's text so far (a new row the first time, then updates)."""
        if reply.message is None:
            reply.message = self.store.add_message(
                reply.conversation_id, "assistant", reply.text, complete=complete, stats=stats
            )
            reply.view.message_id = reply.message.id
        else:
            self.store.update_message(reply.message.id, reply.text, complete=complete, stats=stats)
            reply.message = replace(
                reply.message,
                content=reply.text,
                complete=complete,
                stats=stats_to_dict(stats) or reply.message.stats,
            )
        reply.saved_length = len(reply.text)
        reply.last_saved_at = time.monotonic()

    @on(ContextTrimmed)
    async def _context_trimmed(self, message: ContextTrimmed) -> None:
        t = self.strings
        if message.dropped_messages:
            text = t("notice.context_trimmed", count=message.dropped_messages)
            await self.chat_log.add_notice(text, kind="warning", before=message.reply.view)
            self.notify(text, severity="warning")
        if message.reply_budget is not None:
            await self.chat_log.add_notice(
                t("notice.max_tokens_reduced", count=message.reply_budget),
                kind="warning",
                before=message.reply.view,
            )

    @on(PromptTooLong)
    async def _prompt_too_long(self, message: PromptTooLong) -> None:
        text = self.strings(
            "notice.prompt_too_long",
            tokens=f"{message.tokens:,}",
            context=f"{message.context_length:,}",
        )
        await self.chat_log.add_notice(text, kind="error", before=message.reply.view)
        self.notify(text, severity="error")

    @on(ReplyFinished)
    async def _reply_finished(self, message: ReplyFinished) -> None:
        reply = message.reply
        reply.finished = True
        if self._flush_timer is not None:
            self._flush_timer.stop()
            self._flush_timer = None
        await self._drain(reply)  # the last tokens always reach the screen
        await reply.stream.stop()
        reply.completed_at = time.perf_counter()
        reply.view.set_streaming(False)
        stats, error = message.stats, message.error
        reply.stats = stats
        if reply.text:
            self._save_reply(reply, complete=True, stats=stats)
            assert reply.message is not None
            self.history.append(reply.message)
            info, warning = stats_line(stats_to_dict(stats), self.strings)
            reply.view.show_info(info, warning=warning)
        else:
            await reply.view.remove()  # nothing was written: no empty message is kept
        if error is not None:
            text = self.strings("notice.error", error=describe_error(error))
            await self.chat_log.add_notice(text, kind="error")
            self.notify(text, severity="error", timeout=8)
        if stats is not None:
            self.status_bar.set_stats(
                context_used=getattr(stats, "context_tokens", None),
                tokens_per_second=getattr(stats, "generation_tps", None),
                peak_memory_gb=getattr(stats, "peak_memory_gb", None),
                expert_hit_rate=getattr(stats, "expert_hit_rate", None),
            )
        self.status_bar.set_state(self.strings("status.ready"))
        self.reply = None
        self.last_finished_reply = reply
        self._redraw_experts()
        self.refresh_bindings()
        pending, self._after_reply = self._after_reply, []
        for callback in pending:
            await callback()

    async def _when_idle(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` now, or, while a reply streams, stop it and run it afterwards."""
        if self.reply is None:
            await callback()
            return
        self._after_reply.append(callback)
        self.action_cancel()

    def save_partial_reply_now(self) -> None:
        """On quit: stop generating and save whatever the reply holds."""
        reply = self.reply
        if reply is None:
            return
        reply.cancel_requested = True
        if self.engine is not None:
            self.engine.cancel()
        reply.text += reply.buffer.drain()
        if reply.text:
            self._save_reply(reply, complete=True, stats={"finish_reason": "cancelled"})

    # Showing chats

    def _view_for(self, message: StoredMessage) -> MessageView:
        t = self.strings
        view = MessageView(
            message.role,
            message.content,
            role_label=t(f"role.{message.role}"),
            message_id=message.id,
            display_cut_note=t("message.display_cut"),
        )
        return view

    def _show_stored_info(self, view: MessageView, message: StoredMessage) -> None:
        if message.role != "assistant":
            return
        finish_reason = "" if message.complete else "interrupted"
        info, warning = stats_line(message.stats, self.strings, finish_reason)
        view.show_info(info, warning=warning)

    async def _show_empty_chat(self) -> None:
        await self.chat_log.clear()
        await self.chat_log.show_welcome(self.strings("chat.welcome"))

    async def open_conversation(self, conversation_id: int) -> None:
        conversation = self.store.get_conversation(conversation_id)
        if conversation is None:
            self._refresh_sidebar()
            return
        self._stop_editing()
        self.conversation = conversation
        self.history = self.store.messages(conversation_id)
        await self.chat_log.clear()
        views = [self._view_for(message) for message in self.history]
        if views:
            await self.chat_log.mount_all(views)
            for view, message in zip(views, self.history, strict=True):
                self._show_stored_info(view, message)
        else:
            await self.chat_log.show_welcome(self.strings("chat.welcome"))
        self.chat_log.follow()
        last_stats = next(
            (m.stats for m in reversed(self.history) if m.role == "assistant" and m.stats), None
        )
        self.status_bar.set_stats(
            context_used=(last_stats or {}).get("context_tokens"),
            tokens_per_second=(last_stats or {}).get("generation_tps"),
            peak_memory_gb=(last_stats or {}).get("peak_memory_gb"),
            expert_hit_rate=(last_stats or {}).get("expert_hit_rate"),
        )
        self.routing.reset()
        self._redraw_experts()
        self._refresh_sidebar()
        self.refresh_bindings()
        self.prompt_box.focus()

    async def start_new_chat(self) -> None:
        self._stop_editing()
        self.conversation = None
        self.history = []
        self.draft_settings = ChatSettings()
        await self._show_empty_chat()
        self.status_bar.set_stats()
        self.routing.reset()
        self._redraw_experts()
        self._refresh_sidebar()
        self.refresh_bindings()
        self.prompt_box.clear_prompt()
        self.prompt_box.focus()

    def _refresh_sidebar(self) -> None:
        self.query_one(ConversationList).show_conversations(
            self.store.list_conversations(),
            self.conversation.id if self.conversation else None,
        )

    @on(ConversationList.Chosen)
    async def _conversation_chosen(self, event: ConversationList.Chosen) -> None:
        if self.conversation is not None and event.conversation_id == self.conversation.id:
            self.prompt_box.focus()
            return

        async def open_it() -> None:
            await self.open_conversation(event.conversation_id)

        await self._when_idle(open_it)

    async def _discard_from(self, message: StoredMessage) -> None:
        """Delete a message and all later ones, from the store, the history and the screen."""
        assert self.conversation is not None
        self.store.delete_messages_from(self.conversation.id, message.id)
        self.history = [m for m in self.history if m.id < message.id]
        for view in self.chat_log.message_views:
            if view.message_id == message.id:
                await self.chat_log.remove_from(view)
                break

    def _stop_editing(self) -> None:
        if self.editing is None:
            return
        self.editing = None
        self.prompt_box.remove_class("-editing")
        self.prompt_box.border_title = None

    # Experts panel

    @property
    def experts_panel(self) -> ExpertsPanel:
        return self.query_one(ExpertsPanel)

    @property
    def experts_panel_visible(self) -> bool:
        return self.experts_panel.shown

    def _refresh_experts(self, *, force: bool = False) -> bool:
        """Redraw the experts panel if it is shown and has something new; True if it drew."""
        return self.experts_panel.refresh_from(
            self.routing, self._engine_has_experts, self.engine is not None, force=force
        )

    def _redraw_experts(self) -> None:
        self._refresh_experts(force=True)

    # Actions (keys, footer, command palette)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return True if (self.is_generating or self.editing is not None) else None
        if action in ("regenerate", "edit_last"):
            return None if (self.is_generating or not self.history) else True
        return True

    def action_cancel(self) -> None:
        """Esc: stop the reply (what was written stays), or leave editing."""
        if self.reply is not None:
            self.reply.cancel_requested = True
            if self.engine is not None:
                self.engine.cancel()
            return
        if self.editing is not None:
            self._stop_editing()
            self.prompt_box.clear_prompt()
            self.refresh_bindings()

    async def action_new_chat(self) -> None:
        await self._when_idle(self.start_new_chat)

    async def action_regenerate(self) -> None:
        t = self.strings
        if self.engine is None or self.is_generating:
            key = "notify.still_loading" if self.engine is None else "notify.busy"
            self.notify(t(key), severity="warning")
            return
        if self.history and self.history[-1].role == "assistant":
            await self._discard_from(self.history[-1])
        if not self.history or self.history[-1].role != "user":
            self.notify(t("notify.nothing_to_regenerate"), severity="warning")
            return
        self.chat_log.follow()
        await self._start_reply()

    def action_edit_last(self) -> None:
        t = self.strings
        if self.is_generating:
            self.notify(t("notify.busy"), severity="warning")
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
        if isinstance(focused, MessageView):
            text = focused.content
        elif self.reply is not None and self.reply.text:
            text = self.reply.text
        else:
            last = next((m for m in reversed(self.history) if m.role == "assistant"), None)
            text = last.content if last else ""
        if not text:
            self.notify(self.strings("notify.nothing_to_copy"), severity="warning")
            return
        self.app.copy_to_clipboard(text)
        self.notify(self.strings("notify.copied"))

    def action_settings(self) -> None:
        def apply(result: ChatSettings | None) -> None:
            if result is None:
                return
            if self.conversation is not None:
                self.store.update_settings(self.conversation.id, result)
                self.conversation = replace(self.conversation, settings=result)
            else:
                self.draft_settings = result
            self.notify(self.strings("notify.settings_saved"))

        self.app.push_screen(SettingsScreen(self.settings, self.strings), apply)

    def action_toggle_experts(self) -> None:
        if self.experts_panel.toggle() and self.size.width < NARROW_SCREEN_WIDTH:
            self.query_one("#sidebar").add_class("-hidden")  # leave the chat room to read
        self._sync_routing_observer()
        self._redraw_experts()

    def action_toggle_sidebar(self) -> None:
        self.query_one("#sidebar").toggle_class("-hidden")

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen(self.strings))

    def action_model_info(self) -> None:
        engine = self.engine
        self.app.push_screen(
            ModelInfoScreen(
                self.strings,
                None if engine is None else str(getattr(engine, "name", "")),
                getattr(engine, "info", None),
                getattr(engine, "context_length", None),
            )
        )

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
            self._refresh_sidebar()
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

        async def delete() -> None:
            self.store.delete_conversation(conversation.id)
            await self.start_new_chat()
            self.notify(t("notify.deleted"))

        async def apply(confirmed: bool | None) -> None:
            if confirmed:
                await self._when_idle(delete)

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
        t = self.strings
        if self.conversation is None:
            self.notify(t("notify.no_chat"), severity="warning")
            return
        role_names = {role: t(f"role.{role}") for role in ("system", "user", "assistant")}
        directories = [Path.cwd(), data_dir()]
        last_error: OSError | None = None
        for directory in directories:
            if directory == directories[-1]:
                directory.mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK):
                continue
            try:
                path = self.store.export_to_file(self.conversation.id, directory, role_names)
            except OSError as error:
                last_error = error
                continue
            self.notify(t("notify.exported", path=str(path)), timeout=8)
            return
        self.notify(
            t("notify.export_failed", error=str(last_error or directories[-1])), severity="error"
        )
