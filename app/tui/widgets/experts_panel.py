"""The side panel of the experts view: a title, the routing heatmap (or a note), a legend."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Label

from app.i18n import Strings
from app.tui.streaming import RoutingAccumulator
from app.tui.widgets.experts_heatmap import ExpertsHeatmap


class ExpertsPanel(VerticalScroll):
    """Hidden until toggled. Draws what a ``RoutingAccumulator`` holds when told to refresh."""

    def __init__(self, strings: Strings, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._strings = strings
        self._drawn_version = -1

    def compose(self) -> ComposeResult:
        yield Label(self._strings("experts.title"), classes="panel-title")
        yield ExpertsHeatmap(id="experts")
        yield Label(self._strings("experts.legend"), classes="panel-hint", id="experts-legend")

    @property
    def shown(self) -> bool:
        return self.has_class("-visible")

    def toggle(self) -> bool:
        """Show or hide the panel; returns whether it is now shown."""
        self.toggle_class("-visible")
        return self.shown

    def refresh_from(
        self,
        routing: RoutingAccumulator,
        model_has_experts: bool | None,
        loaded: bool,
        *,
        force: bool = False,
        remote: bool = False,
    ) -> bool:
        """Redraw if shown and something changed (``force``: even if the counts did not).
        ``model_has_experts``: False for a dense model, None when the model does not say;
        ``remote``: the model runs in a `mixchat serve`, which does not send its routing.
        Returns True when it drew."""
        if not self.shown:
            return False
        heatmap = self.query_one(ExpertsHeatmap)
        t = self._strings
        if not loaded:
            return heatmap.show_note(t("experts.no_model"))
        if model_has_experts is False:
            return heatmap.show_note(t("experts.dense"))
        if remote:  # `mixchat serve` does not send the routing
            return heatmap.show_note(t("experts.server"))
        version = routing.version
        if version == self._drawn_version and not force:
            return False
        self._drawn_version = version
        counts, tokens = routing.snapshot()
        if counts is None:
            return heatmap.show_note(t("experts.waiting"))
        experts = counts.shape[1]
        heatmap.show_counts(
            counts,
            tokens,
            t("experts.total_one" if tokens == 1 else "experts.total", tokens=t.number(tokens)),
            t("experts.layer_short"),
            self.content_width(),
            lambda shown: t("experts.top", shown=shown, experts=t.number(experts)),
        )
        legend = "experts.legend" if heatmap.grid else "experts.top_legend"
        self.query_one("#experts-legend", Label).update(t(legend))
        return True

    def content_width(self) -> int:
        """The columns the panel can give its content: its widest (the stylesheet's max-width
        of the screen) less its border, padding and a vertical scrollbar."""
        screen = self.screen.size
        try:
            widest = int(self.styles.max_width.resolve(screen, screen))
        except (AttributeError, TypeError, ValueError):  # no max-width: the screen's
            widest = screen.width
        return max(widest - 4 - self.styles.scrollbar_size_vertical, 12)
