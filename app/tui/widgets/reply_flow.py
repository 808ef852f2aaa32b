"""The reply on its way, as a widget of the chat screen (it draws nothing itself: hidden in
mixchat.tcss).

``ReplyFlow`` runs the engine's stream through a ``ReplySession`` (app/tui/reply_session.py:
the worker, the message that waits for the model, the live figures, the saves) on its own
timer, and tells the screen what happens with messages: ``Progress`` (what the reply is doing
now, for the status bar), then the session's ``ContextTrimmed``, ``PromptTooLong``,
``LongPrompt`` and ``Finished``, which bubble up from here. The screen calls ``finish`` when it
handles ``Finished``, so that saving the reply and adding it to the chat's history happen in one
step.

The reply's info line and the experts panel are drawn here, in the timer's tick, because the
pacer needs to know in that same tick whether anything was drawn.
"""

from __future__ import annotations

from typing import Any

from textual.message import Message
from textual.timer import Timer
from textual.widget import Widget

from app.i18n import Strings
from app.store import ChatSettings, ConversationStore, StoredMessage
from app.tui.engine import Engine, ReplyStats, num_experts
from app.tui.reply_session import TICK_INTERVAL, ActiveReply, LiveStatus, ReplySession
from app.tui.widgets.experts_panel import ExpertsPanel
from app.tui.widgets.message_view import MessageView, stats_line


class ReplyFlow(Widget):
    """Starts, paces and finishes the replies of one chat screen."""

    Finished = ReplySession.Finished
    ContextTrimmed = ReplySession.ContextTrimmed
    PromptTooLong = ReplySession.PromptTooLong
    LongPrompt = ReplySession.LongPrompt

    class Progress(Message):
        """What the reply is doing changed: ``state`` in words, ``live`` its figures."""

        def __init__(self, reply: ActiveReply, state: str, live: LiveStatus) -> None:
            super().__init__()
            self.reply = reply
            self.state = state
            self.live = live

    def __init__(
        self,
        store: ConversationStore,
        strings: Strings,
        experts: ExpertsPanel,
        *,
        id: str | None = None,
    ) -> None:
        super().__init__(id=id)
        self.strings = strings
        self.experts = experts
        self.session = ReplySession(self, store, self._show_live)
        self._tick_timer: Timer | None = None
        self._live: tuple[ActiveReply | None, str] = (None, "")  # the reply and what it says

    @property
    def engine(self) -> Engine | None:
        return self.session.engine

    @property
    def reply(self) -> ActiveReply | None:
        """The reply being written, or waiting for the model to load."""
        return self.session.reply or self.session.waiting

    @property
    def busy(self) -> bool:
        return self.session.busy

    @property
    def has_experts(self) -> bool | None:
        """True/False when the model says; None when its info does not tell."""
        experts = num_experts(self.engine)
        return None if experts is None else bool(experts)

    # Starting

    def engine_ready(self, engine: Engine) -> ActiveReply | None:
        """The model is loaded: the reply that waited for it (returned, if any) starts now."""
        started = self.session.engine_ready(engine)
        if started is not None:
            self._started()
        self.observe_routing()
        self.draw_experts(force=True)
        return started

    def engine_gone(self) -> None:
        """The engine can no longer answer (its server went away): the next reply waits for
        ``engine_ready``, as during the first load."""
        self.session.engine = None

    def begin(
        self,
        conversation_id: int,
        view: MessageView,
        messages: list[dict],
        settings: ChatSettings,
        guard: Any = None,
    ) -> ActiveReply:
        """Start the reply into ``view`` now, or once the model is loaded (then the view says
        so and ``waiting`` is this reply); ``guard``: safe mode's ReplyGuard."""
        reply = self.session.begin(conversation_id, view, messages, settings, guard)
        if self.session.waiting is reply:
            view.show_info(self.strings("message.waiting_for_model"))
        else:
            self._started()
        return reply

    @property
    def waiting(self) -> ActiveReply | None:
        return self.session.waiting

    def _started(self) -> None:
        self.draw_experts(force=True)
        if self._tick_timer is None:
            self._tick_timer = self.set_interval(TICK_INTERVAL, self.session.tick)

    def _show_live(self, reply: ActiveReply, live: LiveStatus) -> bool:
        """What the reply is doing, in its info line (and, through ``Progress``, the status
        bar), when it changed (each change is a layout pass, costly in a long chat); True when
        something was drawn."""
        t = self.strings
        if live.phase == "writing":
            key = "status.writing_one" if live.tokens == 1 else "status.writing"
            state = t(key, tokens=t.number(live.tokens))
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
        drew = self.draw_experts()
        if self._live == (reply, state):
            return drew
        self._live = (reply, state)
        reply.view.show_info(state)
        self.post_message(self.Progress(reply, state, live))
        return True

    # Stopping

    def cancel(self) -> ActiveReply | None:
        """Stop the reply being written, or take back (and return) the one still waiting."""
        return self.session.cancel()

    async def finish(
        self, finished: ReplySession.Finished
    ) -> tuple[StoredMessage | None, ReplyStats | None]:
        """The worker is done: the last text shown, the reply saved and its view finished.
        Returns the saved message (None when nothing was written) and the reply's stats."""
        if self._tick_timer is not None:
            self._tick_timer.stop()
            self._tick_timer = None
        saved = await self.session.complete(finished)
        view = finished.reply.view
        view.set_streaming(False)
        stats = ReplyStats.of(finished.stats)
        if saved is not None:
            stopped = finished.reply.guard is not None and finished.reply.guard.result is not None
            info, warning = stats_line(stats, self.strings, "content_filter" if stopped else "")
            view.show_info(info, warning=warning)
        return saved, stats

    def save_now(self) -> None:
        """On quit: stop generating and save whatever the reply holds."""
        self.session.save_now()

    # The experts panel

    def observe_routing(self) -> None:
        """Observe routing live only while the experts panel is shown (the engine keeps the
        last reply's counts anyway, so the panel has them whenever it opens)."""
        engine = self.engine
        if engine is None:
            return
        wanted = self.experts.shown and self.has_experts is not False
        engine.routing_observer = self.session.routing.observe if wanted else None

    def draw_experts(self, *, force: bool = False) -> bool:
        """Redraw the experts panel if it is shown and has something new; True if it drew."""
        return self.experts.refresh_from(
            self.session.routing, self.has_experts, self.engine is not None, force=force,
            remote=getattr(self.engine, "server", None) is not None,
        )  # fmt: skip
