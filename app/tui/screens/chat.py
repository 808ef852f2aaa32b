"""The main screen: saved chats on the left, the open chat, the prompt, the status line and the
experts panel. The reply being written lives in a ``ReplySession`` (app/tui/reply_session.py):
this screen shows what it reports and decides what a key does while a reply is on its way.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, LoadingIndicator, TextArea

from app.i18n import Strings
from app.store import (
    ChatSettings,
    Conversation,
    ConversationStore,
    StoredMessage,
    title_from_prompt,
)
from app.tui.actions import chat_bindings, translate_bindings
from app.tui.clipboard import copy_text
from app.tui.engine import Engine, ReplyStats, num_experts
from app.tui.errors import describe_error
from app.tui.prompting import build_messages
from app.tui.reply_session import (
    LONG_PROMPT_SECONDS,
    TICK_INTERVAL,
    ActiveReply,
    LiveStatus,
    ReplySession,
)
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.help import HelpScreen
from app.tui.screens.model_info import ModelInfoScreen
from app.tui.screens.settings import SettingsScreen
from app.tui.screens.text_prompt import TextPromptScreen
from app.tui.widgets.chat_log import ChatLog
from app.tui.widgets.conversation_list import ConversationList
from app.tui.widgets.experts_panel import ExpertsPanel
from app.tui.widgets.message_view import MessageView, stats_line
from app.tui.widgets.prompt_box import PromptBox
from app.tui.widgets.status_bar import StatusBar

NARROW_SCREEN_WIDTH = 120  # below this, showing the experts panel hides the chats sidebar


class ChatScreen(Screen[None]):
    BINDINGS = chat_bindings()
    AUTO_FOCUS = "#prompt"

    def __init__(self, store: ConversationStore, strings: Strings) -> None:
        super().__init__()
        translate_bindings(self, strings)
        self.store = store
        self.strings = strings
        self.conversation: Conversation | None = None
        self.draft_settings = ChatSettings()  # settings of a chat not saved yet
        self.history: list[StoredMessage] = []
        self.editing: StoredMessage | None = None
        self.session = ReplySession(self, store, self._show_live)
        self._tick_timer: Timer | None = None
        self._live: tuple[ActiveReply | None, str] = (None, "")  # the reply and what it says

    # Layout

    def compose(self) -> ComposeResult:
        t = self.strings
        with Horizontal(id="layout"):
            yield ConversationList(empty_text=t("chat.no_conversations"), id="sidebar")
            with Vertical(id="main"):
                yield ChatLog(id="chat-log")
                yield PromptBox(
                    placeholder=t("prompt.placeholder"),
                    id="prompt",
                    marker=lambda number, chars: t(
                        "prompt.paste_marker", number=number, chars=t.number(chars)
                    ),
                )
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
    def engine(self) -> Engine | None:
        return self.session.engine

    @property
    def reply(self) -> ActiveReply | None:
        """The reply being written, or waiting for the model to load."""
        return self.session.reply or self.session.waiting

    @property
    def last_finished_reply(self) -> ActiveReply | None:
        return self.session.last_finished

    @property
    def is_generating(self) -> bool:
        return self.session.busy

    async def on_mount(self) -> None:
        self.query_one("#sidebar").border_title = self.strings("chat.conversations")
        conversations = self.store.list_conversations()
        if conversations:  # a restart reopens the chat used last
            await self.open_conversation(conversations[0].id)
        else:
            self._refresh_sidebar()
            await self._show_empty_chat()
        if self.engine is None:
            await self.chat_log.add_notice(
                self.strings("notice.loading_model"), classes="model-loading"
            )
            await self.chat_log.mount(LoadingIndicator(classes="model-loading"))
            self.status_bar.set_state(self.strings("status.loading"))

    # Engine

    async def engine_ready(self, engine: Engine, *, announce: bool = False) -> None:
        """The model is loaded: chatting can start (``announce``: say so in a notification);
        a message sent during the load goes now."""
        await self.query(".model-loading").remove()
        if announce:
            self.notify(self.strings("notice.model_loaded", name=engine.name))
        if not getattr(engine, "has_chat_template", True):
            await self.chat_log.add_notice(self.strings("notice.no_chat_template"))
        name = engine.name
        if server := getattr(engine, "server", None):  # app/remote_engine.py: replies from there
            server = server.split("://", 1)[-1].rstrip("/")
            name = self.strings("status.via_server", name=name, server=server)
        self.status_bar.set_model(name, engine.context_length)
        self.status_bar.set_state(self.strings("status.ready"))
        await self._memory_notice(engine)
        started = self.session.engine_ready(engine)
        if started is not None:
            self._reply_started(started)
        self._sync_routing_observer()
        self._redraw_experts()
        self.refresh_bindings()

    async def _memory_notice(self, engine: Engine) -> None:
        """Say, in the interface language, when loading chose to stream experts (the model did
        not fit the memory available) or warned; the status bar keeps the short form."""
        memory = getattr(getattr(engine, "model", None), "memory", None)
        if memory is not None and memory.offload:
            s = self.strings
            await self.chat_log.add_notice(s(
                "notice.experts_stream", need=s.bytes(memory.plan.full_bytes),
                budget=s.bytes(memory.budget), cached=s.number(
                    100 * memory.plan.cached_fraction(memory.budget)),
                context=s.number(memory.context),
            ))  # fmt: skip
            self.status_bar.set_state(s("status.experts_stream", budget=s.bytes(memory.budget)))
        elif notice := getattr(engine, "memory_notice", ""):  # a warning from the model
            await self.chat_log.add_notice(notice, kind="error")

    async def engine_failed(self, error: str) -> None:
        await self.query(".model-loading").remove()
        self.status_bar.set_state(self.strings("status.no_model"))
        await self.chat_log.add_notice(
            self.strings("notice.model_failed", error=error), kind="error"
        )

    @property
    def _engine_has_experts(self) -> bool | None:
        """True/False when the model says; None when its info does not tell."""
        experts = num_experts(self.engine)
        return None if experts is None else bool(experts)

    def _sync_routing_observer(self) -> None:
        """Observe routing live only while the experts panel is shown (the engine keeps the
        last reply's counts anyway, so the panel has them whenever it opens)."""
        if self.engine is None:
            return
        wanted = self.experts_panel_visible and self._engine_has_experts is not False
        self.engine.routing_observer = self.session.routing.observe if wanted else None

    # Sending and streaming

    @on(PromptBox.Submitted)
    async def _prompt_submitted(self, event: PromptBox.Submitted) -> None:
        await self.send_prompt(event.text)

    async def send_prompt(self, text: str) -> None:
        """Save the user's message, show it, and start the reply (or queue it while the model
        loads: it goes as soon as the model is ready)."""
        if not text.strip():
            self.notify(self.strings("notify.empty_prompt"))
            return
        if self.is_generating:
            self.prompt_box.set_prompt(text)  # give the text back rather than lose it
            self._notify_busy()
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

    @on(PromptBox.LargePaste)
    def _large_paste(self, event: PromptBox.LargePaste) -> None:
        """Before it is sent: say how long the model will take to read a long paste (when the
        last long prompt gave this model's reading speed)."""
        engine, rate = self.engine, self.session.prompt_tps
        if engine is None or not rate:
            return
        tokens = engine.count_tokens([{"role": "user", "content": event.text}])
        if tokens / rate > LONG_PROMPT_SECONDS:
            t = self.strings
            text = t("notify.long_paste", tokens=t.number(tokens), left=t.duration(tokens / rate))
            self.notify(text, severity="warning", timeout=10)

    def _notify_busy(self) -> None:
        waiting = self.session.waiting is not None
        self.notify(
            self.strings("notify.waiting" if waiting else "notify.busy"), severity="warning"
        )

    async def _start_reply(self) -> None:
        assert self.conversation is not None
        t = self.strings
        view = MessageView("assistant", role_label=t("role.assistant"))
        await self.chat_log.add_message(view)
        view.set_streaming(True)
        messages = build_messages(
            self.settings, [message.as_chat_message() for message in self.history]
        )
        reply = self.session.begin(self.conversation.id, view, messages, self.settings)
        if self.session.waiting is reply:
            view.show_info(t("message.waiting_for_model"))
            self.status_bar.set_state(t("status.waiting"))
        else:
            self._reply_started(reply)
        self.refresh_bindings()

    def _reply_started(self, reply: ActiveReply) -> None:
        self._redraw_experts()
        if self._tick_timer is None:
            self._tick_timer = self.set_interval(TICK_INTERVAL, self.session.tick)
        self.refresh_bindings()

    def _show_live(self, reply: ActiveReply, live: LiveStatus) -> bool:
        """What the reply is doing, in its info line and the status bar, when it changed (each
        change is a layout pass, costly in a long chat); True when something was drawn."""
        t = self.strings
        if live.phase == "writing":
            state = t("status.writing", tokens=t.number(live.tokens))
        elif live.total:
            left = "" if live.seconds_left is None else t.duration(live.seconds_left)
            state = t(
                "status.reading",
                read=t.number(live.read),
                total=t.number(live.total),
                rate=t.number(live.read_rate or 0.0),
                left=left,
            )
        elif live.prompt_size:
            state = t("status.reading_start", tokens=t.number(live.prompt_size))
        else:
            state = t("status.starting")
        drew = self._refresh_experts()
        if self._live == (reply, state):
            return drew
        self._live = (reply, state)
        if live.phase == "writing":
            self.status_bar.set_live(live.tokens_per_second)
        reply.view.show_info(state)
        self.status_bar.set_state(state)
        return True

    @on(ReplySession.ContextTrimmed)
    async def _context_trimmed(self, message: ReplySession.ContextTrimmed) -> None:
        t = self.strings
        if message.dropped_messages:
            text = t("notice.context_trimmed", count=t.number(message.dropped_messages))
            await self.chat_log.add_notice(text, kind="warning", before=message.reply.view)
            self.notify(text, severity="warning")
        if message.reply_budget is not None:
            await self.chat_log.add_notice(
                t("notice.max_tokens_reduced", count=t.number(message.reply_budget)),
                kind="warning",
                before=message.reply.view,
            )

    @on(ReplySession.PromptTooLong)
    async def _prompt_too_long(self, message: ReplySession.PromptTooLong) -> None:
        t = self.strings
        text = t(
            "notice.prompt_too_long",
            tokens=t.number(message.tokens),
            context=t.number(message.context_length),
        )
        await self.chat_log.add_notice(text, kind="error", before=message.reply.view)
        self.notify(text, severity="error")

    @on(ReplySession.LongPrompt)
    async def _long_prompt(self, message: ReplySession.LongPrompt) -> None:
        t = self.strings
        text = t(
            "notice.long_prompt",
            tokens=t.number(message.tokens),
            left=t.duration(message.seconds),
        )
        await self.chat_log.add_notice(text, kind="warning", before=message.reply.view)

    @on(ReplySession.Finished)
    async def _reply_finished(self, message: ReplySession.Finished) -> None:
        reply = message.reply
        if self._tick_timer is not None:
            self._tick_timer.stop()
            self._tick_timer = None
        saved = await self.session.complete(message)
        reply.view.set_streaming(False)
        stats = ReplyStats.of(message.stats)
        if saved is not None:
            self.history.append(saved)
            info, warning = stats_line(stats, self.strings)
            reply.view.show_info(info, warning=warning)
        else:
            await reply.view.remove()  # nothing was written: no empty message is kept
            if stats is not None and stats.finish_reason == "cancelled":
                t = self.strings
                read, total = reply.progress or (stats.prompt_tokens, stats.prompt_tokens)
                text = t("notice.stopped_reading", read=t.number(read), total=t.number(total))
                await self.chat_log.add_notice(text, kind="warning")
        if message.error is not None:
            text = self.strings("notice.error", error=describe_error(message.error))
            await self.chat_log.add_notice(text, kind="error")
            self.notify(text, severity="error", timeout=8)
        if stats is not None:
            self.status_bar.set_stats(stats)
        else:
            self.status_bar.set_live(None)  # no figures for a failed turn: none made up
        self.status_bar.set_state(self.strings("status.ready"))
        self._redraw_experts()
        self.refresh_bindings()

    def save_partial_reply_now(self) -> None:
        """On quit: stop generating and save whatever the reply holds."""
        self.session.save_now()

    # Showing chats

    def _view_for(self, message: StoredMessage) -> MessageView:
        t = self.strings
        view = MessageView(
            message.role,
            message.content,
            role_label=t(f"role.{message.role}"),
            message_id=message.id,
            display_cut_note=t("message.display_cut"),
            strings=t,
        )
        return view

    def _show_stored_info(self, view: MessageView, message: StoredMessage) -> None:
        if message.role != "assistant":
            return
        finish_reason = "" if message.complete else "interrupted"
        info, warning = stats_line(ReplyStats.of(message.stats), self.strings, finish_reason)
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
        self.status_bar.set_stats(ReplyStats.of(last_stats))
        self.session.routing.reset()
        self._redraw_experts()
        self._refresh_sidebar()
        self.refresh_bindings()
        self.prompt_box.focus()

    async def start_new_chat(self) -> None:
        """An empty chat; what is typed in the prompt box stays there (unless it was an edit)."""
        if self.editing is not None:
            self._stop_editing()
            self.prompt_box.clear_prompt()
        self.conversation = None
        self.history = []
        self.draft_settings = ChatSettings()
        await self._show_empty_chat()
        self.status_bar.set_stats(None)
        self.session.routing.reset()
        self._redraw_experts()
        self._refresh_sidebar()
        self.refresh_bindings()
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

        if self.is_generating:
            self._refresh_sidebar()  # the open chat stays highlighted
            self._notify_busy()
            return
        await self.open_conversation(event.conversation_id)

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
            self.session.routing, self._engine_has_experts, self.engine is not None, force=force,
            remote=getattr(self.engine, "server", None) is not None,
        )  # fmt: skip

    def _redraw_experts(self) -> None:
        self._refresh_experts(force=True)

    # Actions (keys, footer, command palette)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return True if (self.is_generating or self.editing is not None) else None
        if action in ("regenerate", "edit_last"):
            return None if (self.is_generating or not self.history) else True
        return True

    async def action_cancel(self) -> None:
        """Esc: stop the reply (what was written stays), take back a message still waiting for
        the model (its text returns to the prompt box), or leave editing."""
        if self.session.reply is not None:
            self.session.cancel()
            return
        waiting = self.session.cancel()
        if waiting is not None:
            await self._take_back(waiting)
            return
        if self.editing is not None:
            self._stop_editing()
            self.prompt_box.clear_prompt()
            self.refresh_bindings()

    async def _take_back(self, waiting: ActiveReply) -> None:
        """Unsend the message that waited for the model: out of the chat, back in the box."""
        await waiting.view.remove()
        message = self.history[-1] if self.history else None
        if message is None or message.role != "user" or self.conversation is None:
            return
        await self._discard_from(message)
        if not self.history:  # the chat held only this message
            self.store.delete_conversation(self.conversation.id)
            self.conversation = None
            self._refresh_sidebar()
            await self._show_empty_chat()
        self.prompt_box.set_prompt(message.content)
        self.status_bar.set_state(self.strings("status.loading"))
        self.refresh_bindings()

    async def action_new_chat(self) -> None:
        """Ctrl+N: like Enter and Ctrl+R, it never stops a reply behind the user's back."""
        if self.is_generating:
            self._notify_busy()
            return
        await self.start_new_chat()

    async def action_interrupt(self) -> None:
        """Ctrl+C: stops the reply being written, as Esc does; otherwise says how to quit."""
        if self.session.busy:
            await self.action_cancel()
            return
        focused = self.focused
        if isinstance(focused, TextArea) and focused.selected_text:
            focused.action_copy()  # Ctrl+C still copies a selection in the prompt box
            return
        self.notify(self.strings("notify.how_to_quit"))

    async def action_regenerate(self) -> None:
        t = self.strings
        if self.engine is None:
            self.notify(t("notify.still_loading"), severity="warning")
            return
        if self.is_generating:
            self._notify_busy()
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
            self._notify_busy()
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
        elif self.session.reply is not None and self.session.reply.text:
            text = self.session.reply.text
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
        """F4: the experts view. A dense model has none: one line says so, no panel takes room."""
        panel = self.experts_panel
        if self._engine_has_experts is False and not panel.shown:
            self.notify(self.strings("experts.dense"))
            return
        if panel.toggle() and self.size.width < NARROW_SCREEN_WIDTH:
            self.query_one("#sidebar").add_class("-hidden")  # leave the chat room to read
        self._sync_routing_observer()
        self._redraw_experts()

    def action_toggle_sidebar(self) -> None:
        """Ctrl+B: hide or show the chats (on a narrow screen: lay them over the chat)."""
        sidebar = self.query_one("#sidebar")
        if self.has_class("-narrow"):
            sidebar.toggle_class("-revealed")
        else:
            sidebar.toggle_class("-hidden")

    def on_resize(self) -> None:
        """Below 120 columns the footer leaves out the palette key, which would be drawn over
        the last keys (Ctrl+P still works, F1 lists it)."""
        self.query_one(Footer).show_command_palette = self.has_class("-wide")

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen(self.strings))

    def action_model_info(self) -> None:
        engine = self.engine
        self.app.push_screen(
            ModelInfoScreen(
                self.strings,
                None if engine is None else engine.name,
                None if engine is None else engine.info,
                None if engine is None else engine.context_length,
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

        if self.is_generating:
            self._notify_busy()
            return

        async def apply(confirmed: bool | None) -> None:
            if not confirmed or self.is_generating:
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
