"""One line under the prompt: model, context used, decode speed, memory, and what is going on."""

from __future__ import annotations

from dataclasses import replace

from rich.cells import cell_len
from rich.text import Text
from textual.widgets import Static

from app.i18n import Strings
from app.tui.engine import ReplyStats


class StatusBar(Static):
    """Shows the state it is told about; it reads nothing by itself. Numbers are written in
    the interface language ("8,192" / "8 192")."""

    def __init__(self, strings: Strings, *, id: str | None = None) -> None:
        super().__init__("", id=id, markup=False)
        self._strings = strings
        self.model_name = ""
        self.state = strings("status.loading")
        self.context_length: int | None = None
        self.stats: ReplyStats | None = None
        self.live_tps: float | None = None  # decode speed of the reply being written

    def on_mount(self) -> None:
        self._refresh_text()

    def set_model(self, name: str, context_length: int | None) -> None:
        self.model_name = name
        self.context_length = context_length
        self._refresh_text()

    def set_state(self, state: str) -> None:
        self.state = state
        self._refresh_text()

    def set_stats(self, stats: ReplyStats | None) -> None:
        """Figures of the last finished turn; None: unknown (shown as —)."""
        self.stats = stats
        self.live_tps = None
        self._refresh_text()

    def set_saved_stats(self, stats: ReplyStats | None) -> None:
        """Figures of a reply saved by an earlier run (a chat reopened): its context use and
        speed, not its memory nor its expert cache rate, which were that run's (under another
        --memory-budget, perhaps) and would sit next to this run's budget as if they were its."""
        if stats is not None:
            stats = replace(stats, peak_memory_gb=0.0, expert_hit_rate=None)
        self.set_stats(stats)

    def set_live(self, tokens_per_second: float | None) -> None:
        """The decode speed of the reply being written, until ``set_stats``."""
        self.live_tps = tokens_per_second
        self._refresh_text()

    def on_resize(self) -> None:
        self._refresh_text()

    def _parts(self) -> list[tuple[str, str, int]]:
        """(text, style, rank) in the order shown; the highest ranks are left out first when
        the line is too narrow: the state and the model's name stay longest."""
        t = self._strings
        stats = self.stats
        used = stats.context_tokens if stats is not None else None
        context = t(
            "status.context",
            used="—" if used is None else t.number(used),
            total=t.number(self.context_length) if self.context_length else "—",
        )
        tps = self.live_tps if self.live_tps is not None else (stats and stats.generation_tps)
        speed = t("status.speed", tps=t.number(tps, 1)) if tps else t("status.speed_unknown")
        if stats is not None and stats.peak_memory_gb:
            memory = t("status.memory", memory=t.bytes(stats.peak_memory_gb * 1e9))
        else:
            memory = t("status.memory_unknown")
        parts = [(self.state, "italic", 0), (context, "", 2), (speed, "", 3), (memory, "", 4)]
        if stats is not None and stats.expert_hit_rate is not None:
            rate = t.number(stats.expert_hit_rate * 100) + ("\u202f%" if t.language == "fr" else "%")
            parts.append((t("status.expert_cache", rate=rate), "", 5))
        parts.append((self.model_name or t("status.no_model"), "bold", 1))
        return parts

    def _refresh_text(self) -> None:
        parts = self._parts()
        width = self.content_size.width
        separator = " │ "
        while width and len(parts) > 2:
            cells = sum(cell_len(text) for text, _, _ in parts) + cell_len(separator) * (
                len(parts) - 1
            )
            if cells <= width:
                break
            parts.remove(max(parts, key=lambda part: part[2]))
        # Whatever still does not fit is cut at the end, with an ellipsis.
        text = Text(no_wrap=True, overflow="ellipsis")
        for index, (words, style, _) in enumerate(parts):
            if index:
                text.append(separator, style="dim")
            text.append(words, style=style)
        self.update(text)
