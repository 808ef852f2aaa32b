"""A layers × experts grid: how many tokens of the last reply each layer routed to each expert."""

from __future__ import annotations

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.widgets import Static

# A dark-to-bright scale (viridis-like): low counts are dark blue, high counts bright yellow.
_SCALE = [
    (68, 1, 84),
    (59, 82, 139),
    (33, 145, 140),
    (94, 201, 98),
    (253, 231, 37),
]
NUMBERED_CELLS_UP_TO = 16  # with more experts than this, cells are small blocks without numbers


def heat_color(fraction: float) -> Color:
    """The scale's color at ``fraction`` (0..1), interpolated."""
    fraction = min(max(fraction, 0.0), 1.0) * (len(_SCALE) - 1)
    low = int(fraction)
    high = min(low + 1, len(_SCALE) - 1)
    weight = fraction - low
    r, g, b = (round(a + (c - a) * weight) for a, c in zip(_SCALE[low], _SCALE[high], strict=True))
    return Color.from_rgb(r, g, b)


def _cell_style(count: int, maximum: int) -> Style:
    if count == 0:
        return Style(color="grey50", dim=True)
    fraction = count / maximum if maximum else 0.0
    background = heat_color(fraction)
    r, g, b = background.get_truecolor()
    foreground = "black" if (0.299 * r + 0.587 * g + 0.114 * b) > 140 else "white"
    return Style(color=foreground, bgcolor=background)


def _short_count(count: int) -> str:
    if count < 1000:
        return str(count)
    if count < 10_000:
        return f"{count / 1000:.1f}k"
    return f"{count // 1000}k"


def render_heatmap(counts: np.ndarray, layer_label: str = "L") -> Text:
    """The grid as Rich text: one row per layer, one cell per expert, colored by count."""
    layers, experts = counts.shape
    maximum = int(counts.max()) if counts.size else 0
    numbered = experts <= NUMBERED_CELLS_UP_TO
    cell_width = 4 if numbered else 2
    label_width = max(len(f"{layer_label}{layers - 1}"), 3) + 1
    text = Text(no_wrap=True)
    text.append(" " * label_width)
    for expert in range(experts):
        heading = f"E{expert}".rjust(cell_width - 1) + " " if numbered else f"{expert % 100:>2}"
        text.append(heading, style="bold")
    text.append("\n")
    for layer in range(layers):
        text.append(f"{layer_label}{layer}".ljust(label_width), style="bold")
        for expert in range(experts):
            count = int(counts[layer, expert])
            style = _cell_style(count, maximum)
            if numbered:
                cell = (_short_count(count) if count else "·").rjust(cell_width - 1) + " "
            else:
                cell = "  " if count else "··"
            text.append(cell, style=style)
        text.append("\n")
    return text


def render_legend(low: str = "0", high: str = "max", steps: int = 10) -> Text:
    text = Text(no_wrap=True)
    text.append(f"{low} ")
    for step in range(steps):
        text.append("  ", style=Style(bgcolor=heat_color(step / (steps - 1))))
    text.append(f" {high}")
    return text


class ExpertsHeatmap(Static):
    """Shows routing counts, a waiting hint, or the dense-model note."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id, markup=False)
        self.counts: np.ndarray | None = None
        self.tokens = 0
        self.note: str | None = None

    def show_counts(self, counts: np.ndarray, tokens: int, summary: str, layer_label: str) -> None:
        """Draw the grid for ``counts`` ([layers, experts]) over ``tokens`` generated tokens."""
        self.counts = counts
        self.tokens = tokens
        self.note = None
        self.remove_class("-note")
        text = Text(no_wrap=True)
        text.append(summary + "\n", style="italic")
        text.append_text(render_heatmap(counts, layer_label))
        maximum = int(counts.max()) if counts.size else 0
        text.append_text(render_legend("0", str(maximum)))
        self.update(text)

    def show_note(self, note: str) -> bool:
        """A sentence instead of the grid (dense model, nothing generated yet, no model).
        Returns False when that note was already shown."""
        if note == self.note:
            return False
        self.note = note
        self.counts = None
        self.tokens = 0
        self.add_class("-note")
        self.update(Text(note))
        return True
