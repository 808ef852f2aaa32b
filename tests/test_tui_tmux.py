"""Smoke test in a real terminal: the app runs in tmux, keys go in, the screen is read back.

Uses the scripted engine (the terminal driver is what is tested here, not the model), which
loads only once the test has typed its message and pressed Enter, as people do during a long
load. Skipped where tmux is not installed.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

APP_SCRIPT = """
import os, sys, time
sys.path.insert(0, {repo!r})
from app.store import ConversationStore
from app.tui.app import MixchatApp
from tests.fake_engine import FakeEngine

def load_when_told():
    while not os.path.exists({gate!r}):  # the test creates it once it has typed and sent
        time.sleep(0.05)
    return FakeEngine("Bonjour ! 日本語で **こんにちは**。")

store = ConversationStore.open_default()
app = MixchatApp(store=store, engine_loader=load_when_told, lang="fr")
app.run()
store.close()
sys.exit(app.return_code or 0)
"""

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def _tmux(*args: str) -> str:
    return subprocess.run(
        ["tmux", *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


def _wait_for_screen(session: str, expected: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux("capture-pane", "-p", "-t", session)
        if expected in screen:
            return screen
        time.sleep(0.05)
    raise AssertionError(f"{expected!r} never showed; the screen was:\n{screen}")


def test_real_terminal_session(tmp_path):
    session = f"mixchat-test-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "run_app.py"
    gate = tmp_path / "load-now"
    script.write_text(APP_SCRIPT.format(repo=str(REPO), gate=str(gate)), encoding="utf-8")
    command = (
        f"unset COLUMNS LINES; cd {tmp_path} && MIXCHAT_HOME={tmp_path / 'home'} LANG=C.UTF-8 TERM=xterm-256color "
        f"{sys.executable} {script}; echo EXITED-$? ; sleep 30"
    )
    _tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "32", command)
    try:
        _wait_for_screen(session, "chargement du modèle")
        _tmux("send-keys", "-t", session, "-l", "Salut, ça va ? 日本")
        _tmux("send-keys", "-t", session, "Enter")  # at once, while the model loads
        _wait_for_screen(session, "en attente du chargement du modèle")
        gate.touch()
        screen = _wait_for_screen(session, "42,0 jetons/s")
        assert "Salut, ça va ? 日本" in screen
        assert "Bonjour ! 日本語で こんにちは。" in screen
        _tmux("send-keys", "-t", session, "C-q")
        _wait_for_screen(session, "EXITED-0")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    database = sqlite3.connect(tmp_path / "home" / "mixchat.db")
    rows = database.execute("SELECT role, content FROM messages ORDER BY id").fetchall()
    database.close()
    assert rows == [
        ("user", "Salut, ça va ? 日本"),
        ("assistant", "Bonjour ! 日本語で **こんにちは**。"),
    ]
