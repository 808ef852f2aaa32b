"""The multi-line box where the user writes: Enter sends, Shift+Enter or Ctrl+J adds a line.

A huge paste (more than ``LARGE_PASTE_CHARS``) is not laid out in the box, where every keystroke
would rewrap it: the box shows a short marker instead and puts the text back when sending.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from textual import events
from textual.message import Message
from textual.widgets import TextArea

LARGE_PASTE_CHARS = 8_000
_MARKER = re.compile(r"⟦[^⟦⟧\d]+ (\d+) ?: [^⟦⟧]+⟧")  # ⟦paste 1: 20,000 chars⟧, in any language


class PromptBox(TextArea):
    """A TextArea that sends its text on Enter instead of inserting a newline."""

    NEWLINE_KEYS = ("shift+enter", "ctrl+j", "alt+enter")

    class Submitted(Message):
        """The user pressed Enter: ``text`` is what the box held, pastes included."""

        def __init__(self, prompt_box: PromptBox, text: str) -> None:
            super().__init__()
            self.prompt_box = prompt_box
            self.text = text

        @property
        def control(self) -> PromptBox:
            return self.prompt_box

    class LargePaste(Message):
        """A paste too large to lay out arrived (shown as a marker); ``text`` is all of it."""

        def __init__(self, prompt_box: PromptBox, text: str) -> None:
            super().__init__()
            self.prompt_box = prompt_box
            self.text = text

    def __init__(
        self,
        *,
        placeholder: str = "",
        id: str | None = None,
        marker: Callable[[int, int], str] = lambda number, chars: f"paste {number}: {chars:,} chars",
    ) -> None:
        super().__init__(
            "",
            id=id,
            soft_wrap=True,
            tab_behavior="focus",
            show_line_numbers=False,
            highlight_cursor_line=False,
            placeholder=placeholder,
        )
        self._large_pastes: dict[int, str] = {}
        self._marker = marker  # (paste number, its length) -> the marker's words

    @property
    def prompt_text(self) -> str:
        """The text to send: the box's text with paste markers replaced by what was pasted."""
        return _MARKER.sub(self._expand_marker, self.text)

    def _expand_marker(self, match: re.Match[str]) -> str:
        return self._large_pastes.get(int(match.group(1)), match.group(0))

    def _marker_for(self, text: str) -> str:
        number = len(self._large_pastes) + 1
        self._large_pastes[number] = text
        return f"⟦{self._marker(number, len(text))}⟧"

    # Public handlers: Textual calls a subclass's on_key / on_paste before TextArea's own, and
    # prevent_default() keeps TextArea from also handling the event.

    def on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.submit()
        elif event.key in self.NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self._insert("\n")

    def on_paste(self, event: events.Paste) -> None:
        if len(event.text) > LARGE_PASTE_CHARS and not self.read_only:
            event.stop()
            event.prevent_default()
            self._insert(self._marker_for(event.text))
            self.post_message(self.LargePaste(self, event.text))

    def _insert(self, text: str) -> None:
        """Put ``text`` in place of the selection, the cursor after it."""
        start, end = self.selection
        result = self.replace(text, start, end, maintain_selection_offset=False)
        self.move_cursor(result.end_location)

    def submit(self) -> None:
        """Post the text and clear the box; an empty (blank) box posts nothing."""
        text = self.prompt_text
        if not text.strip():
            return
        self.clear_prompt()
        self.post_message(self.Submitted(self, text))

    def clear_prompt(self) -> None:
        self.clear()
        self._large_pastes.clear()

    def set_prompt(self, text: str) -> None:
        """Replace the box's text (a huge text shows as a marker) and put the cursor at its end."""
        self._large_pastes.clear()
        self.load_text(self._marker_for(text) if len(text) > LARGE_PASTE_CHARS else text)
        self.move_cursor(self.document.end)
