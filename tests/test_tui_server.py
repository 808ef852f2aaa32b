"""`mixchat chat` through a running `mixchat serve` (app/remote_engine.py), with a real server
on a random loopback port and the embedded default model: the app's reply equals the greedy
in-process one, Esc cancels the server's reply, and the server going away mid-reply is a
one-line notice with nothing typed lost; the next message then reconnects (the server is back)
or, with the server still gone, is answered by the model loaded in-process. The client path
imports no MLX."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from app.remote_engine import RemoteEngine, connect
from app.serve.scheduler import Delta, Job
from app.store import ChatSettings, ConversationStore
from app.tui.app import MixchatApp
from tests.test_serve import start
from tests.test_tui_helpers import screen_text, send, wait_for, wait_until_idle

pytestmark = pytest.mark.anyio


def use_settings(screen, settings: ChatSettings) -> None:
    """What the settings dialog does for the open chat."""
    screen.store.update_settings(screen.conversation.id, settings)
    screen.conversation = replace(screen.conversation, settings=settings)


async def test_chat_through_a_server(tmp_path, default_model_path, monkeypatch):
    from model import GenerationSettings

    running = start(default_model_path, batch=None)  # a dense model: batched by default
    running.__enter__()
    stopped = threading.Thread(target=running.__exit__, args=(None, None, None))
    back = None  # the server started again after it went away
    try:
        app = MixchatApp(store=ConversationStore(tmp_path / "m.db"), lang="en",
                         model=str(default_model_path), server=running.url)  # fmt: skip
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.chat_screen
            await wait_for(pilot, lambda: screen.engine is not None, timeout=60, what="engine")
            engine = screen.engine
            assert isinstance(engine, RemoteEngine) and app.load_error is None
            assert engine.context_length == running.scheduler.models.engine.context_length
            assert running.scheduler.status()["batch"] == 8
            host_port = running.url.removeprefix("http://")
            assert screen.status_bar.model_name == f"{engine.name} (server {host_port})"

            screen.draft_settings = ChatSettings(temperature=0.0, max_tokens=6)
            await send(pilot, app, "Say hello.", wait=False)
            await wait_until_idle(pilot, app, timeout=60)
            [user, reply] = app.store.messages(screen.conversation.id)
            job = running.scheduler.history[-1]
            assert job.request.messages[-1] == {"role": "user", "content": "Say hello."}
            local = running.scheduler.models.engine  # in-process, on the same weights
            local.reset()
            expected = "".join(c.text for c in local.stream(
                job.request.messages, GenerationSettings(max_tokens=6, temperature=0)))  # fmt: skip
            assert reply.content == expected and reply.complete
            assert (
                reply.stats["generation_tokens"] == 6 and reply.stats["finish_reason"] == "length"
            )
            assert engine.count_tokens(job.request.messages) == local.count_tokens(
                job.request.messages
            )

            # Esc: the app stops, and so does the server's reply (within a token)
            use_settings(screen, ChatSettings(temperature=0.0, max_tokens=3000))
            await send(pilot, app, "Tell me a very long story.", wait=False)
            await wait_for(pilot, lambda: screen.reply is not None and screen.reply.text,
                           timeout=60, what="text")  # fmt: skip
            await pilot.press("escape")
            await wait_until_idle(pilot, app, timeout=30)
            cancelled = app.store.messages(screen.conversation.id)[-1]
            assert cancelled.role == "assistant" and cancelled.content
            await wait_for(pilot, lambda: running.scheduler.history[-1].request.messages[-1][
                "content"] == "Tell me a very long story.", timeout=30)  # fmt: skip
            gone = running.scheduler.history[-1]
            assert gone.done.finish_reason == "cancelled"
            assert gone.done.stats.generation_tokens <= gone.chunks_at_cancel + 1 < 3000

            # The server goes away mid-reply: one line, the reply so far and the draft are kept.
            # Each token is slowed down so that the reply cannot end on its own first.
            def slow_emit(job, item, _emit=Job.emit):
                _emit(job, item)
                if isinstance(item, Delta):
                    time.sleep(0.5)

            monkeypatch.setattr(Job, "emit", slow_emit)
            await send(pilot, app, "And another long one.", wait=False)
            await wait_for(pilot, lambda: screen.reply is not None and screen.reply.text,
                           timeout=60, what="text")  # fmt: skip
            screen.prompt_box.load_text("a draft I am typing")
            stopped.start()
            await wait_until_idle(pilot, app, timeout=60)
            notes = [str(n.message) for n in app._notifications]
            assert any("went away mid-reply" in n and "\n" not in n for n in notes), notes
            assert screen.prompt_box.text == "a draft I am typing"
            *_, asked, partial = app.store.messages(screen.conversation.id)
            assert asked.content == "And another long one." and partial.content
            # The status bar no longer shows the dead server, and says what comes next.
            assert host_port not in screen.status_bar.model_name
            assert "next message reconnects" in screen.status_bar.state
            monkeypatch.undo()

            # The server is back at the same address: the next message goes to it.
            back = start(default_model_path, batch=None, port=int(host_port.rsplit(":")[1]))
            back.__enter__()
            screen.prompt_box.clear_prompt()
            use_settings(screen, ChatSettings(temperature=0.0, max_tokens=4))
            count = len(app.store.messages(screen.conversation.id))
            await send(pilot, app, "Are you back?", wait=False)
            await wait_for(pilot, lambda: len(app.store.messages(screen.conversation.id))
                           == count + 2, timeout=60, what="the reply from the server")  # fmt: skip
            await wait_until_idle(pilot, app, timeout=60)
            assert back.scheduler.history[-1].request.messages[-1]["content"] == "Are you back?"
            assert screen.status_bar.model_name == f"{engine.name} (server {host_port})"

            # It stops between replies: the message it never answered is answered in-process.
            await asyncio.to_thread(back.__exit__, None, None, None)
            await send(pilot, app, "Still there?", wait=False)
            await wait_for(pilot, lambda: len(app.store.messages(screen.conversation.id))
                           == count + 4, timeout=120, what="the in-process reply")  # fmt: skip
            await wait_until_idle(pilot, app, timeout=60)
            assert getattr(screen.engine, "server", None) is None  # in-process now
            *_, asked, answer = app.store.messages(screen.conversation.id)
            assert (asked.content, answer.role) == ("Still there?", "assistant") and answer.content
            status = screen_text(app).splitlines()[-2]  # 80 columns: the model name still shows
            assert "(loaded here, server gone)" in screen.status_bar.model_name
            assert engine.name in status and host_port not in status
    finally:
        if not stopped.is_alive() and stopped.ident is None:
            stopped.start()
        stopped.join(30)
        if back is not None:
            back.__exit__(None, None, None)
    assert connect(running.url, str(default_model_path), None) is None  # no server: in-process


def test_the_client_path_imports_no_mlx():
    code = ("import sys, app.remote_engine, app.tui.app, app.tui.reply_session; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

