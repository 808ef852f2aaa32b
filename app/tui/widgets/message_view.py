"""One message of the chat: who wrote it, its text, and a line about how it was written."""

from __future__ import annotations

from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Collapsible, Label, Markdown, Static
from textual.widgets.markdown import MarkdownStream

from app.i18n import Strings
from app.tui.engine import ReplyStats

# A user message longer than this shows its beginning only: laying out hundreds of kilobytes of
# wrapped text would stall the UI, and the model gets the whole text anyway.
USER_DISPLAY_LIMIT = 20_000


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_thinking(text: str) -> tuple[str, str, str | None]:
    """A reply -> (head, answer, thinking): ``head`` is its raw text up to and including
    ``</think>`` ("" when it has no thinking part), ``thinking`` the text between the tags
    (None when there is none; the part so far while ``</think>`` has not come)."""
    start = text.lstrip()
    if not start.startswith(THINK_OPEN):
        if THINK_CLOSE in text and THINK_OPEN not in text:  # the template opened it (<think>\n)
            head, _, answer = text.partition(THINK_CLOSE)
            return head + THINK_CLOSE, answer, head.strip()
        return "", text, None
    inside = start[len(THINK_OPEN) :]
    thinking, closed, answer = inside.partition(THINK_CLOSE)
    if not closed:
        return text, "", thinking.strip()
    return text[: len(text) - len(answer)], answer, thinking.strip()


class ThinkingStream:
    """Streams a reply into its view: a leading ``<think>…</think>`` part to the view's folded
    thinking part, the rest to the Markdown stream (``stop`` as MarkdownStream's)."""

    def __init__(self, view: MessageView, markdown: MarkdownStream) -> None:
        self.view = view
        self.markdown = markdown
        self.text = ""  # everything before the answer, while it may still be thinking
        self.answering = False

    async def write(self, text: str) -> None:
        if self.answering:
            await self.markdown.write(text)
            return
        self.text += text
        start = self.text.lstrip()
        if start and not start.startswith(THINK_OPEN) and not THINK_OPEN.startswith(start):
            self.answering = True  # no thinking part: all of it is the answer
            await self.markdown.write(self.text)
            return
        head, answer, thinking = split_thinking(self.text)
        if thinking is not None:
            self.view.show_thinking(thinking, done=head != self.text)
        if head != self.text:  # </think> came
            self.answering = True
            self.view.thinking_head = head
            if answer:
                await self.markdown.write(answer)

    async def stop(self) -> None:
        if not self.answering and self.text:  # it ended before </think> (or before any answer)
            if self.view.thinking is None:  # "<thi": what looked like a tag was the answer
                await self.markdown.write(self.text)
            else:  # cut while thinking: the whole reply is its thinking part, kept as written
                self.view.thinking_head = self.text
        await self.markdown.stop()


def reply_parser() -> MarkdownIt:
    """Textual's Markdown parser, but a line break in a reply stays a line break (a poem, an
    address): models write plain newlines where Markdown would want two spaces."""
    parser = MarkdownIt("gfm-like", {"breaks": True})
    parser.core.ruler.push("soft_breaks_are_hard", _soft_breaks_are_hard)
    return parser


def _soft_breaks_are_hard(state: StateCore) -> None:
    """Textual draws a softbreak as a space; the ``breaks`` option only changes HTML output."""
    for token in state.tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


