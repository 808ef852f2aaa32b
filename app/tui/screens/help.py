"""Every key and what it does."""

from __future__ import annotations

from rich.cells import cell_len
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

from app.i18n import Strings
from app.tui.actions import help_rows

SCROLLBAR_CELLS = 2  # kept free for the table's scrollbar, shown or not


class HelpTable(DataTable):
    """Keys and actions; an action too long for the width wraps onto more lines (never cut
    mid-word), laid out again when the width changes."""

    def __init__(self, strings: Strings) -> None:
        super().__init__(id="help-table", cursor_type="row", zebra_stripes=True)
        self.strings = strings
        self._laid_out_width = 0

    def on_resize(self, event: events.Resize) -> None:
        if event.size.width != self._laid_out_width:
            self.fill(event.size.width)

    def fill(self, width: int) -> None:
        t = self.strings
        self._laid_out_width = width
        rows = help_rows(t)
        key_width = max(cell_len(text) for text in [t("help.key")] + [keys for keys, _ in rows])
        padding = 2 * self.cell_padding
        action_width = max(12, width - key_width - 2 * padding - SCROLLBAR_CELLS)
        row = self.cursor_row
        self.clear(columns=True)
        self.add_column(t("help.key"), width=key_width)
        self.add_column(t("help.action"), width=action_width)
        for keys, description in rows:
            lines = Text(description).wrap(self.app.console, action_width)
            self.add_row(keys, Text("\n".join(line.plain for line in lines)), height=len(lines))
        self.move_cursor(row=min(row, self.row_count - 1))


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "close", "Close", show=False)]

    def __init__(self, strings: Strings) -> None:
        super().__init__(classes="dialog-screen")
        self.strings = strings

    def compose(self) -> ComposeResult:
        t = self.strings
        with Vertical(id="help-dialog", classes="dialog"):
            yield Label(t("help.title"), classes="dialog-title")
            yield HelpTable(t)
            yield Label(t("help.palette"), classes="dialog-text")

    def on_mount(self) -> None:
        table = self.query_one(HelpTable)
        table.fill(table.size.width or 80)
        table.focus()

    def action_close(self) -> None:
        self.dismiss(None)
