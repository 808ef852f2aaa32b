"""Pilot tests of saved chats (sidebar, restart, rename, delete, export), per-chat settings,
dialogs, the command palette and the model's loading."""

from __future__ import annotations

import asyncio
import threading

import pytest
from textual.widgets import DataTable, Input, Switch

from app.store import ConversationStore
from app.tui.actions import CHAT_ACTIONS
from app.tui.app import MixchatApp
from app.tui.prompting import SAFE_MODE_PROMPT
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.help import HelpScreen
from app.tui.screens.model_info import ModelInfoScreen
from app.tui.screens.settings import SettingsScreen
from app.tui.screens.text_prompt import TextPromptScreen
from app.tui.widgets.conversation_list import ConversationList
from model.errors import MixchatError
from tests.fake_engine import FakeEngine
from tests.test_tui_helpers import (
    TERMINAL_SIZE,
    make_app,
    screen_text,
    send,
    wait_for,
    wait_until_idle,
)

pytestmark = pytest.mark.anyio


async def test_new_chat_clears_the_view_and_keeps_the_old_chat_in_the_sidebar(tmp_path):
    engine = FakeEngine(["first reply", "second reply"])
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "Tell me about Lyon")
        first_id = app.chat_screen.conversation.id
        await pilot.press("ctrl+n")
        await pilot.pause()
        screen = app.chat_screen
        assert screen.conversation is None and screen.history == []
        assert screen.chat_log.message_views == []
        await send(pilot, app, "And Marseille?")
        # A new chat sends only its own messages.
        assert engine.calls[1][0] == [{"role": "user", "content": "And Marseille?"}]
        titles = [c.title for c in app.store.list_conversations()]
        assert titles == ["And Marseille?", "Tell me about Lyon"]
        # Choosing the first chat in the sidebar shows its messages again.
        sidebar = screen.query_one(ConversationList)
        sidebar.post_message(ConversationList.Chosen(first_id))
        await wait_for(pilot, lambda: screen.conversation and screen.conversation.id == first_id)
        await pilot.pause()
        assert [v.content for v in screen.chat_log.message_views] == [
            "Tell me about Lyon",
            "first reply",
        ]


async def test_chats_survive_a_restart(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXCHAT_HOME", str(tmp_path / "home"))
    store = ConversationStore.open_default()
    app = MixchatApp(store=store, engine=FakeEngine("Paris."), lang="en")
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "Capital of France?")
    # As if the app had been killed while writing a second reply:
    conversation_id = store.list_conversations()[0].id
    store.add_message(conversation_id, "user", "And of Italy?")
    store.add_message(conversation_id, "assistant", "Rome, the", complete=False)
    store.close()
    assert (tmp_path / "home" / "mixchat.db").exists()

    store = ConversationStore.open_default()
    app = MixchatApp(store=store, engine=FakeEngine(), lang="en")
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await pilot.pause()
        # The chat used last is open again, and selected in the sidebar.
        assert app.chat_screen.conversation.id == conversation_id
        sidebar = app.chat_screen.query_one(ConversationList)
        assert sidebar.highlighted == 0 and sidebar.option_count == 1
        assert [v.content for v in app.chat_screen.chat_log.message_views] == [
            "Capital of France?",
            "Paris.",
            "And of Italy?",
            "Rome, the",
        ]
        text = screen_text(app)
        assert "42.0 tok/s" in text  # the first reply's saved stats
        assert "interrupted (the app closed while writing)" in text
    store.close()