class MessageView(Vertical, can_focus=True):
    """A user prompt (plain text, shown as typed) or an assistant reply (Markdown, streamed).
    A reply stopped by safe mode is folded behind a notice until revealed (a click, or Enter)."""

    class Revealed(Message):
        """The user asked to see a folded reply (it is shown already)."""

        def __init__(self, view: MessageView) -> None:
            super().__init__()
            self.view = view

    def __init__(
        self,
        role: str,
        content: str = "",
        *,
        role_label: str,
        message_id: int | None = None,
        display_cut_note: str = "",
        strings: Strings | None = None,
    ) -> None:
        super().__init__(classes=f"message -{role}")
        self.role = role
        self.message_id = message_id
        self._content = content
        self._role_label = role_label
        self._display_cut_note = display_cut_note
        self._strings = strings
        self.thinking_head = ""  # a reply's raw text up to its </think> (its thinking part)
        self.thinking: str | None = None  # the text of that part (None: the reply has none)

    @property
    def content(self) -> str:
        """The message's full text (what the user typed or what the model wrote so far)."""
        if self.role == "assistant" and self.is_mounted:
            return self.thinking_head + self.query_one(Markdown).source
        return self._content

    def compose(self) -> ComposeResult:
        yield Label(self._role_label, classes="message-role")
        if self.role == "assistant":
            yield Label("", classes="message-fold")
            head, answer, thinking = split_thinking(self._content)
            self.thinking_head, self.thinking = head, thinking
            if thinking is not None:
                yield self._thinking_part(thinking, done=True)
            yield Markdown(answer, classes="message-body", parser_factory=reply_parser)
        else:
            text = self._content
            if len(text) > USER_DISPLAY_LIMIT:
                hidden = len(text) - USER_DISPLAY_LIMIT
                text = text[:USER_DISPLAY_LIMIT]
                yield Static(Text(text), classes="message-body")
                chars = self._strings.number(hidden) if self._strings else f"{hidden:,}"
                yield Label(self._display_cut_note.format(chars=chars), classes="message-note")
            else:
                yield Static(Text(text), classes="message-body")
        yield Label("", classes="message-info -empty")

    def get_stream(self) -> ThinkingStream:
        """A stream that appends to this reply (assistant messages only): its thinking part
        folded, the answer as Markdown."""
        return ThinkingStream(self, Markdown.get_stream(self.query_one(Markdown)))

    def _thinking_title(self, thinking: str, done: bool) -> str:
        words = len(thinking.split())
        if self._strings is None:
            return f"Thinking ({words} words)"
        key = "message.thought" if done else "message.thinking"
        return self._strings(key, words=self._strings.number(words))

    def _thinking_part(self, thinking: str, done: bool) -> Collapsible:
        """Only a reply with a thinking part has one (no widgets for the others)."""
        self._thinking_text = Static(Text(thinking), classes="thinking-text")
        return Collapsible(
            self._thinking_text,
            title=self._thinking_title(thinking, done),
            collapsed=True,
            classes="message-thinking",
        )

    def show_thinking(self, thinking: str, done: bool) -> None:
        """The reply's thinking part so far (folded: one dim line; expanded: the text)."""
        first = self.thinking is None
        self.thinking = thinking
        if first:
            self.mount(self._thinking_part(thinking, done), before=self.query_one(Markdown))
            return
        self.query_one(".message-thinking", Collapsible).title = self._thinking_title(
            thinking, done
        )
        self._thinking_text.update(Text(thinking))

    def set_streaming(self, streaming: bool) -> None:
        self.set_class(streaming, "-streaming")

    @property
    def folded(self) -> bool:
        return self.has_class("-folded")

    def fold(self, notice: str) -> None:
        """Hide the reply's text behind ``notice`` (the text stays, for ``reveal``)."""
        self.query_one(".message-fold", Label).update(notice)
        self.add_class("-folded")

    def reveal(self) -> None:
        if self.folded:
            self.remove_class("-folded")
            self.post_message(self.Revealed(self))

    def on_click(self, event: events.Click) -> None:
        self.reveal()

    def on_key(self, event: events.Key) -> None:
        if event.key == "enter" and self.folded:
            event.stop()
            self.reveal()

    def show_info(self, info: str, *, warning: bool = False) -> None:
        """The line under the message: token count and speed, or why it stopped."""
        label = self.query_one(".message-info", Label)
        label.update(info)
        label.set_class(not info, "-empty")
        label.set_class(warning, "-warning")


def stats_line(
    stats: ReplyStats | None, strings: Strings, finish_reason: str = ""
) -> tuple[str, bool]:
    """The info line for a reply from its stats; True when the reply did not end normally."""
    parts: list[str] = []
    if stats is not None:
        if stats.generation_tokens:
            count = stats.generation_tokens
            key = "message.tokens_one" if count == 1 else "message.tokens"
            part = strings(key, tokens=strings.number(count))
            if stats.generation_tps > 0:  # one token has no decode rate
                part += " · " + strings("message.speed", tps=strings.number(stats.generation_tps, 1))
            parts.append(part)
        finish_reason = finish_reason or stats.finish_reason
    warning = False
    if finish_reason == "cancelled":
        parts.append(strings("message.stopped"))
        warning = True
    elif finish_reason == "content_filter":
        parts.append(strings("message.content_filter"))
        warning = True
    elif finish_reason == "length":
        parts.append(strings("message.truncated"))
        warning = True
    elif finish_reason == "interrupted":
        parts.append(strings("message.interrupted"))
        warning = True
    return " · ".join(parts), warning
