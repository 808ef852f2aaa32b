"""Pilot tests of a chat turn: send, stream, cancel, regenerate, edit, multi-turn, errors."""

from __future__ import annotations

import pytest
from textual.widgets import Markdown
from textual.widgets.markdown import MarkdownStream

from app.store import ConversationStore
from app.tui import reply_session
from app.tui.widgets.message_view import MessageView
from model.errors import MixchatError
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


async def test_send_streams_markdown_reply_and_saves_both_messages(tmp_path):
    engine = FakeEngine()
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await pilot.press(*"Hello")
        await pilot.press("enter")
        await wait_until_idle(pilot, app)
        screen = app.chat_screen
        views = screen.chat_log.message_views
        assert [v.role for v in views] == ["user", "assistant"]
        assert views[0].content == "Hello"
        reply_markdown = views[1].query_one(Markdown)
        assert reply_markdown.source == DEFAULT_REPLY  # every token reached the widget
        # Rendered as Markdown: a code fence block and a bullet list exist.
        assert reply_markdown.query("MarkdownFence")
        assert reply_markdown.query("MarkdownBulletList")
        stored = app.store.messages(screen.conversation.id)
        assert [(m.role, m.content) for m in stored] == [
            ("user", "Hello"),
            ("assistant", DEFAULT_REPLY),
        ]
        assert stored[1].complete and stored[1].stats["finish_reason"] == "stop"
        text = screen_text(app)
        assert "42.0 tok/s" in text  # status bar: decode speed
        assert "ctx 32/4,096" in text  # status bar: context used / length
        assert "1.25 GB" in text  # status bar: peak memory
        assert engine.calls[0][0] == [{"role": "user", "content": "Hello"}]


async def test_enter_sends_shift_enter_and_ctrl_j_insert_newlines(tmp_path):
    engine = FakeEngine("ok")
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await pilot.press("space", "enter")  # a blank prompt is not sent
        assert engine.calls == [] and app.chat_screen.conversation is None
        await pilot.press("backspace", "a", "shift+enter", "b", "ctrl+j", "c")
        assert app.chat_screen.prompt_box.text == "a\nb\nc"
        await pilot.press("enter")
        await wait_until_idle(pilot, app)
        assert app.chat_screen.prompt_box.text == ""
        assert engine.calls[0][0][-1]["content"] == "a\nb\nc"


async def test_updates_reach_the_screen_at_a_bounded_rate_and_last_tokens_flush(
    tmp_path, monkeypatch
):
    writes: list[str] = []
    original_write = MarkdownStream.write

    async def counting_write(self, fragment):
        writes.append(fragment)
        await original_write(self, fragment)

    monkeypatch.setattr(MarkdownStream, "write", counting_write)
    reply = "".join(f"word{i} " for i in range(400)) + "THE-END"
    engine = FakeEngine(reply, token_delay=0.0005)  # ~400 tokens in well under a second
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "go")
        tokens = len(split_tokens(reply))
        assert "".join(writes) == reply  # nothing lost, the last token included
        # Every write but the final flush went through a tick the pacer allowed (its rate and
        # CPU budget: test_tui_units), and writes batch tokens rather than follow them.
        pacer = app.chat_screen.last_finished_reply.pacer
        assert len(writes) <= pacer.updates + 1 < tokens
        assert app.chat_screen.chat_log.message_views[-1].content == reply


async def test_escape_cancels_keeps_partial_text_and_saves_it(tmp_path):
    engine = FakeEngine("one two three four five six seven eight", pause_after_tokens=3)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "count", wait=False)
        await wait_paused(pilot, engine)
        assert app.chat_screen.is_generating
        await pilot.press("escape")
        await wait_until_idle(pilot, app)
        screen = app.chat_screen
        assert screen.history[-1].content == "one two three"
        stored = app.store.messages(screen.conversation.id)
        assert stored[-1].role == "assistant" and stored[-1].content == "one two three"
        assert stored[-1].stats["finish_reason"] == "cancelled"
        assert "stopped" in screen_text(app)


async def test_partial_reply_is_saved_while_streaming(tmp_path, monkeypatch):
    monkeypatch.setattr(reply_session, "SAVE_INTERVAL", 0.0)
    engine = FakeEngine("alpha beta gamma delta", pause_after_tokens=2)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "hi", wait=False)
        await wait_paused(pilot, engine)
        conversation_id = app.chat_screen.conversation.id
        # A second connection sees the partial reply: it is on disk, not only in memory.
        other = ConversationStore(app.store.path, read_only=True)
        stored = other.messages(conversation_id)
        other.close()
        assert stored[-1].role == "assistant"
        assert stored[-1].content == "alpha beta" and not stored[-1].complete
        engine.release.set()
        await wait_until_idle(pilot, app)
        final = app.store.messages(conversation_id)[-1]
        assert final.content == "alpha beta gamma delta" and final.complete


async def test_quitting_while_a_reply_streams_saves_it(tmp_path):
    engine = FakeEngine("one two three four", pause_after_tokens=2)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "q", wait=False)
        await wait_paused(pilot, engine)
        conversation_id = app.chat_screen.conversation.id
        await pilot.press("ctrl+q")
    [_, reply] = app.store.messages(conversation_id)
    assert reply.content == "one two" and reply.complete
    assert reply.stats["finish_reason"] == "cancelled"


