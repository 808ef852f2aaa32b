"""Every key and what it does."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label

from app.i18n import Strings
from app.tui.actions import help_rows


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "close", "Close", show=False)]

    def __init__(self, strings: Strings) -> None:
        super().__init__(classes="dialog-screen")
        self.strings = strings

    def compose(self) -> ComposeResult:
        t = self.strings
        with Vertical(id="help-dialog", classes="dialog"):
            yield Label(t("help.title"), classes="dialog-title")
            table: DataTable = DataTable(id="help-table", cursor_type="row", zebra_stripes=True)
            table.add_columns(t("help.key"), t("help.action"))
            for keys, description in help_rows(t):
                table.add_row(keys, description)
            yield table
            yield Label(t("help.palette"), classes="dialog-text")

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()

    def action_close(self) -> None:
        self.dismiss(None)
