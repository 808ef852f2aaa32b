"""One line under the prompt: model, context used, decode speed, memory, and what is going on."""

from __future__ import annotations

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

    def set_live(self, tokens_per_second: float | None) -> None:
        """The decode speed of the reply being written, until ``set_stats``."""
        self.live_tps = tokens_per_second
        self._refresh_text()

    def _refresh_text(self) -> None:
        t = self._strings
        stats = self.stats
        # What is going on first: on a narrow screen the end of the line is what gets cut.
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(self.state, style="italic")
        text.append(" │ ", style="dim")
        used = stats.context_tokens if stats is not None else None
        text.append(
            t(
                "status.context",
                used="—" if used is None else t.number(used),
                total=t.number(self.context_length) if self.context_length else "—",
            )
        )
        text.append(" │ ", style="dim")
        tps = self.live_tps if self.live_tps is not None else (stats and stats.generation_tps)
        if tps:
            text.append(t("status.speed", tps=t.number(tps, 1)))
        else:
            text.append(t("status.speed_unknown"))
        text.append(" │ ", style="dim")
        if stats is not None and stats.peak_memory_gb:
            text.append(t("status.memory", memory=t.bytes(stats.peak_memory_gb * 1e9)))
        else:
            text.append(t("status.memory_unknown"))
        if stats is not None and stats.expert_hit_rate is not None:
            text.append(" │ ", style="dim")
            rate = t.number(stats.expert_hit_rate * 100) + ("\u202f%" if t.language == "fr" else "%")
            text.append(t("status.expert_cache", rate=rate))
        text.append(" │ ", style="dim")
        text.append(self.model_name or t("status.no_model"), style="bold")
        self.update(text)