async def test_ui_accepts_keys_while_a_reply_streams(tmp_path):
    engine = FakeEngine("slow reply here", pause_after_tokens=1)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "first", wait=False)
        await wait_paused(pilot, engine)
        await pilot.press(*"next")
        assert app.chat_screen.prompt_box.text == "next"
        # Sending now is refused without losing the text.
        await pilot.press("enter")
        await pilot.pause()
        assert app.chat_screen.prompt_box.text == "next"
        assert len(engine.calls) == 1
        engine.release.set()
        await wait_until_idle(pilot, app)


async def test_regenerate_replaces_the_last_reply(tmp_path):
    engine = FakeEngine(["first answer", "second **answer**"])
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "question")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: len(engine.calls) == 2)
        await wait_until_idle(pilot, app)
        screen = app.chat_screen
        assert [v.content for v in screen.chat_log.message_views] == [
            "question",
            "second **answer**",
        ]
        stored = app.store.messages(screen.conversation.id)
        assert [m.content for m in stored] == ["question", "second **answer**"]
        assert engine.calls[1][0] == [{"role": "user", "content": "question"}]
        await pilot.press("ctrl+o")  # copy the reply
        assert app.clipboard == "second **answer**"


async def test_edit_and_resend_the_last_prompt(tmp_path):
    engine = FakeEngine(["reply one", "reply two", "reply three"])
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "first")
        await send(pilot, app, "secnod")
        await pilot.press("ctrl+l")
        assert app.chat_screen.editing is not None
        await pilot.press("escape")  # leaves edit mode, changes nothing
        assert app.chat_screen.editing is None and app.chat_screen.prompt_box.text == ""
        assert len(app.store.messages(app.chat_screen.conversation.id)) == 4
        await pilot.press("ctrl+l")
        prompt = app.chat_screen.prompt_box
        assert prompt.text == "secnod" and prompt.has_class("-editing")
        prompt.load_text("second")
        await pilot.press("enter")
        await wait_until_idle(pilot, app)
        screen = app.chat_screen
        assert [v.content for v in screen.chat_log.message_views] == [
            "first",
            "reply one",
            "second",
            "reply three",
        ]
        assert [m.content for m in app.store.messages(screen.conversation.id)] == [
            "first",
            "reply one",
            "second",
            "reply three",
        ]
        assert engine.calls[-1][0][-1] == {"role": "user", "content": "second"}
        assert not prompt.has_class("-editing")


async def test_multi_turn_sends_the_whole_conversation(tmp_path):
    engine = FakeEngine(["A1", "A2"])
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "Q1")
        engine.expert_hit_rate = 0.875  # as with a memory budget: experts read from disk
        await send(pilot, app, "Q2")
        await pilot.press("ctrl+b")  # hide the chats: room for the whole status line
        assert "experts 88% cached" in screen_text(app)
        assert engine.calls[1][0] == [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
        ]


async def test_engine_errors_show_in_the_chat_and_the_app_goes_on(tmp_path):
    engine = FakeEngine(fail_with=MixchatError("the model ran out of memory"))
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "hello")
        assert "Error: the model ran out of memory" in screen_text(app)
        assert [v.role for v in app.chat_screen.chat_log.message_views] == ["user"]
        engine.fail_with = RuntimeError("kaboom")  # a bug, not a user-facing error
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: len(engine.calls) == 2)
        await wait_until_idle(pilot, app)
        assert "RuntimeError: kaboom" in screen_text(app)
        engine.fail_with = None
        await pilot.press("ctrl+r")  # retry: the user message is still there
        await wait_for(pilot, lambda: len(engine.calls) == 3)
        await wait_until_idle(pilot, app)
        assert app.chat_screen.history[-1].role == "assistant"
        assert app.is_running


async def test_scrolled_up_view_is_not_yanked_to_the_bottom(tmp_path):
    reply = "\n\n".join(f"Paragraph {i}." for i in range(60))
    engine = FakeEngine(reply, pause_after_tokens=70, token_delay=0)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        await send(pilot, app, "long", wait=False)
        await wait_paused(pilot, engine)
        log = app.chat_screen.chat_log
        await wait_for(pilot, lambda: log.max_scroll_y > 10, what="the reply to overflow")
        assert log.scroll_y == log.max_scroll_y  # following while at the bottom
        log.scroll_home(animate=False)
        await pilot.pause()
        engine.release.set()
        await wait_until_idle(pilot, app)
        await pilot.pause()
        assert log.scroll_y == 0 and log.max_scroll_y > 20  # left where the user put it


async def test_huge_paste_neither_crashes_nor_hangs(tmp_path):
    huge = ("Lorem ipsum dolor sit amet, café 日本 🙂. " * 5200)[:200_000]
    engine = FakeEngine("Received.", context_length=1_000_000)
    app = make_app(tmp_path, engine)
    async with app.run_test(size=TERMINAL_SIZE) as pilot:
        from textual import events

        app.chat_screen.prompt_box.focus()
        app.post_message(events.Paste(huge))  # as the terminal delivers a paste
        await pilot.pause()
        prompt = app.chat_screen.prompt_box
        assert prompt.prompt_text == huge
        assert len(prompt.text) < 100  # shown as a short marker, not laid out
        await pilot.press("end", "space", "?")  # typing goes on around the marker
        assert prompt.prompt_text == huge + " ?"
        await pilot.press("enter")
        await wait_until_idle(pilot, app, timeout=20)
        stored = app.store.messages(app.chat_screen.conversation.id)
        assert stored[0].content == huge + " ?"  # the model and the store get all of it
        assert engine.calls[0][0][-1]["content"] == huge + " ?"
        [note] = app.chat_screen.query(".message-note")
        assert str(note.render()) == "… 180,002 more characters not shown here"
        assert isinstance(app.chat_screen.chat_log.message_views[0], MessageView)
