"""A small dialog asking for one line of text (renaming a chat)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label


class TextPromptScreen(ModalScreen[str | None]):
    """Dismisses with the stripped text (never empty), or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", show=False)]

    def __init__(self, title: str, value: str, ok_label: str, cancel_label: str) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.value = value
        self.ok_label = ok_label
        self.cancel_label = cancel_label

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small-dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Input(self.value, id="text-value")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.ok_label, variant="primary", id="ok")
                yield Button(self.cancel_label, id="cancel")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def _accept(self) -> None:
        value = " ".join(self.query_one(Input).value.split())
        if value:
            self.dismiss(value)

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self._accept()

    @on(Button.Pressed, "#ok")
    def _ok_pressed(self) -> None:
        self._accept()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)
