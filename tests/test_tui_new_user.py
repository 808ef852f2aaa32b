"""What a new user tripped on in the chat app (issue 18): a refused long paste, a dead server,
the layout at 80x24 and 60x20, French details in F3/F4, stale figures. Pilot tests."""

from __future__ import annotations

import pytest

from app.store import ConversationStore
from tests.fake_engine import FakeEngine
from tests.test_tui_helpers import TERMINAL_SIZE, make_app, screen_text, send

pytestmark = pytest.mark.anyio


async def test_a_refused_paste_never_pushes_out_turns_that_fit(tmp_path):
    engine = FakeEngine("Noted.")  # a 4,096-token context; 4 characters a token
    app = make_app(tmp_path, engine)
    pasted = "lorem ipsum " * 2000  # 24,000 characters: about 6,000 tokens
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        screen = app.chat_screen
        await send(pilot, app, "My name is Alice. Remember it.")
        calls = len(engine.calls)
        await send(pilot, app, pasted)
        assert len(engine.calls) == calls  # refused: the model never saw it
        assert "too long for the model's context" in screen_text(app)
        assert "It was not sent" in screen_text(app)
        assert screen.prompt_box.prompt_text == pasted  # back in the box, to shorten
        assert [v.role for v in screen.chat_log.message_views] == ["user", "assistant"]

        screen.prompt_box.clear_prompt()
        await send(pilot, app, "What is my name?")
        sent = [m["content"] for m in engine.calls[-1][0]]
        assert sent == ["My name is Alice. Remember it.", "Noted.", "What is my name?"]
        assert "left out" not in screen_text(app)
        conversation_id = screen.conversation.id

    # After a restart: no dangling refused message.
    app.store.close()
    store = ConversationStore(tmp_path / "mixchat.db")
    contents = [m.content for m in store.messages(conversation_id)]
    assert pasted not in contents and len(contents) == 4
    store.close()


async def test_a_refused_first_message_leaves_no_empty_chat(tmp_path):
    engine = FakeEngine("Noted.", context_length=256)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "z" * 2000)
        assert app.chat_screen.prompt_box.text == "z" * 2000
        assert app.store.list_conversations() == [] and app.chat_screen.conversation is None
        assert "too long for the model's context" in screen_text(app)
