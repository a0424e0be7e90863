"""Saved conversations: their turns, sources, settings and the user's feedback, in SQLite under the data dir.

One file, ``<data_dir>/conversations.sqlite3``, shared by every entry point (the UI today; the API and
``chat --json`` of issue 14 next). Rows, never pickles: settings and sources are JSON text. Every call
names the owner (the logged-in user, ``""`` without login) and only ever sees that owner's rows, so one
user can never read, list or change another's conversations: a conversation of someone else is "not
found", exactly as one that does not exist.

Each call opens its own connection (SQLite's own locking, WAL journal), so the store is safe to share
between threads and processes and holds no state of its own beyond the path.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from app.sqlite_rows import transaction
from common.errors import ZhikuError

FILE_NAME = "conversations.sqlite3"
TITLE_CHARS = 40  # a new conversation is named after its first question, cut here
MAX_TITLE = 200
MAX_COMMENT = 2_000
_ID = re.compile(r"^[0-9a-f]{16}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    title TEXT NOT NULL,
    kb TEXT,
    system_prompt TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_owner ON conversations (owner, updated);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    sources TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    rating INTEGER CHECK (rating IN (-1, 1)),
    comment TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages (conversation, id);
"""


class ConversationError(ZhikuError, ValueError):
    """A conversation or message that cannot be found, read or changed; the message says why."""


class ConversationChanged(ConversationError):
    """The conversation's messages are not those a save was based on: it changed meanwhile (another tab)."""


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    kb: str | None
    system_prompt: str
    settings: dict[str, Any]
    created: float
    updated: float


@dataclass(frozen=True)
class StoredMessage:
    id: int
    role: Literal["user", "assistant"]
    content: str
    sources: list[dict[str, Any]] = field(default_factory=list)
    rating: int | None = None  # 1 (👍), -1 (👎) or None
    comment: str = ""


def title_from(question: str) -> str:
    """A conversation's default name: its first question on one line, cut at ``TITLE_CHARS``."""
    flat = " ".join(question.split())
    return flat if len(flat) <= TITLE_CHARS else flat[: TITLE_CHARS - 1] + "…"


def check_id(conversation_id: str) -> str:
    """``conversation_id`` when it has the shape this store gives ids, else ConversationError."""
    if not isinstance(conversation_id, str) or not _ID.match(conversation_id):
        raise ConversationError(f"{str(conversation_id)[:40]!r} is not a conversation id", "pick one from the list")
    return conversation_id


