"""The SQLite conversation store: atomic saves, reopening, partial replies, crash safety."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    ChatSettings,
    ConversationStore,
    StoreInUse,
    data_dir,
    title_from_prompt,
)
from model.errors import MixchatError


@pytest.fixture
def store(tmp_path):
    store = ConversationStore(tmp_path / "chats.db")
    yield store
    store.close()


def test_uses_wal_mode_and_full_sync(store):
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_messages_and_settings_survive_reopening(tmp_path):
    path = tmp_path / "chats.db"
    store = ConversationStore(path)
    settings = ChatSettings(system_prompt="Sois bref.", temperature=0.3, safe_mode=True)
    conversation = store.create_conversation("Déjà vu 日本", settings)
    store.add_message(conversation.id, "user", "Bonjour 🙂")
    store.add_message(
        conversation.id, "assistant", "Salut !", stats={"generation_tokens": 3, "x": [1]}
    )
    store.close()

    reopened = ConversationStore(path)
    [loaded] = reopened.list_conversations()
    assert loaded.title == "Déjà vu 日本" and loaded.settings == settings
    messages = reopened.messages(conversation.id)
    assert [(m.role, m.content) for m in messages] == [
        ("user", "Bonjour 🙂"),
        ("assistant", "Salut !"),
    ]
    assert messages[1].stats == {"generation_tokens": 3}  # only JSON scalars are kept
    reopened.close()


def test_a_failed_write_leaves_nothing_behind(store):
    conversation = store.create_conversation("t")
    with pytest.raises(sqlite3.IntegrityError):
        store.add_message(conversation.id, "robot", "not a role")
    assert store.messages(conversation.id) == []
    # The connection is usable afterwards (the transaction was rolled back).
    store.add_message(conversation.id, "user", "ok")
    assert len(store.messages(conversation.id)) == 1


def test_partial_reply_is_visible_to_another_connection_at_once(store):
    conversation = store.create_conversation("t")
    store.add_message(conversation.id, "user", "q")
    reply = store.add_message(conversation.id, "assistant", "par", complete=False)
    store.update_message(reply.id, "partial re", complete=False)
    other = ConversationStore(store.path, read_only=True)
    [_, seen] = other.messages(conversation.id)
    assert seen.content == "partial re" and not seen.complete
    store.update_message(reply.id, "partial reply", complete=True, stats={"finish_reason": "stop"})
    [_, seen] = other.messages(conversation.id)
    assert seen.content == "partial reply" and seen.complete
    assert seen.stats == {"finish_reason": "stop"}
    other.close()


def test_a_killed_process_loses_nothing_it_saved(tmp_path):
    """The writer is SIGKILLed right after saving: the messages are on disk."""
    path = tmp_path / "chats.db"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from app.store import ConversationStore
        store = ConversationStore({str(path)!r})
        conversation = store.create_conversation("crash")
        store.add_message(conversation.id, "user", "saved before the crash")
        reply = store.add_message(conversation.id, "assistant", "half a", complete=False)
        store.update_message(reply.id, "half a reply", complete=False)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=30)
    assert result.returncode == -9
    store = ConversationStore(path)
    [conversation] = store.list_conversations()
    messages = store.messages(conversation.id)
    assert [(m.content, m.complete) for m in messages] == [
        ("saved before the crash", True),
        ("half a reply", False),
    ]
    store.close()


def test_rename_delete_and_delete_from(store):
    first = store.create_conversation("one")
    second = store.create_conversation("two")
    ids = [
        store.add_message(first.id, role, text).id
        for role, text in [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    ]
    store.add_message(second.id, "user", "other chat")
    store.delete_messages_from(first.id, ids[2])
    assert [m.content for m in store.messages(first.id)] == ["a", "b"]
    store.rename_conversation(first.id, "renamed")
    assert store.get_conversation(first.id).title == "renamed"
    store.delete_conversation(first.id)
    assert store.get_conversation(first.id) is None
    assert store.messages(first.id) == []
    assert [c.title for c in store.list_conversations()] == ["two"]
    assert [m.content for m in store.messages(second.id)] == ["other chat"]


def test_most_recently_used_chat_comes_first(store):
    old = store.create_conversation("old")
    store.create_conversation("new")
    store.add_message(old.id, "user", "bump")
    assert [c.title for c in store.list_conversations()] == ["old", "new"]


def test_settings_update_and_tolerant_parsing(store):
    conversation = store.create_conversation("s")
    store.update_settings(conversation.id, ChatSettings(max_tokens=99, reply_language="ja"))
    assert store.get_conversation(conversation.id).settings.max_tokens == 99
    assert ChatSettings.from_json('{"temperature": "hot", "max_tokens": 7, "new": 1}') == (
        ChatSettings(max_tokens=7)
    )
    assert ChatSettings.from_json("not json") == ChatSettings()
    assert ChatSettings.from_json("[1, 2]") == ChatSettings()


def test_export_markdown_file(store, tmp_path):
    conversation = store.create_conversation(
        "Recette : crêpes / 日本", ChatSettings(system_prompt="Tu es chef.")
    )
    store.add_message(conversation.id, "user", "Comment faire ?")
    store.add_message(conversation.id, "assistant", "1. Farine\n2. Œufs")
    path = store.export_to_file(conversation.id, tmp_path, {"user": "Vous"})
    assert path.parent == tmp_path and path.suffix == ".md"
    assert path.name == f"mixchat-{conversation.id}-recette-crêpes-日本.md"
    assert path.read_text(encoding="utf-8") == (
        "# Recette : crêpes / 日本\n\n## System\n\nTu es chef.\n\n"
        "## Vous\n\nComment faire ?\n\n## Assistant\n\n1. Farine\n2. Œufs\n"
    )
    assert not list(tmp_path.glob("*.partial"))


def test_data_dir_honours_mixchat_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXCHAT_HOME", str(tmp_path / "elsewhere"))
    assert data_dir() == tmp_path / "elsewhere"
    store = ConversationStore.open_default()
    assert store.path == tmp_path / "elsewhere" / "mixchat.db" and store.path.exists()
    store.close()
    monkeypatch.delenv("MIXCHAT_HOME")
    assert data_dir().name == "mixchat"


def test_title_from_prompt():
    assert title_from_prompt("\n  Hello   world \nmore") == "Hello world"
    long_title = title_from_prompt("x" * 100)
    assert len(long_title) == 48 and long_title.endswith("…")
    assert title_from_prompt("   ") == "…"


def test_a_second_store_on_the_same_data_dir_is_refused_with_one_line(tmp_path):
    first = ConversationStore(tmp_path / "mixchat.db")
    chat = first.create_conversation("A's chat")
    first.add_message(chat.id, "user", "from A")
    with pytest.raises(StoreInUse) as refused:
        ConversationStore(tmp_path / "mixchat.db")
    message = str(refused.value)
    assert "\n" not in message and f"pid {os.getpid()}" in message and str(tmp_path) in message
    # A reader beside it (tests, tools) sees A's turns and can write nothing.
    reader = ConversationStore(tmp_path / "mixchat.db", read_only=True)
    assert [m.content for m in reader.messages(chat.id)] == ["from A"]
    with pytest.raises(sqlite3.OperationalError):
        reader.add_message(chat.id, "user", "from B")
    reader.close()
    first.close()
    second = ConversationStore(tmp_path / "mixchat.db")  # free once A is closed
    assert [m.content for m in second.messages(chat.id)] == ["from A"]
    second.close()


def test_a_second_app_process_is_refused_and_the_first_ones_chat_is_untouched(tmp_path):
    """Two processes, as two terminals would run them: B exits 1 with one line on stderr."""
    home = tmp_path / "home"
    holder = ConversationStore(home / "mixchat.db")
    chat = holder.create_conversation("A")
    holder.add_message(chat.id, "user", "A's turn")
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r});"
        "from app.tui.run import run_chat; sys.exit(run_chat(None, 'en'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "MIXCHAT_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("mixchat: error: another mixchat (pid ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert [m.content for m in holder.messages(chat.id)] == ["A's turn"]
    holder.close()


def test_an_old_database_is_migrated_by_its_user_version(tmp_path):
    path = tmp_path / "mixchat.db"
    old = sqlite3.connect(path)
    old.executescript(MIGRATIONS[0])  # what version 1 of the app wrote
    old.execute(
        "INSERT INTO conversations (title, created_at, updated_at) VALUES ('old chat', 1, 1)"
    )
    old.execute("PRAGMA user_version=1")
    old.commit()
    old.close()
    store = ConversationStore(path)
    assert store.schema_version == SCHEMA_VERSION == 2
    assert [c.title for c in store.list_conversations()] == ["old chat"]
    assert store.get_preference("export_dir") is None
    store.set_preference("export_dir", "/tmp/x")
    store.set_preference("export_dir", "/tmp/y")
    assert store.get_preference("export_dir") == "/tmp/y"
    store.close()
    reopened = ConversationStore(path)  # nothing runs twice
    assert reopened.schema_version == 2 and reopened.get_preference("export_dir") == "/tmp/y"
    reopened.close()


def test_a_database_from_a_newer_mixchat_is_refused(tmp_path):
    path = tmp_path / "mixchat.db"
    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    newer.close()
    with pytest.raises(MixchatError, match="written by a newer mixchat"):
        ConversationStore(path)
    with pytest.raises(MixchatError, match="written by a newer mixchat"):
        ConversationStore(path)  # the same refusal, not "in use": the lock was let go of
    again = sqlite3.connect(path)
    assert again.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    again.close()
