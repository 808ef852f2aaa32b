"""Shared helpers for the TUI tests (no tests here)."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from textual.pilot import Pilot

from app.store import ConversationStore
from app.tui.app import MixchatApp
from tests.fake_engine import FakeEngine

TERMINAL_SIZE = (100, 32)


def make_app(
    tmp_path: Path,
    engine: FakeEngine | None = None,
    *,
    lang: str | None = "en",
    store: ConversationStore | None = None,
    **kwargs,
) -> MixchatApp:
    store = store or ConversationStore(tmp_path / "mixchat.db")
    return MixchatApp(store=store, engine=engine or FakeEngine(), lang=lang, **kwargs)


async def wait_for(
    pilot: Pilot, condition: Callable[[], object], timeout: float = 5.0, what: str = ""
) -> None:
    """Let the app run until ``condition()`` is true (fails after ``timeout`` seconds).

    Polls with plain sleeps: ``pilot.pause`` forces a full screen refresh every time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)
    await pilot.pause()


async def wait_until_idle(pilot: Pilot, app: MixchatApp, timeout: float = 5.0) -> None:
    """Wait for the reply being written (if any) to finish and reach the screen."""
    await wait_for(pilot, lambda: app.chat_screen.reply is None, timeout, "the reply to finish")


async def send(pilot: Pilot, app: MixchatApp, text: str, *, wait: bool = True) -> None:
    """Put ``text`` in the prompt box and press Enter."""
    prompt = app.chat_screen.prompt_box
    prompt.focus()
    prompt.load_text(text)
    await pilot.press("enter")
    if wait:
        await wait_until_idle(pilot, app)


async def wait_paused(pilot: Pilot, engine: FakeEngine) -> None:
    """Wait until a FakeEngine with ``pause_after_tokens`` is holding its stream."""
    await wait_for(pilot, engine.paused.is_set, what="the fake engine to pause")
    await asyncio.sleep(0.1)  # a few ticks so the text so far reaches the screen
    await pilot.pause()


def screen_text(app: MixchatApp) -> str:
    """The screen as plain text, one line per terminal row."""
    width, height = app.size
    console = Console(
        width=width,
        height=height,
        file=io.StringIO(),
        force_terminal=True,
        color_system="truecolor",
        record=True,
        legacy_windows=False,
        safe_box=False,
    )
    console.print(
        app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    )
    return console.export_text(styles=False)
