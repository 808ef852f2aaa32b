"""The main screen: saved chats on the left, the open chat, the prompt, the status line and the
experts panel. The reply being written is the ``ReplyFlow`` widget's (app/tui/widgets/
reply_flow.py): this screen shows what its messages report and decides what a key does while a
reply is on its way; what the keys do to the conversation is in app/tui/conversation_actions.py.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import LoadingIndicator

from app.i18n import Strings
from app.store import (
    ChatSettings,
    Conversation,
    ConversationStore,
    StoredMessage,
    title_from_prompt,
)
from app.tui.actions import chat_bindings, translate_bindings
from app.tui.conversation_actions import ConversationActions
from app.tui.engine import Engine, ReplyStats
from app.tui.engine_notices import load_notices, load_state, model_label
from app.tui.errors import describe_error
from app.tui.moderation import ChatModeration
from app.tui.prompting import build_messages
from app.tui.reply_session import LONG_PROMPT_SECONDS, ActiveReply, ReplySession
from app.tui.safe_mode_actions import SafeModeActions
from app.tui.screens.help import HelpScreen
from app.tui.screens.model_info import ModelInfoScreen
from app.tui.server_recovery import ServerRecovery
from app.tui.widgets.chat_footer import ChatFooter
from app.tui.widgets.chat_log import ChatLog
from app.tui.widgets.conversation_list import ConversationList
from app.tui.widgets.experts_panel import ExpertsPanel
from app.tui.widgets.message_view import MessageView, stats_line
from app.tui.widgets.prompt_box import PromptBox
from app.tui.widgets.reply_flow import ReplyFlow
from app.tui.widgets.status_bar import StatusBar

NARROW_SCREEN_WIDTH = 120  # below this, showing the experts panel hides the chats sidebar


class ChatScreen(ConversationActions, ServerRecovery, SafeModeActions, Screen[None]):
    BINDINGS = chat_bindings()
    AUTO_FOCUS = "#prompt"

    def __init__(
        self, store: ConversationStore, strings: Strings, moderation: ChatModeration | None = None
    ) -> None:
        super().__init__()
        self.moderation = moderation or ChatModeration()
        translate_bindings(self, strings)
        self.store = store
        self.strings = strings
        self.conversation: Conversation | None = None
        self.draft_settings = ChatSettings()  # settings of a chat not saved yet
        self.history: list[StoredMessage] = []
        self.editing: StoredMessage | None = None
        experts = ExpertsPanel(strings, id="experts-panel")
        self.reply_flow = ReplyFlow(store, strings, experts, id="reply-flow")

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
            yield self.reply_flow.experts
        yield ChatFooter()
        yield self.reply_flow

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
    def session(self) -> ReplySession:
        return self.reply_flow.session

    @property
    def engine(self) -> Engine | None:
        return self.reply_flow.engine

    @property
    def reply(self) -> ActiveReply | None:
        """The reply being written, or waiting for the model to load."""
        return self.reply_flow.reply

    @property
    def last_finished_reply(self) -> ActiveReply | None:
        return self.session.last_finished

    @property
    def is_generating(self) -> bool:
        return self.reply_flow.busy

    async def on_mount(self) -> None:
        self.query_one("#sidebar").border_title = self.strings("chat.conversations")
        conversations = self.store.list_conversations()
        if conversations:  # a restart reopens the chat used last
            await self.open_conversation(conversations[0].id)
        else:
            self.refresh_sidebar()
            await self.show_empty_chat()
        if self.engine is None:
            await self.chat_log.add_notice(
                self.strings("notice.loading_model"), classes="model-loading"
            )
            await self.chat_log.mount(LoadingIndicator(classes="model-loading"))
            self.status_bar.set_state(self.strings("status.loading"))

    # Engine

    async def engine_ready(self, engine: Engine, *, announce: bool = False) -> None:
        """The model is loaded: chatting can start (``announce``: say so in a notification);
        a message sent during the load goes now. The engine is handed over before the first
        await: an Esc in between would otherwise take back a message the model is about to
        answer and leave the status bar saying "loading" under a loaded model."""
        self.status_bar.set_model(model_label(engine, self.strings), engine.context_length)
        self.status_bar.set_state(load_state(engine, self.strings))
        self.reply_flow.engine_ready(engine)
        self.refresh_bindings()
        if announce:
            self.notify(self.strings("notice.model_loaded", name=engine.name))
        await self.query(".model-loading").remove()
        for text, kind in load_notices(engine, self.strings):
            await self.chat_log.add_notice(text, kind=kind)

    async def engine_failed(self, error: str) -> None:
        await self.query(".model-loading").remove()
        self.status_bar.set_state(self.strings("status.no_model"))
        await self.chat_log.add_notice(
            self.strings("notice.model_failed", error=error), kind="error"
        )

    # Sending

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
            self.notify_busy()
            return
        if await self.held_back(text):  # safe mode: a flagged message is not sent
            return
        if self.editing is not None:
            await self.discard_from(self.editing)
            self.stop_editing()
        if self.conversation is None:
            self.conversation = self.store.create_conversation(
                title_from_prompt(text), self.draft_settings
            )
            self.refresh_sidebar()
        message = self.store.add_message(self.conversation.id, "user", text)
        self.history.append(message)
        for welcome in self.chat_log.query(".welcome"):
            await welcome.remove()
        await self.chat_log.add_message(self._view_for(message))
        self.chat_log.follow()
        await self.start_reply()

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

    def notify_busy(self) -> None:
        """Say that a reply is being written, or waits for the model."""
        waiting = self.reply_flow.waiting is not None
        self.notify(
            self.strings("notify.waiting" if waiting else "notify.busy"), severity="warning"
        )

    async def start_reply(self) -> None:
        """A reply to the history so far, in a new message view."""
        assert self.conversation is not None
        view = MessageView(
            "assistant", role_label=self.strings("role.assistant"), strings=self.strings
        )
        await self.chat_log.add_message(view)
        view.set_streaming(True)
        settings, safe = self.moderation.effective(self.settings), self.moderation
        messages = [message.as_chat_message() for message in self.history]
        on = safe.active(self.settings)  # long pastes framed as data, the reply checked
        messages = build_messages(settings, safe.frame(messages) if on else messages)
        guard = safe.reply_guard(messages) if on else None
        reply = self.reply_flow.begin(self.conversation.id, view, messages, settings, guard)
        if self.reply_flow.waiting is reply:
            self.status_bar.set_state(self.strings("status.waiting"))
            self.recover_engine()  # after a server went away: it, if back, else in-process
        self.refresh_bindings()

    # What the reply flow reports

    @on(ReplyFlow.Progress)
    def _reply_progress(self, message: ReplyFlow.Progress) -> None:
        if message.reply.finished:  # news from a last tick, after the reply ended
            return
        if message.live.phase == "writing":
            self.status_bar.set_live(message.live.tokens_per_second)
        self.status_bar.set_state(message.state)

    @on(ReplyFlow.ContextTrimmed)
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

    @on(ReplyFlow.PromptTooLong)
    async def _prompt_too_long(self, message: ReplySession.PromptTooLong) -> None:
        """A message longer than the context is not sent: it leaves the chat and the store (so
        it never pushes earlier turns out of the next prompt, nor dangles after a restart) and
        goes back to the prompt box."""
        await self._take_back_refused(message.reply)
        t = self.strings
        text = t(
            "notice.prompt_too_long",
            tokens=t.number(message.tokens),
            context=t.number(message.context_length),
        )
        await self.chat_log.add_notice(text, kind="error", before=message.reply.view)
        self.notify(text, severity="error")

    async def _take_back_refused(self, reply: ActiveReply) -> None:
        conversation = self.conversation
        if conversation is None or conversation.id != reply.conversation_id:
            return
        if not self.history or self.history[-1].role != "user":
            return
        refused = self.history.pop()
        self.store.delete_messages_from(conversation.id, refused.id)
        for view in self.chat_log.message_views:
            if view.message_id == refused.id:
                await view.remove()
        if not self.history:  # the chat's only message: no empty chat is left behind
            self.store.delete_conversation(conversation.id)
            self.conversation, self.draft_settings = None, conversation.settings
            self.refresh_sidebar()
        if not self.prompt_box.text.strip():  # never over what was typed since
            self.prompt_box.set_prompt(refused.content)

    @on(ReplyFlow.LongPrompt)
    async def _long_prompt(self, message: ReplySession.LongPrompt) -> None:
        t = self.strings
        text = t(
            "notice.long_prompt",
            tokens=t.number(message.tokens),
            left=t.duration(message.seconds),
        )
        await self.chat_log.add_notice(text, kind="warning", before=message.reply.view)

    @on(ReplyFlow.Finished)
    async def _reply_finished(self, message: ReplySession.Finished) -> None:
        reply = message.reply
        saved, stats = await self.reply_flow.finish(message)
        if saved is not None:
            self.history.append(saved)
            self.fold_if_stopped(reply.view, saved)
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
        if self.server_went_away(message.error):
            await self.forget_server(retry=saved is None)

    def save_partial_reply_now(self) -> None:
        """On quit: stop generating and save whatever the reply holds."""
        self.reply_flow.save_now()

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
        self.fold_if_stopped(view, message)

    async def show_empty_chat(self) -> None:
        await self.chat_log.clear()
        await self.chat_log.show_welcome(self.strings("chat.welcome"))

    async def open_conversation(self, conversation_id: int) -> None:
        conversation = self.store.get_conversation(conversation_id)
        if conversation is None:
            self.refresh_sidebar()
            return
        self.stop_editing()
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
        self.status_bar.set_saved_stats(ReplyStats.of(last_stats))
        self.session.routing.reset()
        self._redraw_experts()
        self.refresh_sidebar()
        self.refresh_bindings()
        self.prompt_box.focus()

    async def start_new_chat(self) -> None:
        """An empty chat; what is typed in the prompt box stays there (unless it was an edit)."""
        if self.editing is not None:
            self.stop_editing()
            self.prompt_box.clear_prompt()
        self.conversation = None
        self.history = []
        self.draft_settings = ChatSettings()
        await self.show_empty_chat()
        self.status_bar.set_stats(None)
        self.session.routing.reset()
        self._redraw_experts()
        self.refresh_sidebar()
        self.refresh_bindings()
        self.prompt_box.focus()

    def refresh_sidebar(self) -> None:
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
            self.refresh_sidebar()  # the open chat stays highlighted
            self.notify_busy()
            return
        await self.open_conversation(event.conversation_id)

    async def discard_from(self, message: StoredMessage) -> None:
        """Delete a message and all later ones, from the store, the history and the screen."""
        assert self.conversation is not None
        self.store.delete_messages_from(self.conversation.id, message.id)
        self.history = [m for m in self.history if m.id < message.id]
        for view in self.chat_log.message_views:
            if view.message_id == message.id:
                await self.chat_log.remove_from(view)
                break

    def stop_editing(self) -> None:
        if self.editing is None:
            return
        self.editing = None
        self.prompt_box.remove_class("-editing")
        self.prompt_box.border_title = None

    # Experts panel

    @property
    def experts_panel(self) -> ExpertsPanel:
        return self.reply_flow.experts

    @property
    def experts_panel_visible(self) -> bool:
        return self.experts_panel.shown

    def _redraw_experts(self) -> None:
        self.reply_flow.draw_experts(force=True)

    def on_resize(self) -> None:
        """The experts panel fits its rows to the width it gets: redraw it at the new size."""
        if self.experts_panel.shown:
            self.call_after_refresh(self._redraw_experts)

    # The screen's own actions (the conversation's: ConversationActions)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "send_anyway":
            return self.held is not None
        if action == "cancel":
            return True if (self.is_generating or self.editing is not None) else None
        if action in ("regenerate", "edit_last"):
            return None if (self.is_generating or not self.history) else True
        return True

    def action_toggle_experts(self) -> None:
        """F4: the experts view. A dense model has none: one line says so, no panel takes room."""
        panel = self.experts_panel
        if self.reply_flow.has_experts is False and not panel.shown:
            self.notify(self.strings("experts.dense"))
            return
        if panel.toggle() and self.size.width < NARROW_SCREEN_WIDTH:
            self.query_one("#sidebar").add_class("-hidden")  # leave the chat room to read
        self.reply_flow.observe_routing()
        self._redraw_experts()

    def action_toggle_sidebar(self) -> None:
        """Ctrl+B: hide or show the chats (on a narrow screen: lay them over the chat)."""
        sidebar = self.query_one("#sidebar")
        if self.has_class("-narrow"):
            sidebar.toggle_class("-revealed")
        else:
            sidebar.toggle_class("-hidden")

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
