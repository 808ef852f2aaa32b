"""French all the way (numbers, the command palette, decimal commas, key names), an honest
clipboard, a language the interface lacks, and layouts at 80x24 and 40x12."""

from __future__ import annotations

import shutil
import stat

import pytest
from textual.binding import Binding
from textual.command import CommandPalette
from textual.widgets import Button, Input

from app.tui.clipboard import copy_text
from app.tui.screens.settings import SettingsScreen, parse_decimal
from tests.fake_engine import FakeEngine
from tests.test_tui_helpers import make_app, screen_text, send, wait_for

pytestmark = pytest.mark.anyio

NNBSP = "\u202f"  # French thousands separator
CAT = shutil.which("cat")  # the fake tools run with a PATH that holds only them


def notifications(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def test_numbers_on_screen_follow_the_interface_language(tmp_path):
    engine = FakeEngine("D’accord, merci.", context_length=8192)
    engine.expert_hit_rate = 0.5
    app = make_app(tmp_path, engine, lang="fr")
    async with app.run_test(size=(120, 30)) as pilot:
        await send(pilot, app, "Bonjour")
        text = screen_text(app)
        assert f"ctx 7/8{NNBSP}192" in text
        assert "42,0 jetons/s" in text and "1,25 Go" in text
        assert "2 jetons · 42,0 jetons/s" in text  # the reply's info line
        assert f"experts 50{NNBSP}% en cache" in text
        assert "8,192" not in text and "42.0" not in text and "1.25" not in text


async def test_the_command_palette_is_french_including_textuals_own_commands(tmp_path):
    app = make_app(tmp_path, FakeEngine(), lang="fr")
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette))
        palette = app.screen
        assert palette.query_one(Input).placeholder == "Chercher une commande…"
        await pilot.pause()
        names = [c.title for c in app.get_system_commands(app.chat_screen)]
        for french in ("Thème", "Quitter", "Touches", "Capture d’écran", "Arrêter (Échap)"):
            assert any(name.startswith(french) for name in names), french
        for english in ("Theme", "Quit", "Keys", "Maximize", "Screenshot"):
            assert english not in names
        await pilot.press(*"quit")
        await wait_for(pilot, lambda: "Quitter" in screen_text(app))
        assert "Quit the application" not in screen_text(app)


async def test_footer_and_help_say_echap_and_the_temperature_takes_a_comma(tmp_path):
    app = make_app(tmp_path, FakeEngine(), lang="fr")
    async with app.run_test(size=(100, 32)) as pilot:
        await send(pilot, app, "Salut")
        assert app.get_key_display(Binding("escape", "cancel")) == "Échap"
        assert app.get_key_display(Binding("f4", "toggle_experts")) == "F4"
        await pilot.press("f1")
        await wait_for(pilot, lambda: app.screen is not app.chat_screen)
        help_text = screen_text(app)
        assert "Échap" in help_text and "Esc" not in help_text
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is app.chat_screen)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        field = app.screen.query_one("#temperature", Input)
        assert field.value == "0,7"
        field.focus()
        await pilot.press("end", "backspace", "backspace", "backspace", "0", ",", "5")  # typed, as a user would
        assert field.value == "0,5"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        assert app.chat_screen.settings.temperature == 0.5
    assert parse_decimal("0.25") == 0.25
    with pytest.raises(ValueError):
        parse_decimal("0,5,1")


async def test_an_interface_language_that_does_not_exist_is_said_once(tmp_path):
    app = make_app(tmp_path, FakeEngine(), lang="de")
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.pause()
        said = [n for n in notifications(app) if "English and French only" in n]
        assert said == [
            "The interface speaks English and French only: “de” is not one of them, "
            "so it is in English."
        ]
        assert app.strings.language == "en"