async def test_rename_export_and_delete_a_chat(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app(tmp_path, FakeEngine("Un **croissant**, s’il vous plaît."))
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "Breakfast in Paris")
        conversation_id = app.chat_screen.conversation.id

        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, TextPromptScreen))
        app.screen.query_one(Input).value = "Petit-déjeuner 🥐"
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, TextPromptScreen))
        assert app.store.get_conversation(conversation_id).title == "Petit-déjeuner 🥐"
        assert "Petit-déjeuner 🥐" in screen_text(app)

        # F9 asks where; it proposes the documents folder (home here), then the last one used.
        monkeypatch.setattr("platformdirs.user_documents_dir", lambda: str(tmp_path / "none"))
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        (tmp_path / "home").mkdir()
        await pilot.press("f9")
        await wait_for(pilot, lambda: isinstance(app.screen, TextPromptScreen))
        field = app.screen.query_one(Input)
        assert field.value == str(tmp_path / "home" / f"mixchat-{conversation_id}-petit-déjeuner.md")
        (tmp_path / "out").mkdir()
        field.value = str(tmp_path / "out")
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, TextPromptScreen))
        exported = list((tmp_path / "out").glob("mixchat-*.md"))
        assert len(exported) == 1 and not list(tmp_path.glob("mixchat-*.md"))
        markdown = exported[0].read_text(encoding="utf-8")
        assert markdown.startswith("# Petit-déjeuner 🥐")
        assert "## You\n\nBreakfast in Paris" in markdown
        assert "## Assistant\n\nUn **croissant**, s’il vous plaît." in markdown
        assert any(str(exported[0]) in str(n.message) for n in app._notifications)
        await pilot.press("f9")
        await wait_for(pilot, lambda: isinstance(app.screen, TextPromptScreen))
        assert app.screen.query_one(Input).value == str(tmp_path / "out" / exported[0].name)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, TextPromptScreen))

        await pilot.press("f8")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.click("#ok")
        await wait_for(pilot, lambda: app.chat_screen.conversation is None)
        assert app.store.list_conversations() == []
        assert app.store.messages(conversation_id) == []


async def test_settings_are_stored_per_chat_and_shape_the_prompt(tmp_path):
    engine = FakeEngine(["r1", "r2", "r3"])
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "hello")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        dialog = app.screen
        dialog.query_one("#temperature", Input).value = "9"  # out of range: refused
        await pilot.press("ctrl+s")
        assert app.screen is dialog
        assert "Invalid value: Temperature" in screen_text(app)
        dialog.query_one("#system-prompt").load_text("You are a pirate.")
        dialog.query_one("#temperature", Input).value = "0.2"
        dialog.query_one("#top-p", Input).value = "0.9"
        dialog.query_one("#max-tokens", Input).value = "64"
        dialog.query_one("#reply-language").value = "fr"
        dialog.query_one("#safe-mode", Switch).value = True
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen))

        settings = app.store.get_conversation(app.chat_screen.conversation.id).settings
        assert (settings.temperature, settings.top_p, settings.max_tokens) == (0.2, 0.9, 64)
        assert settings.safe_mode and settings.reply_language == "fr"

        await send(pilot, app, "again")
        messages, generation = engine.calls[-1]
        assert messages[0]["role"] == "system"
        system = messages[0]["content"]
        assert system.startswith(SAFE_MODE_PROMPT)
        assert "You are a pirate." in system and "French" in system
        assert (generation.temperature, generation.top_p, generation.max_tokens) == (0.2, 0.9, 64)

        # A new chat starts from the defaults again: no system prompt.
        await pilot.press("ctrl+n")
        await send(pilot, app, "fresh")
        assert engine.calls[-1][0] == [{"role": "user", "content": "fresh"}]


async def test_help_screen_and_command_palette_list_every_action(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        table = app.screen.query_one(DataTable)
        keys = {str(table.get_row_at(i)[0]) for i in range(table.row_count)}
        for action in CHAT_ACTIONS:
            assert action.key_display in keys
        assert {"Enter", "Ctrl+P", "Ctrl+Q"} <= keys
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen))

        titles = [command.title for command in app.get_system_commands(app.chat_screen)]
        for action in CHAT_ACTIONS:
            assert any(title.startswith(app.strings(action.label_key)) for title in titles)
        # A palette command runs its action.
        command = next(c for c in app.get_system_commands(app.chat_screen) if "F4" in c.title)
        await command.callback()
        await pilot.pause()
        assert app.chat_screen.experts_panel_visible


async def test_model_screen_shows_the_engine_info(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelInfoScreen))
        text = screen_text(app)
        for expected in ("fake-mixtral-8x7b", "mixtral", "46.70 B", "12.90 B", "4-bit (group 64)"):
            assert expected in text
        assert "Experts per layer" in text and "Experts per token" in text
        assert "Active parameters per token" in text


def test_lang_argument_overrides_the_locale(tmp_path, monkeypatch):
    monkeypatch.setenv("LC_ALL", "fr_FR.UTF-8")
    store = ConversationStore(tmp_path / "m.db")
    assert MixchatApp(store=store, lang="en").strings.language == "en"
    assert MixchatApp(store=store).strings.language == "fr"
    store.close()


