"""What a new user tripped on in the chat app (issue 18): a refused long paste, a dead server,
the layout at 80x24 and 60x20, French details in F3/F4, stale figures. Pilot tests."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from textual.widgets import Label

from app.store import ConversationStore
from app.tui.screens.model_info import ModelInfoScreen
from app.tui.widgets.experts_heatmap import ExpertsHeatmap
from tests.fake_engine import FakeEngine, FakeModelInfo
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


def info_line(view) -> str:
    """The line under a message (tokens, speed, or what the reply is doing)."""
    return str(view.query_one(".message-info", Label).render())


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


@dataclass
class GgufInfo(FakeModelInfo):
    quantization: str = "GGUF Q4_K_M, 5.74 bits/weight"
    tensor_types: str = "193 Q4_K, 65 F32, 33 Q6_K"
    size_bytes: int = 98_400_000


@pytest.mark.parametrize(
    "lang, expected, left_out",
    [
        ("fr", ["Types de tenseurs", "5,74 bits/poids", "98,4 Mo", "aucun (dense)"], "5.74"),
        ("en", ["Tensor types", "5.74 bits/weight", "98.4 MB", "none (dense)"], "Experts per token"),
    ],
)
async def test_f3_speaks_the_interface_language_and_says_dense(tmp_path, lang, expected, left_out):
    engine = FakeEngine.dense()
    engine.info = GgufInfo(num_experts=0, experts_per_token=0, architecture="llama")
    app = make_app(tmp_path, engine, lang=lang)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelInfoScreen))
        text = screen_text(app)
        for words in expected:
            assert words in text
        assert left_out not in text and "bits/weight" not in text.replace(expected[1], "")


@pytest.mark.parametrize("lang, token", [("en", "1 token"), ("fr", "1 jeton")])
async def test_one_token_is_singular_in_the_reply_line_and_the_experts_panel(tmp_path, lang, token):
    engine = FakeEngine("Hi. there", pause_after_tokens=1, token_delay=0)
    app = make_app(tmp_path, engine, lang=lang)
    async with app.run_test(size=(140, 32)) as pilot:
        await pilot.press("f4")
        await send(pilot, app, "hello", wait=False)
        await wait_paused(pilot, engine)
        view = app.chat_screen.reply.view
        await wait_for(pilot, lambda: token in info_line(view), what=token)
        assert f"{token}s" not in info_line(view)
        engine.release.set()
        await wait_until_idle(pilot, app)
        engine.pause_after_tokens = None
        engine._reply = "Hi."  # a one-token reply
        await send(pilot, app, "again")
        assert info_line(app.chat_screen.chat_log.message_views[-1]).startswith(token)
        text = screen_text(app)
        heatmap = app.chat_screen.query_one(ExpertsHeatmap)
        assert heatmap.tokens == 1 and str(heatmap.render()).splitlines()[0] == token
        assert f"{token}s" not in text


@pytest.mark.parametrize(
    "lang, size, keys",
    [
        ("en", (80, 24), ["Esc Stop", "F1 Help", "^p palette"]),
        ("fr", (80, 24), ["Échap Arrêter", "F1 Aide", "^p palette"]),
        ("en", (60, 20), ["Esc Stop", "F1 Help", "^p palette"]),
        ("fr", (60, 20), ["Échap Arrêter", "F1 Aide", "^p palette"]),
    ],
)
async def test_small_terminals_keep_the_model_name_and_the_help_keys(tmp_path, lang, size, keys):
    from textual.widgets._footer import FooterKey

    app = make_app(tmp_path, FakeEngine(name="fake-mixtral-8x7b-instruct"), lang=lang)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        rows = screen_text(app).splitlines()
        assert "fake-mixtral-8x7b-instruct" in rows[-2]  # the status bar
        footer = rows[-1]
        for words in keys:
            assert words in footer
        assert footer.rstrip().endswith("^p palette")  # nothing cut, no stray "4"
        for key in app.screen.query(FooterKey):
            assert key.region.right <= size[0]  # every key shown whole


@pytest.mark.parametrize("lang", ["en", "fr"])
async def test_help_rows_wrap_instead_of_being_cut(tmp_path, lang):
    from app.tui.actions import help_rows
    from app.tui.screens.help import HelpScreen

    app = make_app(tmp_path, lang=lang)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.pause()
        table = app.screen.query_one("#help-table")
        assert table.virtual_size.width <= table.scrollable_content_region.width
        shown = [" ".join(str(table.get_row_at(i)[1]).split()) for i in range(table.row_count)]
        assert shown == [description for _, description in help_rows(app.strings)]
        rows = [row.strip(" │█▌▐") for row in screen_text(app).splitlines()]
        text = " ".join(" ".join(rows).split())  # the rows as read, frames left out
        assert "(keeps what was written)" in text or "(garde ce qui est écrit)" in text


async def test_sidebar_titles_with_emoji_flags_or_arabic_keep_its_border_in_line(tmp_path):
    from rich.cells import cell_len

    store = ConversationStore(tmp_path / "mixchat.db")
    titles = ["Hello 👋🏽 there friend", "🇫🇷 Voyage en France", "مرحبا بالعالم كيف حالك",
              "家族 👨‍👩‍👧 旅行の計画", "❤️ plain"]  # fmt: skip
    for title in titles:
        store.add_message(store.create_conversation(title).id, "user", title)
    app = make_app(tmp_path, store=store)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        rows = [row for row in screen_text(app).splitlines()[1:7]]
        sidebar = [row[: row.index("│", 1) + 1] for row in rows]
        assert len({cell_len(row) for row in sidebar}) == 1
        joined = "".join(sidebar)
        # Nothing whose width terminals measure differently from Rich (tmux 3.3: 👋🏽 is 4
        # cells, 👨‍👩‍👧 6, where Rich counts 2): skin tones, joiners, variation selectors.
        assert not any(ch in joined for ch in ("\u200d", "\U0001f3fd", "\ufe0f"))
        assert "Hello 👋 there" in joined and "FR Voyage" in joined and "مرحبا" in joined


async def test_a_reopened_chat_shows_no_memory_figure_of_an_earlier_run(tmp_path):
    """The last run (another --memory-budget) peaked at 509 MB: reopened, the chat shows its
    context use, but no memory figure until this run has one of its own."""
    store = ConversationStore(tmp_path / "mixchat.db")
    chat = store.create_conversation("earlier")
    store.add_message(chat.id, "user", "hello")
    saved = {"generation_tokens": 3, "generation_tps": 12.5, "peak_memory_gb": 0.509,
             "context_tokens": 40, "expert_hit_rate": 0.42, "finish_reason": "stop"}  # fmt: skip
    store.add_message(chat.id, "assistant", "hi there", stats=saved)
    engine = FakeEngine("Fresh.")
    app = make_app(tmp_path, engine, store=store)
    async with app.run_test(size=(160, 32)) as pilot:
        await pilot.pause()
        status = screen_text(app).splitlines()[-2]
        assert "ctx 40/4,096" in status  # the chat's own figure stays
        assert "509" not in status and "42%" not in status and "— GB" in status
        await send(pilot, app, "and now?")  # this run's reply: its figures show
        status = screen_text(app).splitlines()[-2]
        assert "— GB" not in status and "509" not in status
