"""Pilot tests of the reply on its way: a long prompt read with progress and stopped by Esc,
live figures while writing, the experts view after the reply, line breaks, Ctrl+N and Ctrl+C
while a reply is written."""

from __future__ import annotations

import numpy as np
import pytest

from app.tui import reply_session
from app.tui.widgets.experts_heatmap import ExpertsHeatmap
from tests.fake_engine import DEFAULT_REPLY, FakeEngine, split_tokens
from tests.test_tui_helpers import (
    TERMINAL_SIZE,
    make_app,
    screen_text,
    send,
    wait_for,
    wait_paused,
    wait_until_idle,
)

pytestmark = pytest.mark.anyio

# 4,625 tokens for the fake engine (a quarter of the characters, plus 4 per message).
LONG_PROMPT = "word " * (4 * 4621 // 5) + "x" * (4 * 4621 % 5)


def notifications(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def test_a_long_prompt_shows_progress_and_esc_stops_it_between_chunks(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(reply_session, "LONG_PROMPT_SECONDS", 0.0)  # any prompt is "long"
    engine = FakeEngine("never written", prompt_chunk=512, pause_in_prompt=2, context_length=8192)
    assert engine.count_tokens([{"role": "user", "content": LONG_PROMPT}]) == 4625
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, LONG_PROMPT, wait=False)
        await wait_paused(pilot, engine)  # 2 chunks of 512 read, the third not yet
        screen = app.chat_screen
        reply = screen.session.reply
        assert reply.progress == (1024, 4625)
        await wait_for(pilot, lambda: "reading the prompt 1,024/4,625" in screen_text(app))
        text = screen_text(app)
        assert "tok/s" in text.split("reading the prompt 1,024/4,625", 1)[1]
        assert "This prompt is 4,625 tokens: reading it takes about" in text
        await pilot.press("escape")
        await wait_until_idle(pilot, app)
        stored = app.store.messages(screen.conversation.id)
        assert [m.role for m in stored] == ["user"]  # no empty reply saved
        assert "Stopped while reading the prompt (1,024 of 4,625 tokens read)" in screen_text(app)
        assert screen.last_finished_reply.stats.finish_reason == "cancelled"
        assert not screen.is_generating and "ready" in screen_text(app)


async def test_the_status_bar_moves_while_a_reply_is_written(tmp_path):
    engine = FakeEngine("one two three four five", pause_after_tokens=3)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "count", wait=False)
        await wait_paused(pilot, engine)
        await wait_for(pilot, lambda: "writing… 3 tokens" in screen_text(app))
        status = app.chat_screen.status_bar
        assert status.live_tps is not None and status.live_tps > 0
        assert "— tok/s" not in screen_text(app)
        engine.release.set()
        await wait_until_idle(pilot, app)
        assert status.live_tps is None and "42.0 tok/s" in screen_text(app)


async def test_experts_view_opened_after_the_reply_shows_the_whole_reply(tmp_path):
    engine = FakeEngine()
    app = make_app(tmp_path, engine)
    async with app.run_test(size=(140, 40)) as pilot:
        await send(pilot, app, "Explain experts")
        assert engine.observed_tokens == 0  # nobody watched: no live observer cost
        await pilot.press("f4")
        await pilot.pause()
        heatmap = app.chat_screen.query_one(ExpertsHeatmap)
        tokens = len(split_tokens(DEFAULT_REPLY))
        assert heatmap.tokens == tokens
        assert np.array_equal(heatmap.counts, engine.last_routing)
        assert heatmap.counts.sum() == tokens * 2 * engine.info.num_layers
        assert f"{tokens} tokens" in screen_text(app)


async def test_line_breaks_in_a_reply_stay_on_screen(tmp_path):
    poem = "Roses are red,\nViolets are blue,\nSugar is sweet."
    app = make_app(tmp_path, FakeEngine(poem))
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "A poem")
        lines = screen_text(app).splitlines()
        rows = [i for i, line in enumerate(lines) for verse in poem.splitlines() if verse in line]
        assert len(rows) == 3 and rows == sorted(set(rows))  # three rows, one verse each
        assert app.chat_screen.history[-1].content == poem


async def test_ctrl_n_during_a_reply_explains_and_keeps_the_reply_and_the_draft(tmp_path):
    engine = FakeEngine("alpha beta gamma delta", pause_after_tokens=2)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "first", wait=False)
        await wait_paused(pilot, engine)
        screen = app.chat_screen
        conversation = screen.conversation
        screen.prompt_box.focus()
        await pilot.press(*"draft", "ctrl+n")
        await pilot.pause()
        assert screen.is_generating and screen.conversation == conversation
        assert screen.prompt_box.text == "draft"
        assert "A reply is being written: press Esc to stop it first." in notifications(app)
        engine.release.set()
        await wait_until_idle(pilot, app)
        assert screen.history[-1].content == "alpha beta gamma delta"  # not cut short
        await pilot.press("ctrl+n")  # idle: a new chat, the draft still in the box
        await pilot.pause()
        assert screen.conversation is None and screen.prompt_box.text == "draft"


async def test_ctrl_c_stops_a_reply_and_otherwise_says_how_to_quit_in_french(tmp_path):
    engine = FakeEngine("un deux trois quatre cinq", pause_after_tokens=2)
    app = make_app(tmp_path, engine, lang="fr")
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "compte", wait=False)
        await wait_paused(pilot, engine)
        await pilot.press("ctrl+c")
        await wait_until_idle(pilot, app)
        screen = app.chat_screen
        assert screen.history[-1].content == "un deux"
        assert screen.history[-1].stats["finish_reason"] == "cancelled"
        assert app.return_code is None  # still running
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert notifications(app)[-1] == "Ctrl+Q quitte (Ctrl+C arrête une réponse en cours)."
        assert not any("quit the app" in n for n in notifications(app))
