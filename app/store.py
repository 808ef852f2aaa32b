"""Saved conversations in SQLite.

One row per chat, one row per message. Every write is its own transaction in WAL mode with
``synchronous=FULL``, so a message exists on disk as soon as ``add_message`` / ``update_message``
returns: a crash or a kill of the app loses nothing that was saved.

The database lives in ``user_data_dir("mixchat")``; the ``MIXCHAT_HOME`` environment variable
names another directory (tests, portable installs). Its schema version is SQLite's
``user_version``: ``MIGRATIONS`` bring an older file up to date, a newer one is refused.

One store per data directory at a time: a second app (another terminal) on the same directory
is refused with one line (``StoreInUse``) rather than interleaving turns into the first one's
chats. The lock is an ``flock`` on a file beside the database: the system drops it when the
process ends, even after a kill -9.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from app.settings import data_dir  # the one data directory (re-exported for the UI)
from model.errors import MixchatError

DATABASE_NAME = "mixchat.db"
TITLE_MAX_CHARS = 48

# MIGRATIONS[n] takes a database at user_version n to n + 1 (0: a new, empty file).
MIGRATIONS: tuple[str, ...] = (
    """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    complete INTEGER NOT NULL DEFAULT 1,
    stats TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id);
""",
    """
CREATE TABLE preferences (key TEXT PRIMARY KEY, value TEXT NOT NULL);
""",
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreInUse(MixchatError):
    """Another mixchat holds this data directory."""


@dataclass(frozen=True)
class ChatSettings:
    """What a chat sends to the model besides its messages; stored per chat."""

    system_prompt: str = ""
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    reply_language: str = ""  # a language code from i18n.REPLY_LANGUAGES; "" = no instruction
    safe_mode: bool = False
    thinking: bool = True  # a model whose template has a thinking switch (Qwen3) thinks first

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | None) -> ChatSettings:
        """Settings from stored JSON; unknown keys and values of the wrong type are ignored."""
        try:
            raw = json.loads(text or "{}")
        except json.JSONDecodeError:
            return cls()
        if not isinstance(raw, dict):
            return cls()
        defaults = cls()
        values: dict[str, Any] = {}
        for field in fields(cls):
            if field.name not in raw:
                continue
            default = getattr(defaults, field.name)
            value = raw[field.name]
            try:
                if isinstance(default, bool):
                    values[field.name] = bool(value)
                else:
                    values[field.name] = type(default)(value)
            except (TypeError, ValueError):
                continue
        return replace(defaults, **values)


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    created_at: float
    updated_at: float
    settings: ChatSettings


@dataclass(frozen=True)
class StoredMessage:
    id: int
    conversation_id: int
    role: str
    content: str
    complete: bool  # False while a reply is being written (and forever if the app died then)
    stats: dict[str, Any] | None
    created_at: float

    def as_chat_message(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def title_from_prompt(prompt: str) -> str:
    """A chat title from its first prompt: the first non-empty line, shortened."""
    for line in prompt.splitlines():
        line = " ".join(line.split())
        if line:
            if len(line) > TITLE_MAX_CHARS:
                return line[: TITLE_MAX_CHARS - 1].rstrip() + "…"
            return line
    return "…"


def stats_to_dict(stats: Any) -> dict[str, Any] | None:
    """GenerationStats (or any object with attributes) as a JSON-friendly dict."""
    if stats is None:
        return None
    if isinstance(stats, dict):
        raw = stats
    elif is_dataclass(stats) and not isinstance(stats, type):
        raw = asdict(stats)
    else:
        raw = {k: v for k, v in vars(stats).items() if not k.startswith("_")}
    return {k: v for k, v in raw.items() if isinstance(v, (int, float, str, bool)) or v is None}


class ConversationStore:
    """Conversations and their messages in one SQLite file. Use from one thread."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """Open (create, migrate) the store at ``path`` and hold its lock; ``read_only``: a
        reader beside the app (tests, tools) that takes no lock and can write nothing."""
        self.path = Path(path)
        if read_only:
            self._lock = -1
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10.0)
            self._db.row_factory = sqlite3.Row
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_beside(self.path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:
            os.close(self._lock)
            self._lock = -1
            raise

    def _migrate(self) -> None:
        """Run the migrations this file lacks, each with its new user_version, atomically."""
        version = self.schema_version
        if version > SCHEMA_VERSION:
            self._db.close()
            raise MixchatError(
                f"{self.path} was written by a newer mixchat (schema {version}, this one knows "
                f"{SCHEMA_VERSION}): upgrade mixchat"
            )
        for number in range(version, SCHEMA_VERSION):
            with self._transaction() as db:
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={number + 1}")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @classmethod
    def open_default(cls) -> ConversationStore:
        """The store in the data directory (``MIXCHAT_HOME`` or the platform's data dir)."""
        return cls(data_dir() / DATABASE_NAME)

    def close(self) -> None:
        self._db.close()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    # Conversations

    def create_conversation(self, title: str, settings: ChatSettings | None = None) -> Conversation:
        now = time.time()
        settings = settings or ChatSettings()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO conversations (title, created_at, updated_at, settings)"
                " VALUES (?, ?, ?, ?)",
                (title, now, now, settings.to_json()),
            )
        return Conversation(int(cursor.lastrowid or 0), title, now, now, settings)

    def list_conversations(self) -> list[Conversation]:
        """Every conversation, the most recently used first."""
        rows = self._db.execute(
            "SELECT * FROM conversations ORDER BY updated_at DESC, id DESC"
        ).fetchall()
        return [self._conversation(row) for row in rows]

    def get_conversation(self, conversation_id: int) -> Conversation | None:
        row = self._db.execute(
            "SELECT * FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        return self._conversation(row) if row else None

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    def update_settings(self, conversation_id: int, settings: ChatSettings) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE conversations SET settings = ? WHERE id = ?",
                (settings.to_json(), conversation_id),
            )

    def delete_conversation(self, conversation_id: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # Messages

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        complete: bool = True,
        stats: Any = None,
    ) -> StoredMessage:
        now = time.time()
        stats_dict = stats_to_dict(stats)
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO messages (conversation_id, role, content, complete, stats, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    conversation_id,
                    role,
                    content,
                    int(complete),
                    json.dumps(stats_dict) if stats_dict else None,
                    now,
                ),
            )
            db.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
            )
        return StoredMessage(
            int(cursor.lastrowid or 0), conversation_id, role, content, complete, stats_dict, now
        )

    def update_message(
        self, message_id: int, content: str, *, complete: bool, stats: Any = None
    ) -> None:
        stats_dict = stats_to_dict(stats)
        with self._transaction() as db:
            db.execute(
                "UPDATE messages SET content = ?, complete = ?, stats = COALESCE(?, stats)"
                " WHERE id = ?",
                (
                    content,
                    int(complete),
                    json.dumps(stats_dict) if stats_dict else None,
                    message_id,
                ),
            )

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        rows = self._db.execute(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
        ).fetchall()
        return [self._message(row) for row in rows]

    def delete_messages_from(self, conversation_id: int, message_id: int) -> None:
        """Delete a message and every later message of its conversation."""
        with self._transaction() as db:
            db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND id >= ?",
                (conversation_id, message_id),
            )

    # Preferences (what the app remembers between runs: the last export folder...)

    def get_preference(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM preferences WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_preference(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO preferences (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # Export

    def export_markdown(
        self, conversation_id: int, role_names: dict[str, str] | None = None
    ) -> str:
        """The conversation as a Markdown document."""
        conversation = self.get_conversation(conversation_id)
        if conversation is None:
            raise KeyError(conversation_id)
        names = {"system": "System", "user": "You", "assistant": "Assistant"}
        names.update(role_names or {})
        parts = [f"# {conversation.title}\n"]
        if conversation.settings.system_prompt:
            parts.append(f"## {names['system']}\n\n{conversation.settings.system_prompt}\n")
        for message in self.messages(conversation_id):
            parts.append(f"## {names.get(message.role, message.role)}\n\n{message.content}\n")
        return "\n".join(parts)

    def export_to_file(
        self, conversation_id: int, directory: Path, role_names: dict[str, str] | None = None
    ) -> Path:
        """Write the conversation as Markdown into ``directory``; returns the file's path."""
        return self.export_to_path(
            conversation_id, Path(directory) / self.export_filename(conversation_id), role_names
        )

    def export_filename(self, conversation_id: int) -> str:
        """``mixchat-<id>-<title as a slug>.md``"""
        conversation = self.get_conversation(conversation_id)
        if conversation is None:
            raise KeyError(conversation_id)
        slug = re.sub(r"[^\w]+", "-", conversation.title.lower()).strip("-")[:40] or "chat"
        return f"mixchat-{conversation_id}-{slug}.md"

    def export_to_path(
        self, conversation_id: int, path: Path, role_names: dict[str, str] | None = None
    ) -> Path:
        """Write the conversation as Markdown to ``path`` (into it, if it is a directory);
        the file appears whole or not at all. Returns the file's path."""
        path = Path(path)
        if path.is_dir():
            path = path / self.export_filename(conversation_id)
        temporary = path.with_name(path.name + ".partial")
        temporary.write_text(self.export_markdown(conversation_id, role_names), encoding="utf-8")
        temporary.replace(path)
        return path

    # Rows

    @staticmethod
    def _conversation(row: sqlite3.Row) -> Conversation:
        return Conversation(
            id=row["id"],
            title=row["title"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            settings=ChatSettings.from_json(row["settings"]),
        )

    @staticmethod
    def _message(row: sqlite3.Row) -> StoredMessage:
        stats = json.loads(row["stats"]) if row["stats"] else None
        return StoredMessage(
            id=row["id"],
            conversation_id=row["conversation_id"],
            role=row["role"],
            content=row["content"],
            complete=bool(row["complete"]),
            stats=stats,
            created_at=row["created_at"],
        )


def _lock_beside(database: Path) -> int:
    """Hold ``<database>.lock`` for this store's life; StoreInUse if another process has it."""
    lock_path = database.with_name(database.name + ".lock")
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "?"
        os.close(descriptor)
        raise StoreInUse(
            f"another mixchat (pid {holder}) is using {database.parent}: close it first, or "
            f"set MIXCHAT_HOME to another folder"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, str(os.getpid()).encode(), 0)
    return descriptor