class ConversationStore:
    """CRUD on ``<data_dir>/conversations.sqlite3``, every call scoped to one owner."""

    def __init__(self, data_dir: Path | str) -> None:
        self.path = Path(data_dir) / FILE_NAME

    def _db(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(
            self.path, _SCHEMA, ConversationError, f"move {self.path} aside to start a fresh conversation history"
        )

    # ---- conversations ----

    def create(
        self,
        owner: str,
        *,
        title: str = "",
        kb: str | None = None,
        system_prompt: str = "",
        settings: dict[str, Any] | None = None,
    ) -> Conversation:
        now = time.time()
        conv = Conversation(secrets.token_hex(8), _title(title), kb, system_prompt, dict(settings or {}), now, now)
        with self._db() as db:
            db.execute(
                "INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (conv.id, owner, conv.title, kb, system_prompt, json.dumps(conv.settings), now, now),
            )
        return conv

    def conversations(self, owner: str, query: str = "") -> list[Conversation]:
        """The owner's conversations, most recently used first; ``query`` keeps those whose title or any
        message contains it (case-insensitive for ASCII, as SQLite's LIKE)."""
        sql = "SELECT * FROM conversations WHERE owner = ?"
        args: list[Any] = [owner]
        if query.strip():
            pattern = "%" + query.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            sql += (
                " AND (title LIKE ? ESCAPE '\\' OR id IN (SELECT conversation FROM messages"
                " WHERE content LIKE ? ESCAPE '\\'))"
            )
            args += [pattern, pattern]
        with self._db() as db:
            rows = db.execute(sql + " ORDER BY updated DESC, created DESC", args).fetchall()
        return [_conversation(row) for row in rows]

    def get(self, owner: str, conversation_id: str) -> Conversation:
        with self._db() as db:
            return _conversation(self._row(db, owner, conversation_id))

    def update(
        self,
        owner: str,
        conversation_id: str,
        *,
        title: str | None = None,
        kb: str | None = None,
        clear_kb: bool = False,
        system_prompt: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> Conversation:
        """Rename, or change what the conversation answers with; only the arguments given change."""
        with self._db() as db:
            conv = _conversation(self._row(db, owner, conversation_id))
            new = Conversation(
                conv.id,
                _title(title) if title is not None else conv.title,
                None if clear_kb else (kb if kb is not None else conv.kb),
                system_prompt if system_prompt is not None else conv.system_prompt,
                dict(settings) if settings is not None else conv.settings,
                conv.created,
                time.time(),
            )
            db.execute(
                "UPDATE conversations SET title = ?, kb = ?, system_prompt = ?, settings = ?, updated = ? WHERE id = ?",
                (new.title, new.kb, new.system_prompt, json.dumps(new.settings), new.updated, new.id),
            )
        return new

    def delete(self, owner: str, conversation_id: str) -> None:
        with self._db() as db:
            self._row(db, owner, conversation_id)
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # ---- messages ----

    def add_exchange(
        self,
        owner: str,
        conversation_id: str,
        question: str,
        answer: str,
        sources: Sequence[dict[str, Any]] = (),
    ) -> tuple[int, int]:
        """Append one question and its answer (with the answer's sources); returns their message ids. The
        first exchange of an untitled conversation names it."""
        now = time.time()
        with self._db() as db:
            conv = _conversation(self._row(db, owner, conversation_id))
            asked = db.execute(
                "INSERT INTO messages (conversation, role, content, created) VALUES (?, 'user', ?, ?)",
                (conv.id, question, now),
            ).lastrowid
            answered = db.execute(
                "INSERT INTO messages (conversation, role, content, sources, created) VALUES (?, 'assistant', ?, ?, ?)",
                (conv.id, answer, json.dumps(list(sources), ensure_ascii=False), now),
            ).lastrowid
            title = conv.title or title_from(question)
            db.execute("UPDATE conversations SET updated = ?, title = ? WHERE id = ?", (now, title, conv.id))
        assert asked is not None and answered is not None
        return asked, answered

    def save_messages(
        self,
        owner: str,
        conversation_id: str,
        messages: Sequence[tuple[str, str]],
        settings: dict[str, Any] | None = None,
        based_on: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        """Make the stored messages ``messages`` ((role, text) pairs, as the chat shows them): those already
        stored in the same order stay (with their ids and feedback); the rest are replaced. A regenerated
        answer replaces only the last one. With ``based_on`` (the messages the new ones were made from),
        raises :class:`ConversationChanged`, changing nothing, when the stored ones are others."""
        rows = [(role, text) for role, text in messages if role in ("user", "assistant")]
        now = time.time()
        with self._db() as db:
            conv = _conversation(self._row(db, owner, conversation_id))
            stored = db.execute(
                "SELECT id, role, content FROM messages WHERE conversation = ? ORDER BY id", (conv.id,)
            ).fetchall()
            if based_on is not None and [tuple(r[1:]) for r in stored] != [tuple(m) for m in based_on]:
                raise ConversationChanged(f"conversation {conversation_id} changed meanwhile")
            keep = 0
            while keep < min(len(stored), len(rows)) and tuple(stored[keep][1:]) == rows[keep]:
                keep += 1
            if keep < len(stored):
                db.execute("DELETE FROM messages WHERE conversation = ? AND id >= ?", (conv.id, stored[keep][0]))
            db.executemany(
                "INSERT INTO messages (conversation, role, content, created) VALUES (?, ?, ?, ?)",
                [(conv.id, role, text, now) for role, text in rows[keep:]],
            )
            first = next((text for role, text in rows if role == "user"), "")
            db.execute(
                "UPDATE conversations SET updated = ?, title = ?, settings = ? WHERE id = ?",
                (
                    now,
                    conv.title or title_from(first),
                    json.dumps(conv.settings if settings is None else settings),
                    conv.id,
                ),
            )

    def messages(self, owner: str, conversation_id: str) -> list[StoredMessage]:
        with self._db() as db:
            self._row(db, owner, conversation_id)
            rows = db.execute(
                "SELECT id, role, content, sources, rating, comment FROM messages WHERE conversation = ? ORDER BY id",
                (conversation_id,),
            ).fetchall()
        return [StoredMessage(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    def rate(self, owner: str, message_id: int, rating: int | None, comment: str = "") -> None:
        """👍 (1), 👎 (-1) or no rating (None) on one of the owner's answers, with an optional comment."""
        if rating not in (1, -1, None):
            raise ConversationError(f"rating {rating!r}: use 1 (👍), -1 (👎) or none")
        if len(comment) > MAX_COMMENT:
            raise ConversationError(f"the comment is {len(comment)} characters long; use at most {MAX_COMMENT}")
        with self._db() as db:
            row = db.execute(
                "SELECT m.role FROM messages m JOIN conversations c ON c.id = m.conversation"
                " WHERE m.id = ? AND c.owner = ?",
                (int(message_id), owner),
            ).fetchone()
            if row is None:
                raise ConversationError(f"no message {message_id}", "rate an answer of one of your conversations")
            if row[0] != "assistant":
                raise ConversationError("only answers can be rated")
            db.execute("UPDATE messages SET rating = ?, comment = ? WHERE id = ?", (rating, comment, message_id))

    def rate_at(self, owner: str, conversation_id: str, index: int, rating: int | None, comment: str = "") -> None:
        """:meth:`rate` the message at position ``index`` of the conversation (as the chat shows it)."""
        messages = self.messages(owner, conversation_id)
        if not 0 <= index < len(messages):
            raise ConversationError(f"the conversation has no message {index + 1}", "rate an answer it shows")
        self.rate(owner, messages[index].id, rating, comment)

    # ---- export ----

    def export_json(self, owner: str, conversation_id: str) -> dict[str, Any]:
        """The conversation with its settings and every message (sources and feedback included)."""
        conv = self.get(owner, conversation_id)
        return {
            "id": conv.id,
            "title": conv.title,
            "kb": conv.kb,
            "system_prompt": conv.system_prompt,
            "settings": conv.settings,
            "created": conv.created,
            "updated": conv.updated,
            "messages": [
                {
                    "id": m.id,
                    "role": m.role,
                    "content": m.content,
                    "sources": m.sources,
                    "rating": m.rating,
                    "comment": m.comment,
                }
                for m in self.messages(owner, conversation_id)
            ],
        }

    def export_markdown(self, owner: str, conversation_id: str) -> str:
        data = self.export_json(owner, conversation_id)
        lines = [f"# {data['title'] or conversation_id}", ""]
        if data["kb"]:
            lines += [f"知识库 Knowledge base: {data['kb']}", ""]
        for m in data["messages"]:
            who = "**问 Q:**" if m["role"] == "user" else "**答 A:**"
            lines += [f"{who} {m['content']}", ""]
            for n, src in enumerate(m["sources"], 1):
                page = f" p.{src['page']}" if src.get("page") else ""
                lines.append(f"> [{n}] {src.get('file', '')}{page}")
            if m["sources"]:
                lines.append("")
            if m["rating"]:
                note = f" — {m['comment']}" if m["comment"] else ""
                lines += [("👍" if m["rating"] > 0 else "👎") + note, ""]
        return "\n".join(lines).rstrip() + "\n"

    def _row(self, db: sqlite3.Connection, owner: str, conversation_id: str) -> tuple[Any, ...]:
        row = db.execute(
            "SELECT * FROM conversations WHERE id = ? AND owner = ?", (check_id(conversation_id), owner)
        ).fetchone()
        if row is None:
            raise ConversationError(f"no conversation {conversation_id}", "pick one from the list")
        return tuple(row)


def _title(title: str) -> str:
    flat = " ".join(str(title).split())
    if len(flat) > MAX_TITLE:
        raise ConversationError(f"the title is {len(flat)} characters long; use at most {MAX_TITLE}")
    return flat


def _conversation(row: Sequence[Any]) -> Conversation:
    cid, _owner, title, kb, system_prompt, settings, created, updated = row
    return Conversation(cid, title, kb, system_prompt, json.loads(settings), created, updated)
