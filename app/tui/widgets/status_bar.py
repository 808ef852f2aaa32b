"""One line under the prompt: model, context used, decode speed, memory, and what is going on."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from app.tui.i18n import Strings


class StatusBar(Static):
    """Shows the state it is told about; it reads nothing by itself."""

    def __init__(self, strings: Strings, *, id: str | None = None) -> None:
        super().__init__("", id=id, markup=False)
        self._strings = strings
        self.model_name = ""
        self.state = strings("status.loading")
        self.context_used: int | None = None
        self.context_length: int | None = None
        self.tokens_per_second: float | None = None
        self.peak_memory_gb: float | None = None
        self.expert_hit_rate: float | None = None  # only when experts stream from disk

    def on_mount(self) -> None:
        self._refresh_text()

    def set_model(self, name: str, context_length: int | None) -> None:
        self.model_name = name
        self.context_length = context_length
        self._refresh_text()

    def set_state(self, state: str) -> None:
        self.state = state
        self._refresh_text()

    def set_stats(
        self,
        *,
        context_used: int | None = None,
        tokens_per_second: float | None = None,
        peak_memory_gb: float | None = None,
        expert_hit_rate: float | None = None,
    ) -> None:
        """Numbers of the last turn; None leaves a number unknown (shown as —)."""
        self.context_used = context_used
        self.tokens_per_second = tokens_per_second
        self.peak_memory_gb = peak_memory_gb
        self.expert_hit_rate = expert_hit_rate
        self._refresh_text()

    def _refresh_text(self) -> None:
        strings = self._strings
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f" {self.model_name or strings('status.no_model')} ", style="bold")
        text.append("│ ", style="dim")
        text.append(self.state, style="italic")
        text.append(" │ ", style="dim")
        used = "—" if self.context_used is None else f"{self.context_used:,}"
        total = "—" if not self.context_length else f"{self.context_length:,}"
        text.append(strings("status.context", used=used, total=total))
        text.append(" │ ", style="dim")
        if self.tokens_per_second:
            text.append(strings("status.speed", tps=self.tokens_per_second))
        else:
            text.append(strings("status.speed_unknown"))
        text.append(" │ ", style="dim")
        if self.peak_memory_gb:
            text.append(strings("status.memory", gb=self.peak_memory_gb))
        else:
            text.append(strings("status.memory_unknown"))
        if self.expert_hit_rate is not None:
            text.append(" │ ", style="dim")
            text.append(strings("status.expert_cache", rate=self.expert_hit_rate))
        self.update(text)