def _tool(directory, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_copy_text_says_which_tool_copied_and_none_when_none_did(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PATH": str(bin_dir)}
    assert copy_text("x", env) is None  # no tool at all
    _tool(bin_dir, "pbcopy", "exit 1")
    assert copy_text("x", env) is None  # a tool that failed is no proof
    _tool(bin_dir, "xclip", f'[ -n "$DISPLAY" ] || exit 1; {CAT} > {tmp_path / "clip"}')
    assert copy_text("café 日本", env) is None  # X11's tool without a display fails: no claim
    assert copy_text("café 日本", {**env, "DISPLAY": ":0"}) == "xclip"
    assert (tmp_path / "clip").read_text(encoding="utf-8") == "café 日本"


async def test_ctrl_o_without_a_clipboard_tool_does_not_claim_it_copied(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no pbcopy / wl-copy / xclip
    app = make_app(tmp_path, FakeEngine("à copier"), lang="en")
    async with app.run_test(size=(100, 32)) as pilot:
        await send(pilot, app, "Copy me")
        await pilot.press("ctrl+o")
        await pilot.pause()
        [said] = [n for n in notifications(app) if "clipboard" in n]
        assert said.startswith("Reply sent to the terminal (OSC 52): it may not have reached")
    app.store.close()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "wl-copy", f'{CAT} > {tmp_path / "clip"}')
    monkeypatch.setenv("PATH", str(bin_dir))
    app = make_app(tmp_path, FakeEngine("à copier"), lang="en")
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.press("ctrl+o")  # the chat reopened from the store, its last reply
        await pilot.pause()
        assert "Reply copied to the clipboard (wl-copy)." in notifications(app)
    assert (tmp_path / "clip").read_text(encoding="utf-8") == "à copier"


@pytest.mark.parametrize("size", [(80, 24), (40, 12)])
async def test_small_terminals_keep_the_chat_readable_and_dialog_buttons_on_screen(
    tmp_path, size
):
    width, height = size
    app = make_app(tmp_path, FakeEngine.dense(), lang="fr")
    async with app.run_test(size=size) as pilot:
        await send(pilot, app, "Bonjour")
        screen = app.chat_screen
        chat_width = screen.query_one("#main").region.width
        assert chat_width >= (width * 2) // 3  # the sidebar never takes most of the width
        await pilot.press("f4")  # a dense model: a line says so, no panel squeezes the chat
        await pilot.pause()
        assert screen.query_one("#main").region.width == chat_width
        assert screen.prompt_box.region.width >= 12
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        await pilot.pause()
        for button in app.screen.query(Button):
            region = button.region
            assert region.width > 0 and region.height > 0
            assert region.right <= width and region.bottom <= height, button.id
        assert "Enregistrer" in screen_text(app)


async def test_ctrl_b_on_a_narrow_screen_lays_the_chats_over_the_conversation(tmp_path):
    app = make_app(tmp_path, FakeEngine(), lang="en")
    async with app.run_test(size=(40, 12)) as pilot:
        await send(pilot, app, "Hi")
        sidebar = app.chat_screen.query_one("#sidebar")
        assert sidebar.region.width == 0  # folded away: the chat has the width
        await pilot.press("ctrl+b")
        await pilot.pause()
        assert sidebar.region.width == 24 and "Hi" in screen_text(app)


def test_every_french_string_is_french_where_english_was_visible():
    from app.i18n import ENGLISH, FRENCH

    same = [k for k in ENGLISH if FRENCH[k] == ENGLISH[k] and any(c.isalpha() for c in FRENCH[k])]
    # Words that are the same in both languages, nothing else:
    assert set(same) <= {
        "role.assistant", "status.context", "action.toggle_experts", "help.action",
        "model.field.architecture", "model.field.format", "experts.title",
        "settings.top_p", "system.screenshot", "status.memory",
    }, same  # fmt: skip


async def test_a_huge_paste_marker_speaks_french_and_gives_the_text_back(tmp_path):
    from textual import events

    pasted = "é" * 9000
    app = make_app(tmp_path, FakeEngine("Reçu."), lang="fr")
    async with app.run_test(size=(100, 32)) as pilot:
        prompt = app.chat_screen.prompt_box
        prompt.focus()
        app.post_message(events.Paste(pasted))
        await pilot.pause()
        assert prompt.text == f"⟦collage 1 : 9{NNBSP}000 caractères⟧"
        await pilot.press("end", "space", "!")
        assert prompt.prompt_text == pasted + " !"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat_screen.reply is None and app.chat_screen.history)
        assert app.chat_screen.history[0].content == pasted + " !"


async def test_the_model_panel_shows_a_long_path_whole_at_80x24(tmp_path):
    from app.tui.screens.model_info import ModelInfoScreen

    engine = FakeEngine()
    path = "/Users/someone/models/" + "/".join(f"folder-{i:02d}" for i in range(12)) + "/m.gguf"
    engine.info.source = path
    app = make_app(tmp_path, engine, lang="en")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelInfoScreen))
        await pilot.pause()
        rows = screen_text(app).splitlines()
        folded = "".join(row.strip(" │█▌▐") for row in rows if "folder-" in row or "m.gguf" in row)
        assert path in folded.replace(" ", "").replace("Source", "")
        assert any("Close" in row for row in rows)


async def test_the_chat_says_when_experts_stream_from_disk(tmp_path):
    """A model that did not fit loads under a budget: the chat says so, in its language, with
    the budget in the status bar."""
    from types import SimpleNamespace

    from model import weights
    from model.memory_plan import decide
    from tests.test_memory_plan import synthetic_mixtral

    checkpoint = weights.locate(synthetic_mixtral(tmp_path / "mixtral"))
    engine = FakeEngine("Bonjour !")
    engine.model = SimpleNamespace(memory=decide(checkpoint, 4, 12 * 10**9))
    assert engine.model.memory.offload
    app = make_app(tmp_path, engine, lang="fr")
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: "lus sur le disque" in screen_text(app))
        text = screen_text(app)
        assert "12,0 Go" in text and "experts lus sur le disque (12,0 Go)" in text
