"""SVG snapshots of the main views at a fixed size, with the scripted engine (deterministic).

Regenerate after an intended visual change:
    .venv/bin/python -m pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

from textual.pilot import Pilot
from textual.widgets import Input, TextArea

from tests.fake_engine import FakeEngine
from tests.test_tui_helpers import TERMINAL_SIZE, make_app, send, wait_for


async def steady_cursors(pilot: Pilot) -> None:
    """Cursors that do not blink, so a screenshot does not depend on when it is taken."""
    await pilot.pause()
    for widget in pilot.app.screen.query("TextArea, Input"):
        assert isinstance(widget, (TextArea, Input))
        widget.cursor_blink = False
    await pilot.pause()


CJK_REPLY = (
    "## 東京\n\n"
    "Tokyo (東京) est la capitale du Japon. Voilà quelques mots :\n\n"
    "| mot | sens |\n|---|---|\n| 日本 | Japon |\n| 한국 | Corée |\n\n"
    "Bon voyage ! 🗾"
)


def test_snapshot_chat_with_a_markdown_reply(snap_compare, tmp_path):
    app = make_app(tmp_path, FakeEngine())

    async def run_before(pilot: Pilot) -> None:
        await send(pilot, app, "Show me a Python greeting function, please.")
        await steady_cursors(pilot)

    assert snap_compare(app, terminal_size=TERMINAL_SIZE, run_before=run_before)


def test_snapshot_french_interface_cjk_chat_and_experts_panel(snap_compare, tmp_path):
    app = make_app(tmp_path, FakeEngine(CJK_REPLY), lang="fr")

    async def run_before(pilot: Pilot) -> None:
        await pilot.press("ctrl+b", "f4")  # hide the chats, show the experts
        await send(pilot, app, "Quelle est la capitale du 日本 ? 🇯🇵")
        await steady_cursors(pilot)

    assert snap_compare(app, terminal_size=TERMINAL_SIZE, run_before=run_before)


def test_snapshot_settings_dialog(snap_compare, tmp_path):
    app = make_app(tmp_path, FakeEngine())

    async def run_before(pilot: Pilot) -> None:
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.screen is not app.chat_screen)
        await steady_cursors(pilot)

    assert snap_compare(app, terminal_size=TERMINAL_SIZE, run_before=run_before)


def test_snapshot_help_screen(snap_compare, tmp_path):
    app = make_app(tmp_path, FakeEngine.dense())

    async def run_before(pilot: Pilot) -> None:
        await pilot.press("f1")
        await wait_for(pilot, lambda: app.screen is not app.chat_screen)

    assert snap_compare(app, terminal_size=TERMINAL_SIZE, run_before=run_before)


POEM = "Roses are red,\nViolets are blue,\nlocal models\nrun here for you."


def test_snapshot_french_chat_at_80x24_with_line_breaks(snap_compare, tmp_path):
    app = make_app(tmp_path, FakeEngine(POEM, context_length=8192), lang="fr")

    async def run_before(pilot: Pilot) -> None:
        await send(pilot, app, "Un petit poème, s’il te plaît.")
        await steady_cursors(pilot)

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_snapshot_chat_at_40x12(snap_compare, tmp_path):
    app = make_app(tmp_path, FakeEngine(POEM), lang="en")

    async def run_before(pilot: Pilot) -> None:
        await send(pilot, app, "A poem, please.")
        await steady_cursors(pilot)

    assert snap_compare(app, terminal_size=(40, 12), run_before=run_before)


def test_snapshot_settings_dialog_at_40x12(snap_compare, tmp_path):
    app = make_app(tmp_path, FakeEngine(), lang="fr")

    async def run_before(pilot: Pilot) -> None:
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.screen is not app.chat_screen)
        await steady_cursors(pilot)

    assert snap_compare(app, terminal_size=(40, 12), run_before=run_before)


def test_snapshot_dense_model_experts_note_at_80x24(snap_compare, tmp_path):
    app = make_app(tmp_path, FakeEngine.dense(reply="Bonjour."), lang="en")

    async def run_before(pilot: Pilot) -> None:
        await send(pilot, app, "Hi")
        await pilot.press("f4")
        await steady_cursors(pilot)

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)
