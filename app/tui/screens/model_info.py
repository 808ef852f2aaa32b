"""What the loaded model is: every attribute ``engine.info`` has, in a table."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from typing import Any

from rich.table import Table
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

from app.i18n import Strings

_BITS_PER_WEIGHT = re.compile(r"(\d+(?:\.\d+)?) bits/weight")  # "GGUF Q4_K_M, 4.87 bits/weight"
DENSE_NAMES = ("num_experts", "num_local_experts")
PER_TOKEN_NAMES = ("experts_per_token", "num_experts_per_tok")

# Shown first when present, in this order; anything else the info object has follows.
PREFERRED_ORDER = (
    "architecture",
    "model_type",
    "num_layers",
    "num_hidden_layers",
    "num_experts",
    "num_local_experts",
    "experts_per_token",
    "num_experts_per_tok",
    "hidden_size",
    "vocab_size",
    "total_params",
    "active_params",
    "quantization",
    "bits",
    "group_size",
    "size_bytes",
    "size_gb",
)


def info_attributes(info: Any) -> list[tuple[str, Any]]:
    """(name, value) pairs of an info object: dataclass fields, else public attributes."""
    if info is None:
        return []
    if isinstance(info, dict):
        items = dict(info)
    elif is_dataclass(info) and not isinstance(info, type):
        items = {field.name: getattr(info, field.name) for field in fields(info)}
    else:
        items = {
            name: value
            for name, value in vars(info).items()
            if not name.startswith("_") and not callable(value)
        }
    ordered = [name for name in PREFERRED_ORDER if name in items]
    ordered += [name for name in items if name not in ordered]
    return [(name, items[name]) for name in ordered if items[name] is not None]


def format_value(name: str, value: Any, strings: Strings | None = None) -> str:
    """Readable values in the interface language: parameter counts in billions/millions,
    sizes in GB (Go), other numbers with the language's separators."""
    t = strings or Strings()
    if isinstance(value, bool):
        return t("model.yes" if value else "model.no")
    if isinstance(value, int) and "param" in name:
        if value >= 1_000_000_000:
            return f"{t.number(value / 1e9, 2)} {t('model.billions')}"
        if value >= 1_000_000:
            return f"{t.number(value / 1e6, 1)} M"
        return t.number(value)
    if isinstance(value, int) and "bytes" in name:
        return t.bytes(value)
    if isinstance(value, int):
        return t.number(value)
    if isinstance(value, float):
        if name.endswith("_gb"):
            return t.bytes(value * 1e9)
        return t.number(value, 2)
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    if isinstance(value, str):  # the model's own words: its "bits/weight" in the language's
        return _BITS_PER_WEIGHT.sub(
            lambda m: t("model.bits_per_weight", bits=t.number(float(m.group(1)), 2)), value
        )
    return str(value)


def table_rows(info: Any, strings: Strings) -> list[tuple[str, str]]:
    """(label, value) rows of an info object; a dense model's experts say "none (dense)", as
    `mixchat info` does, rather than "0"."""
    items = info_attributes(info)
    dense = any(name in DENSE_NAMES and value == 0 for name, value in items)
    rows = []
    for name, value in items:
        if name in ("name", "context_length") or (dense and name in PER_TOKEN_NAMES):
            continue  # the first rows have them; a dense model has no experts per token
        shown = strings("model.dense") if dense and name in DENSE_NAMES else None
        rows.append((label_for(name, strings), shown or format_value(name, value, strings)))
    return rows


def label_for(name: str, strings: Strings | None = None) -> str:
    """The field's name in the interface language, else the attribute name made readable."""
    key = f"model.field.{name}"
    if strings is not None and strings.has(key):
        return strings(key)
    return name.replace("_", " ").capitalize()


class ModelInfoScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f3", "close", "Close", show=False)]

    def __init__(
        self, strings: Strings, name: str | None, info: Any, context_length: int | None
    ) -> None:
        super().__init__(classes="dialog-screen")
        self.strings = strings
        self.model_name = name
        self.info = info
        self.context_length = context_length

    def compose(self) -> ComposeResult:
        t = self.strings
        with Vertical(id="model-dialog", classes="dialog"):
            yield Label(t("model.title"), classes="dialog-title")
            if self.model_name is None:
                yield Label(t("model.not_loaded"))
            else:
                # A Rich table in a Static: long values (a path) wrap instead of being cut.
                table = Table(show_header=False, box=None, expand=True, padding=(0, 1))
                table.add_column(style="bold", no_wrap=True)
                table.add_column(overflow="fold", ratio=1)
                table.add_row(t("model.name"), self.model_name)
                if self.context_length:
                    table.add_row(t("model.context_length"), t.number(self.context_length))
                for label, value in table_rows(self.info, t):
                    table.add_row(label, value)
                with VerticalScroll(id="model-table"):
                    yield Static(table)
            with Horizontal(classes="dialog-buttons"):
                yield Button(t("model.close"), variant="primary", id="close")

    def action_close(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#close")
    def _close_pressed(self) -> None:
        self.dismiss(None)