async def test_a_message_sent_during_the_load_waits_and_goes_when_the_model_is_ready(tmp_path):
    gate = threading.Event()
    app = MixchatApp(
        store=ConversationStore(tmp_path / "m.db"),
        engine_loader=FakeEngine.loader(gate, reply="ready!"),
        lang="en",
    )
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await pilot.pause()
        screen = app.chat_screen
        assert screen.query("LoadingIndicator.model-loading")
        text = screen_text(app)
        assert "loading the model" in text and "Loading the model, one moment" in text
        await pilot.press("h", "i", "enter")  # typed during the load, Enter at once
        await pilot.pause()
        assert screen.prompt_box.text == ""
        assert [v.content for v in screen.chat_log.message_views] == ["hi", ""]
        assert [(m.role, m.content) for m in app.store.messages(screen.conversation.id)] == [
            ("user", "hi")
        ]  # saved already: a crash during the load loses nothing
        text = screen_text(app)
        assert "waiting for the model to load: sent as soon as it is ready" in text
        assert "waiting for the model…" in text  # the status bar
        await pilot.press(*"more", "enter")  # a second one is refused, its text kept
        await pilot.pause()
        assert screen.prompt_box.text == "more"
        gate.set()
        await wait_for(pilot, lambda: screen.engine is not None, what="the model")
        await wait_until_idle(pilot, app)
        assert not screen.query(".model-loading")
        assert [m.content for m in screen.history] == ["hi", "ready!"]
        assert screen.engine.calls[0][0] == [{"role": "user", "content": "hi"}]
        assert [v.content for v in screen.chat_log.message_views] == ["hi", "ready!"]


async def test_escape_takes_back_a_message_waiting_for_the_model(tmp_path):
    gate = threading.Event()
    app = MixchatApp(
        store=ConversationStore(tmp_path / "m.db"),
        engine_loader=FakeEngine.loader(gate, reply="late"),
        lang="en",
    )
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await pilot.pause()
        screen = app.chat_screen
        await pilot.press(*"oops", "enter")
        await pilot.pause()
        assert screen.is_generating
        await pilot.press("escape")
        await pilot.pause()
        assert not screen.is_generating
        assert screen.prompt_box.text == "oops"  # back in the box, nothing lost
        assert screen.chat_log.message_views == [] and screen.conversation is None
        assert app.store.list_conversations() == []
        gate.set()
        await wait_for(pilot, lambda: screen.engine is not None, what="the model")
        await pilot.pause()
        assert screen.engine.calls == []  # nothing was sent


async def test_escape_while_the_loaded_model_is_handed_over_stops_the_reply_it_started(tmp_path):
    """Esc lands while the screen handles the loaded model (its notices are awaited): the
    message already went to the model, so Esc stops that reply; it is not taken back under a
    status bar that would then say "loading" forever (seen on a busy CI machine)."""
    gate = threading.Event()
    app = MixchatApp(
        store=ConversationStore(tmp_path / "m.db"),
        engine_loader=FakeEngine.loader(gate),
        lang="en",
    )
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await pilot.pause()
        screen = app.chat_screen
        await pilot.press(*"hi", "enter")
        await pilot.pause()
        assert screen.reply_flow.waiting is not None
        engine = FakeEngine(reply="x " * 400, token_delay=0.01)
        await asyncio.gather(screen.engine_ready(engine), screen.action_cancel())
        await wait_until_idle(pilot, app)
        assert screen.prompt_box.text == ""  # not taken back: it stays sent
        assert [m.content for m in screen.history][:1] == ["hi"]
        assert not screen.is_generating
        assert screen.status_bar.state == app.strings("status.ready")
        gate.set()


async def test_a_model_that_fails_to_load_ends_the_app_with_code_1(tmp_path):
    def failing_loader():
        raise MixchatError("no model at /nowhere")

    app = MixchatApp(
        store=ConversationStore(tmp_path / "m.db"), engine_loader=failing_loader, lang="en"
    )
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await wait_for(pilot, lambda: app._exit, what="the app to exit")
    assert app.return_code == 1
    assert app.load_error == "no model at /nowhere"
