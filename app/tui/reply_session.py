"""The reply being written, outside any widget.

``ReplySession`` owns the active reply and its thread worker, the message sent while the model
is still loading (it waits here and goes as soon as the engine is ready), the live figures
(prompt read so far, tokens written, rates) and how often a streaming reply is saved.

A turn: the screen saves and shows the user's message and hands ``begin`` (through its
``ReplyFlow`` widget, the session's host) the reply's view → a thread worker fits the messages
to the context and runs ``engine.stream``: text goes to a ``TextBuffer``, prompt progress to the
reply → the host's timer calls ``tick`` 30 times a second: buffered text reaches the reply's
``MarkdownStream`` whenever the ``UpdatePacer`` allows, the partial reply is saved every
``SAVE_INTERVAL`` seconds, and the live figures go to ``on_live`` (True when it drew something)
→ the worker posts ``Finished`` (it bubbles up to the screen) → ``complete``: the last text is
flushed and the reply saved with its stats. The worker never touches a widget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from textual.dom import DOMNode
from textual.message import Message
from textual.widgets.markdown import MarkdownStream

from app.store import ChatSettings, ConversationStore, StoredMessage, stats_to_dict
from app.tui.engine import Engine, template_options
from app.tui.moderation import stopped_stats
from app.tui.prompting import fit_to_context
from app.tui.streaming import RoutingAccumulator, TextBuffer, UpdatePacer
from app.tui.widgets.message_view import MessageView

TICK_INTERVAL = 1 / 30  # how often a streaming reply checks for new text (updates: UpdatePacer)
UI_CPU_BUDGET = 0.05  # share of a core the UI thread aims to use while a reply streams
SAVE_INTERVAL = 1.0  # a streaming reply is saved at least this often
LONG_PROMPT_SECONDS = 30.0  # reading a prompt longer than this gets a notice


def generation_settings(settings: ChatSettings, max_tokens: int) -> Any:
    """The engine's GenerationSettings for a chat's settings (no MLX: a server's engine too)."""
    from model.generation_settings import GenerationSettings

    return GenerationSettings(
        max_tokens=max_tokens, temperature=settings.temperature, top_p=settings.top_p
    )


@dataclass(eq=False)
class ActiveReply:
    """The reply being written: where its text goes and what has been saved of it."""

    conversation_id: int
    view: MessageView
    stream: MarkdownStream
    messages: list[dict]
    settings: ChatSettings
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
    guard: Any = None  # safe mode: an app.moderation ReplyGuard fed the reply as it streams
    # Written by the worker thread (plain assignments), read by the UI's tick:
    started_at: float | None = None  # when the engine was asked (monotonic)
    progress: tuple[int, int] | None = None  # prompt tokens read, of how many
    progress_at: float | None = None
    prompt_size: int | None = None  # tokens of the whole prompt (before the cache is reused)
    text_chunks: int = 0  # chunks of text so far (one per token, but for held-back bytes)
    first_text_at: float | None = None
    last_text_chunk_at: float | None = None


@dataclass(frozen=True)
class LiveStatus:
    """What the reply is doing now, for the status bar and the reply's info line."""

    phase: str  # "waiting" (for the model to load) | "reading" (the prompt) | "writing"
    read: int = 0  # prompt tokens read
    total: int = 0  # prompt tokens to read
    prompt_size: int | None = None  # the whole prompt's tokens, known before reading starts
    read_rate: float | None = None  # prompt tokens a second
    seconds_left: float | None = None  # to read the rest of the prompt
    tokens: int = 0  # tokens written so far
    tokens_per_second: float | None = None


def live_status(reply: ActiveReply, now: float) -> LiveStatus:
    if reply.first_text_at is not None:
        tokens = reply.text_chunks
        elapsed = (reply.last_text_chunk_at or now) - reply.first_text_at
        tps = (tokens - 1) / elapsed if tokens > 1 and elapsed > 0 else None
        return LiveStatus("writing", tokens=tokens, tokens_per_second=tps)
    if reply.progress is not None and reply.started_at is not None:
        read, total = reply.progress
        elapsed = (reply.progress_at or now) - reply.started_at
        rate = read / elapsed if elapsed > 0 else None
        left = (total - read) / rate if rate else None
        return LiveStatus("reading", read=read, total=total, read_rate=rate, seconds_left=left)
    return LiveStatus("reading", prompt_size=reply.prompt_size)


class ReplySession:
    """The reply pipeline of one chat screen (``host`` runs its worker and gets its messages:
    the screen's ``ReplyFlow``)."""

    class Finished(Message):
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

    class LongPrompt(Message):
        """Reading this prompt will take more than ``LONG_PROMPT_SECONDS``."""

        def __init__(self, reply: ActiveReply, tokens: int, seconds: float) -> None:
            super().__init__()
            self.reply = reply
            self.tokens = tokens
            self.seconds = seconds

    def __init__(
        self,
        host: DOMNode,
        store: ConversationStore,
        on_live: Callable[[ActiveReply, LiveStatus], bool],
    ) -> None:
        self.host = host
        self.store = store
        self.on_live = on_live
        self.engine: Engine | None = None
        self.reply: ActiveReply | None = None  # being written
        self.waiting: ActiveReply | None = None  # sent during the load, not started yet
        self.last_finished: ActiveReply | None = None  # for tests and benchmarks
        self.routing = RoutingAccumulator()
        self.prompt_tps: float | None = None  # prompt reading speed measured by the last reply

    @property
    def busy(self) -> bool:
        return self.reply is not None or self.waiting is not None

    def begin(
        self,
        conversation_id: int,
        view: MessageView,
        messages: list[dict],
        settings: ChatSettings,
        guard: Any = None,
    ) -> ActiveReply:
        """Start the reply now, or as soon as the engine is ready (``guard``: safe mode's)."""
        reply = ActiveReply(conversation_id, view, view.get_stream(), messages, settings)
        reply.guard = guard
        if self.engine is None:
            self.waiting = reply
        else:
            self._start(reply)
        return reply

    def engine_ready(self, engine: Engine) -> ActiveReply | None:
        """The model is loaded; the reply that waited for it (if any) starts now."""
        self.engine = engine
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            self._start(waiting)
        return waiting

    def _start(self, reply: ActiveReply) -> None:
        self.reply = reply
        self.routing.reset()
        self.on_live(reply, LiveStatus("reading"))
        self.host.run_worker(
            lambda: self._generate(reply),
            thread=True,
            group="generation",
            exit_on_error=False,
        )

    def cancel(self) -> ActiveReply | None:
        """Esc: stop the reply being written (it keeps its text), or take back the one waiting
        for the model (returned, so the screen can give its text back)."""
        if self.reply is not None:
            self.reply.cancel_requested = True
            if self.engine is not None:
                self.engine.cancel()
            return None
        waiting, self.waiting = self.waiting, None
        return waiting

    def _generate(self, reply: ActiveReply) -> None:
        """Runs in a thread: only touches the reply's buffer and fields and posts messages."""
        engine = self.engine
        assert engine is not None
        stats: Any = None
        error: BaseException | None = None
        post = self.host.post_message
        try:
            settings = reply.settings
            from model.tokenizer.hf import template_options as rendered_with

            options = template_options(engine, getattr(settings, "thinking", True))
            with rendered_with(**options):
                fitted = fit_to_context(
                    reply.messages, engine.count_tokens, engine.context_length, settings.max_tokens
                )
            if not fitted.fits:
                post(self.PromptTooLong(reply, fitted.prompt_tokens, engine.context_length))
                return
            reply.prompt_size = fitted.prompt_tokens
            shrunk = fitted.max_tokens < settings.max_tokens
            if fitted.dropped_messages or shrunk:
                post(
                    self.ContextTrimmed(
                        reply, fitted.dropped_messages, fitted.max_tokens if shrunk else None
                    )
                )
            cancel_sent, warned = False, False
            if not reply.cancel_requested:
                reply.started_at = time.monotonic()
                with rendered_with(**options):  # the prompt is encoded by stream() itself
                    chunks = engine.stream(
                        fitted.messages, generation_settings(settings, fitted.max_tokens)
                    )
                for chunk in chunks:
                    now = time.monotonic()
                    progress = getattr(chunk, "progress", None)
                    if progress is not None:
                        reply.progress, reply.progress_at = progress, now
                        status = live_status(reply, now)
                        left = status.seconds_left or 0.0
                        if not warned and left + (now - reply.started_at) > LONG_PROMPT_SECONDS:
                            warned = True
                            post(self.LongPrompt(reply, progress[1], left))
                    if chunk.text and not self._stopped_by_guard(reply, chunk.text, engine):
                        if reply.first_text_at is None:
                            reply.first_text_at = now
                        reply.text_chunks += 1
                        reply.last_text_chunk_at = now
                        reply.buffer.append(chunk.text)
                    if chunk.stats is not None:
                        stats = chunk.stats
                    if reply.cancel_requested and not cancel_sent:
                        # Esc may have come before the stream started: say it again.
                        engine.cancel()
                        cancel_sent = True
                if reply.guard is not None and not reply.cancel_requested:
                    reply.guard.finish()  # the tail after the last closed sentence
        except Exception as exception:  # shown in the chat, never a crash
            error = exception
        finally:
            post(self.Finished(reply, stats, error))

    @staticmethod
    def _stopped_by_guard(reply: ActiveReply, text: str, engine: Engine) -> bool:
        """Safe mode: True (and generation stopped) once the reply's text is flagged; the
        flagged window's text is kept (the reply is folded, not cut)."""
        guard = reply.guard
        if guard is None or guard.result is not None:
            return guard is not None
        if guard.feed(text) is not None:
            reply.buffer.append(text)
            engine.cancel()
            return True
        return False

    async def tick(self) -> None:
        """Timer tick: when the pacer allows, move what the worker wrote onto the screen, give
        the live figures, and save the partial reply now and then."""
        reply = self.reply
        if reply is None or reply.finished or not reply.pacer.due():
            return
        drained = await self._drain(reply)
        drew = self.on_live(reply, live_status(reply, time.monotonic()))
        if drained or drew:
            reply.pacer.updated()
        if len(reply.text) != reply.saved_length and (
            time.monotonic() - reply.last_saved_at >= SAVE_INTERVAL
        ):
            self._save(reply, complete=False)

    async def _drain(self, reply: ActiveReply) -> bool:
        """Hand the buffered text to the reply's Markdown stream; False when there was none."""
        text = reply.buffer.drain()
        if not text:
            return False
        reply.text += text
        reply.last_text_at = time.perf_counter()
        await reply.stream.write(text)
        return True

    async def complete(self, finished: Finished) -> StoredMessage | None:
        """The worker is done: flush the last text, save the reply with its stats (if it has
        text) and keep the routing counts of the reply for the experts view."""
        reply = finished.reply
        reply.finished = True
        await self._drain(reply)  # the last tokens always reach the screen
        await reply.stream.stop()
        reply.completed_at = time.perf_counter()
        reply.stats = finished.stats
        if finished.stats is not None:
            tps = getattr(finished.stats, "prompt_tps", 0.0)
            if tps and getattr(finished.stats, "prompt_tokens", 0) >= 256:
                self.prompt_tps = tps  # a prompt long enough for its speed to mean something
        stats: Any = finished.stats
        if reply.guard is not None and reply.guard.result is not None:
            stats = stopped_stats(stats_to_dict(stats), reply.guard.result)
        if reply.text:
            self._save(reply, complete=True, stats=stats)
        engine = self.engine
        kept = None if engine is None else getattr(engine, "last_routing", None)
        if kept is not None and finished.stats is not None:
            self.routing.load(kept, int(getattr(finished.stats, "generation_tokens", 0)))
        self.reply = None
        self.last_finished = reply
        return reply.message if reply.text else None

    def _save(self, reply: ActiveReply, *, complete: bool, stats: Any = None) -> None:
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

    def save_now(self) -> None:
        """On quit: stop generating and save whatever the reply holds."""
        reply = self.reply
        if reply is None:
            return
        reply.cancel_requested = True
        if self.engine is not None:
            self.engine.cancel()
        reply.text += reply.buffer.drain()
        if reply.text:
            self._save(reply, complete=True, stats={"finish_reason": "cancelled"})
