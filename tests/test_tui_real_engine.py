"""End to end with the real engine and the embedded default model (a few tokens only): the
app loads it as ``run_chat`` does, a message typed during the load waits and goes, a long prompt
is read with progress and Esc stops it between prompt chunks."""

from __future__ import annotations

import threading

import pytest

from app.store import ChatSettings, ConversationStore
from app.tui import app as app_module
from app.tui.app import MixchatApp
from app.tui.screens.model_info import ModelInfoScreen
from model import generate as generate_module
from tests.test_tui_helpers import TERMINAL_SIZE, screen_text, send, wait_for, wait_until_idle

pytestmark = pytest.mark.anyio


async def test_chat_turn_with_the_embedded_default_model(tmp_path, monkeypatch):
    gate = threading.Event()  # holds the real load until the message is typed
    real_load = app_module._load_engine

    def load_after_the_gate(*args):
        assert gate.wait(timeout=60)
        return real_load(*args)

    monkeypatch.setattr(app_module, "_load_engine", load_after_the_gate)
    app = MixchatApp(store=ConversationStore(tmp_path / "m.db"), lang="en")  # loads the default
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        screen = app.chat_screen
        screen.draft_settings = ChatSettings(temperature=0.0, max_tokens=4)
        await pilot.press(*"Say hello.", "enter")  # during the load, Enter at once
        await pilot.pause()
        assert screen.engine is None and screen.session.waiting is not None
        gate.set()
        await wait_for(pilot, lambda: screen.engine is not None, timeout=120, what="the model")
        assert app.load_error is None
        await wait_until_idle(pilot, app, timeout=120)
        [user, reply] = app.store.messages(screen.conversation.id)
        assert user.content == "Say hello."
        assert reply.role == "assistant" and reply.content.strip() and reply.complete
        assert reply.stats["generation_tokens"] == 4
        assert reply.stats["finish_reason"] == "length"
        text = screen_text(app)
        assert screen.engine.name in text and "tok/s" in text

        await pilot.press("f4")  # the default model is dense: a note, no panel, no observer
        await pilot.pause()
        assert screen.engine.routing_observer is None and screen.engine.last_routing is None
        assert [str(n.message) for n in app._notifications][-1] == "Dense model — no experts."
        assert not screen.experts_panel_visible

        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelInfoScreen))
        await pilot.pause()
        info_text = screen_text(app)
        assert screen.engine.info.architecture in info_text
        assert screen.engine.info.quantization in info_text
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen)

        # A long prompt: read in chunks with progress; Esc stops it before the next chunk.
        monkeypatch.setattr(generate_module.Engine, "_chunk", property(lambda self: 16))
        engine = screen.engine
        read: list[tuple[int, int]] = []
        original = engine.stream

        def stream_and_cancel(messages, settings=None):
            for chunk in original(messages, settings):
                if chunk.progress is not None:
                    read.append(chunk.progress)
                    if len(read) == 2:
                        screen.session.cancel()  # what Esc does
                yield chunk

        monkeypatch.setattr(engine, "stream", stream_and_cancel)
        await send(pilot, app, "Résume : " + "le chat dort sur le canapé. " * 40, wait=False)
        await wait_until_idle(pilot, app, timeout=120)
        assert read[:2] == [(16, read[0][1]), (32, read[0][1])] and len(read) == 2
        assert screen.last_finished_reply.stats.finish_reason == "cancelled"
        assert "Stopped while reading the prompt (32 of" in screen_text(app)
        assert [m.role for m in app.store.messages(screen.conversation.id)][-1] == "user"
