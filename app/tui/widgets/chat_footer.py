"""The chat screen's footer, fitted to its width: keys that do not fit are left out whole (the
least needed first), never cut mid-word, and "F1 Help" and the palette key always stay."""

from __future__ import annotations

from rich.cells import cell_len
from textual import events
from textual.app import ComposeResult
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

# Left out first when the footer is too narrow; F1 (help) and the palette key are never left out.
DROP_ORDER = (
    "copy_reply",
    "edit_last",
    "toggle_experts",
    "settings",
    "regenerate",
    "new_chat",
    "cancel",
)


def key_cells(key: FooterKey) -> int:
    """Cells a compact footer key takes: "^n New" and the space after it (the palette key:
    its left border instead)."""
    label = cell_len(key.key_display) + (1 + cell_len(key.description) if key.description else 0)
    return label + 1


class ChatFooter(Footer):
    def __init__(self) -> None:
        super().__init__(compact=True, show_command_palette=True)
        self._composed_width = 0

    def compose(self) -> ComposeResult:
        widgets = list(super().compose())
        width = self.size.width or self.app.size.width
        self._composed_width = width
        keys = [w for w in widgets if isinstance(w, FooterKey)]
        used = sum(key_cells(key) for key in keys)
        for action in DROP_ORDER:
            if used <= width:
                break
            for key in [k for k in keys if k.action == action]:
                widgets.remove(key)
                keys.remove(key)
                used -= key_cells(key)
        yield from widgets

    def on_resize(self, event: events.Resize) -> None:
        if event.size.width != self._composed_width:
            self.refresh(recompose=True)
