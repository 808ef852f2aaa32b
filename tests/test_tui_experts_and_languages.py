"""Pilot tests of the experts heatmap, the context limit, and text in many languages."""

from __future__ import annotations

import pytest
from rich.cells import cell_len

from app.tui.widgets.experts_heatmap import ExpertsHeatmap
from tests.fake_engine import FakeEngine
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


async def test_experts_heatmap_fills_in_live_and_costs_nothing_when_hidden(tmp_path):
    engine = FakeEngine("a b c d e f g h i j", pause_after_tokens=4, token_delay=0)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        assert engine.routing_observer is None  # panel hidden: nothing observed
        await pilot.press("f4")
        assert app.chat_screen.experts_panel_visible
        assert engine.routing_observer is not None
        heatmap = app.chat_screen.query_one(ExpertsHeatmap)
        await send(pilot, app, "go", wait=False)
        await wait_paused(pilot, engine)
        await wait_for(pilot, lambda: heatmap.tokens == 4, what="4 tokens in the heatmap")
        # Live, mid-reply: every layer routed each of the 4 tokens to 2 experts.
        assert heatmap.counts.shape == (4, 8)
        assert heatmap.counts.sum(axis=1).tolist() == [8, 8, 8, 8]
        engine.release.set()
        await wait_until_idle(pilot, app)
        assert heatmap.tokens == 10 and heatmap.counts.sum() == 10 * 4 * 2
        text = screen_text(app)
        assert "10 tokens" in text and "E7" in text and "L3" in text

        await pilot.press("f4")  # hidden again: the observer is removed
        assert engine.routing_observer is None
        observed = engine.observed_tokens
        engine.pause_after_tokens = None
        await send(pilot, app, "again")
        assert engine.observed_tokens == observed


async def test_context_overflow_drops_the_oldest_turns_with_a_notice(tmp_path):
    # 200 characters ≈ 54 fake tokens a message; the context holds 300 with 64 for the reply.
    engine = FakeEngine(["x" * 200] * 4, context_length=300)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        settings = app.chat_screen.draft_settings
        app.chat_screen.draft_settings = type(settings)(system_prompt="Be brief.", max_tokens=64)
        for index in range(3):
            await send(pilot, app, f"question {index} " + "y" * 190)
        sent = engine.calls[-1][0]
        assert sent[0] == {"role": "system", "content": "Be brief."}  # kept
        assert sent[-1]["content"].startswith("question 2")
        assert not any(m["content"].startswith("question 0") for m in sent)  # dropped
        assert engine.count_tokens(sent) + 64 <= 300
        notices = [str(n.render()) for n in app.chat_screen.query(".notice.-warning")]
        assert any("the 2 oldest messages are left out" in notice for notice in notices)
        # Everything is still in the chat and the store; only the model sees less.
        assert len(app.chat_screen.history) == 6

        # A message longer than the whole context is refused with a clear notice.
        calls = len(engine.calls)
        await send(pilot, app, "z" * 2000)
        assert len(engine.calls) == calls
        assert "too long for the model's context" in screen_text(app)
        assert app.chat_screen.chat_log.message_views[-1].role == "assistant"  # not kept
        assert app.chat_screen.prompt_box.text == "z" * 2000  # back in the box


async def test_french_interface_from_the_locale(tmp_path, monkeypatch):
    monkeypatch.delenv("LC_ALL", raising=False)
    monkeypatch.delenv("LC_MESSAGES", raising=False)
    monkeypatch.setenv("LANG", "fr_FR.UTF-8")
    app = make_app(tmp_path, FakeEngine("Très bien."), lang=None)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        assert app.strings.language == "fr"
        await send(pilot, app, "Ça va ?")
        text = screen_text(app)
        assert "Nouvelle" in text and "Relancer" in text and "F1 Aide" in text  # footer
        assert "Discussions" in text  # sidebar title
        assert "Vous" in text and "prêt" in text  # role and status
        assert "jetons/s" in text


async def test_dense_model_shows_a_note_instead_of_a_heatmap(tmp_path):
    engine = FakeEngine.dense()
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "hi")
        main_width = app.chat_screen.query_one("#main").region.width
        await pilot.press("f4")
        await pilot.pause()
        # One line says so; no panel opens to squeeze the chat, nothing is observed.
        assert [str(n.message) for n in app._notifications][-1] == "Dense model — no experts."
        assert not app.chat_screen.experts_panel_visible
        assert app.chat_screen.query_one("#main").region.width == main_width
        assert engine.routing_observer is None and engine.observed_tokens == 0


async def test_accents_cjk_and_emoji_render_in_prompts_and_replies(tmp_path):
    reply = "日本語の答え：東京は首都です。 Voilà, c’est l’été ! 👍🏽 한국어 ✓"
    prompt = "Où est la capitale du 日本? 🇯🇵 Ünïcödé"
    app = make_app(tmp_path, FakeEngine(reply))
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, prompt)
        text = screen_text(app)
        for fragment in (
            "Où est la capitale du 日本?",
            "日本語の答え：東京は首都です。",
            "l’été",
            "한국어",
        ):
            assert fragment in text
        # Double-width characters take two cells: every row still fills the terminal exactly.
        assert all(cell_len(line) == TERMINAL_SIZE[0] for line in text.splitlines())
        stored = app.store.messages(app.chat_screen.conversation.id)
        assert [m.content for m in stored] == [prompt, reply]
