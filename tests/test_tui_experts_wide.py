"""The experts panel (F4) with many experts: Mixtral's 8, DeepSeek-V2-Lite's 64, Qwen3-MoE's
128 (48 layers, top-8). The counts arrive as the engine sends them: one [layers, experts] array
per generated token, each layer routing the token to its top-k experts."""

from __future__ import annotations

import re

import numpy as np
import pytest
from rich.cells import cell_len

from app.tui.widgets.experts_heatmap import ExpertsHeatmap
from app.tui.widgets.experts_panel import ExpertsPanel
from tests.fake_engine import FakeEngine
from tests.test_tui_helpers import make_app, screen_text, send

pytestmark = pytest.mark.anyio


class TopKEngine(FakeEngine):
    """Routes each token to ``top_k`` experts per layer, drawn from a skewed distribution
    (a few experts much busier than the rest, different ones in each layer)."""

    def __init__(self, layers: int, experts: int, top_k: int, **kw) -> None:
        super().__init__(
            " ".join(["word"] * 24), num_layers=layers, num_experts=experts, token_delay=0, **kw
        )
        self.info.experts_per_token = top_k
        self.top_k = top_k
        self.fed = np.zeros((layers, experts), dtype=np.int64)  # what the panel was sent
        rng = np.random.default_rng(experts)
        self._weights = rng.dirichlet(np.full(experts, 0.3), size=layers)
        self._rng = rng

    def _routing_counts(self, step: int) -> np.ndarray:
        layers, experts = self.info.num_layers, self.info.num_experts
        counts = np.zeros((layers, experts), dtype=np.int32)
        for layer in range(layers):
            chosen = self._rng.choice(experts, self.top_k, replace=False, p=self._weights[layer])
            counts[layer, chosen] = 1
        self.fed += counts
        return counts


def busiest(row: np.ndarray) -> int:
    """The most-used expert (ties: the lower number, as the panel orders them)."""
    return int(np.flatnonzero(row == row.max())[0])


async def show_routing(tmp_path, engine: TopKEngine, size: tuple[int, int]):
    app = make_app(tmp_path, engine)
    ctx = app.run_test(size=size)
    pilot = await ctx.__aenter__()
    await pilot.press("f4")
    await send(pilot, app, "go")
    await pilot.pause()
    return app, pilot, ctx


@pytest.mark.parametrize(
    ("layers", "experts", "top_k", "size"),
    [
        (32, 8, 2, (80, 24)),
        (26, 64, 6, (80, 24)),  # DeepSeek-V2-Lite: 64 routed experts, top-6
        (48, 128, 8, (80, 24)),  # Qwen3-30B-A3B
        (48, 128, 8, (160, 40)),
    ],
)
async def test_panel_fits_and_names_each_layers_busiest_expert(
    tmp_path, layers, experts, top_k, size
):
    engine = TopKEngine(layers, experts, top_k)
    app, pilot, ctx = await show_routing(tmp_path, engine, size)
    try:
        panel = app.chat_screen.query_one(ExpertsPanel)
        heatmap = panel.query_one(ExpertsHeatmap)
        assert heatmap.tokens == 24 and (heatmap.counts == engine.fed).all()
        # Every row of what is drawn fits the panel: nothing is cut at the right edge.
        room = panel.scrollable_content_region.width
        lines = str(heatmap.render()).splitlines()
        assert max(cell_len(line) for line in lines) <= room
        rows = {m.group(1): m.group(2) for line in lines if (m := re.match(r"L(\d+)\s+(.*)", line))}
        assert len(rows) == layers
        if experts == 8:  # Mixtral: the grid, a numbered cell per expert
            assert heatmap.grid
            for layer in range(layers):
                cells = [0 if c == "·" else int(c) for c in rows[str(layer)].split()]
                assert cells == engine.fed[layer].tolist()
        else:  # one row per layer, its busiest expert first, with its count
            assert not heatmap.grid
            text = screen_text(app)
            assert f"of {experts} experts per layer" in text
            legend = app.chat_screen.query_one("#experts-legend")
            assert str(legend.render()) == "expert×tokens, busiest first"  # below the rows
            for layer in range(layers):
                first = rows[str(layer)].split()[0]
                number, count = first.split("×")
                row = engine.fed[layer]
                assert (int(number), int(count)) == (busiest(row), int(row.max()))
            # The first layers are on screen as drawn, busiest expert first.
            top = rows["0"].split()[0]
            assert re.search(rf"L0\s+{re.escape(top)}", text)
        if size[0] > 100 and experts > 8:  # a wider terminal shows more experts per layer
            assert len(rows["0"].split()) >= 8
    finally:
        await ctx.__aexit__(None, None, None)


async def test_panel_redraws_for_the_new_width_when_the_terminal_grows(tmp_path):
    engine = TopKEngine(48, 128, 8)
    app, pilot, ctx = await show_routing(tmp_path, engine, (80, 24))
    try:
        heatmap = app.chat_screen.query_one(ExpertsHeatmap)
        narrow = len(str(heatmap.render()).splitlines()[2].split())
        await pilot.resize_terminal(160, 40)
        await pilot.pause()
        await pilot.pause()
        wide = len(str(heatmap.render()).splitlines()[2].split())
        assert wide > narrow
    finally:
        await ctx.__aexit__(None, None, None)
