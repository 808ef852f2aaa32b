"""How many tokens of the last reply each layer routed to each expert.

Up to ``GRID_UP_TO`` experts (Mixtral's 8, a 16- or 32-expert model) it is a layers × experts
grid, numbered cells when they fit the panel, small blocks otherwise. With more experts
(DeepSeek-V2-Lite's 64, Qwen3-MoE's 128) a grid cannot fit an 80-column terminal, so each
layer's row lists its most-used experts, busiest first, as "expert×tokens" cells colored by
count: as many as the panel's width holds (at least the busiest one)."""

from __future__ import annotations

from collections.abc import Callable

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
GRID_UP_TO = 32  # with more experts than this, each layer lists its most-used experts
DEFAULT_WIDTH = 1000  # no width given: as wide as the content


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


def _label_width(layers: int, layer_label: str) -> int:
    return max(len(f"{layer_label}{layers - 1}"), 3) + 1


def uses_grid(counts: np.ndarray, width: int = DEFAULT_WIDTH, layer_label: str = "L") -> bool:
    """Whether ``counts`` are drawn as a grid in ``width`` columns (else: top experts per layer)."""
    layers, experts = counts.shape
    return experts <= GRID_UP_TO and _label_width(layers, layer_label) + 2 * experts <= width


def top_per_layer(counts: np.ndarray, width: int = DEFAULT_WIDTH, layer_label: str = "L") -> int:
    """How many experts a layer's row of the top-experts view shows in ``width`` columns."""
    layers, experts = counts.shape
    room = width - _label_width(layers, layer_label)
    return max(1, room // _top_cell_width(counts))


def _top_cell_width(counts: np.ndarray) -> int:
    maximum = int(counts.max()) if counts.size else 0
    return len(str(counts.shape[1] - 1)) + 1 + len(_short_count(maximum)) + 1


def render_routing(counts: np.ndarray, width: int = DEFAULT_WIDTH, layer_label: str = "L") -> Text:
    """The grid, or the top experts per layer, whichever fits ``width`` columns."""
    if uses_grid(counts, width, layer_label):
        return render_heatmap(counts, layer_label, width)
    return render_top_experts(counts, top_per_layer(counts, width, layer_label), layer_label)


def render_top_experts(counts: np.ndarray, shown: int, layer_label: str = "L") -> Text:
    """One row per layer: its ``shown`` most-used experts, busiest first (ties: the lower
    number), each as "expert×tokens", the expert's number colored by its count."""
    layers, experts = counts.shape
    maximum = int(counts.max()) if counts.size else 0
    label_width = _label_width(layers, layer_label)
    number_width = len(str(experts - 1))
    count_width = len(_short_count(maximum))
    text = Text(no_wrap=True)
    for layer in range(layers):
        text.append(f"{layer_label}{layer}".ljust(label_width), style="bold")
        row = counts[layer]
        order = np.lexsort((np.arange(experts), -row))[:shown]
        for expert in order:
            count = int(row[expert])
            if count == 0:
                break
            text.append(str(int(expert)).rjust(number_width), style=_cell_style(count, maximum))
            text.append(f"×{_short_count(count)}".ljust(count_width + 1) + " ", style="dim")
        text.rstrip()
        text.append("\n")
    return text


def render_heatmap(counts: np.ndarray, layer_label: str = "L", width: int = DEFAULT_WIDTH) -> Text:
    """The grid as Rich text: one row per layer, one cell per expert, colored by count
    (numbered cells when they fit ``width``, else 2-column blocks)."""
    layers, experts = counts.shape
    maximum = int(counts.max()) if counts.size else 0
    label_width = _label_width(layers, layer_label)
    numbered = experts <= NUMBERED_CELLS_UP_TO and label_width + 4 * experts <= width
    cell_width = 4 if numbered else 2
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
        self.grid = True  # the last counts were drawn as a grid (else: top experts per layer)

    def show_counts(
        self,
        counts: np.ndarray,
        tokens: int,
        summary: str,
        layer_label: str,
        width: int = DEFAULT_WIDTH,
        top_summary: Callable[[int], str] | None = None,
    ) -> None:
        """Draw ``counts`` ([layers, experts]) over ``tokens`` generated tokens in ``width``
        columns; ``top_summary(shown)`` heads the top-experts view."""
        self.counts = counts
        self.tokens = tokens
        self.note = None
        self.remove_class("-note")
        self.grid = uses_grid(counts, width, layer_label)
        text = Text(no_wrap=True)
        text.append(summary + "\n", style="italic")
        if not self.grid and top_summary is not None:
            shown = min(top_per_layer(counts, width, layer_label), counts.shape[1])
            text.append(top_summary(shown) + "\n", style="italic")
        text.append_text(render_routing(counts, width, layer_label))
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
