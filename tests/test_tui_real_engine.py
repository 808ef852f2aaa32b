"""End to end with the real engine and the embedded default model (a few tokens only)."""

from __future__ import annotations

import pytest

from app.store import ChatSettings, ConversationStore
from app.tui.app import MixchatApp
from app.tui.screens.model_info import ModelInfoScreen
from tests.test_tui_helpers import TERMINAL_SIZE, screen_text, send, wait_for, wait_until_idle

IMPORT_ERROR = ""
try:
    from model import Engine
except ImportError as error:  # pragma: no cover - model/ is part of the project
    Engine = None
    IMPORT_ERROR = str(error)

pytestmark = pytest.mark.anyio


@pytest.mark.skipif(Engine is None, reason=f"model.Engine cannot be imported: {IMPORT_ERROR}")
async def test_chat_turn_with_the_embedded_default_model(tmp_path):
    app = MixchatApp(
        store=ConversationStore(tmp_path / "m.db"),
        engine_loader=lambda: Engine.load(None),  # what run_chat does
        lang="en",
    )
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        screen = app.chat_screen
        await wait_for(pilot, lambda: screen.engine is not None, timeout=60, what="the model")
        assert app.load_error is None
        screen.draft_settings = ChatSettings(temperature=0.0, max_tokens=4)
        await send(pilot, app, "Say hello.", wait=False)
        await wait_until_idle(pilot, app, timeout=60)
        [user, reply] = app.store.messages(screen.conversation.id)
        assert user.content == "Say hello."
        assert reply.role == "assistant" and reply.content.strip() and reply.complete
        assert 1 <= reply.stats["generation_tokens"] <= 4
        assert reply.stats["finish_reason"] in ("stop", "length")
        text = screen_text(app)
        assert screen.engine.name in text and "tok/s" in text

        await pilot.press("f4")  # the default model is dense: a note, no observer
        await pilot.pause()
        assert screen.engine.routing_observer is None
        assert "Dense model — no experts." in screen_text(app)

        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelInfoScreen))
        await pilot.pause()
        info_text = screen_text(app)
        assert screen.engine.info.architecture in info_text
        assert screen.engine.info.quantization in info_text
