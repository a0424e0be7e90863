"""The UI's saved conversations, as plain functions over :class:`app.conversations.ConversationStore`
(tested without a browser; :mod:`app.ui` wires them to the sidebar).

A browser session only holds the id of the conversation it shows (in the browser's storage, so a reload
reopens it); everything else is in the store, read and written as the logged-in user (``owner``).
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from app.conversations import ConversationChanged, ConversationError, ConversationStore
from app.ui_handlers import NO_KB, ChatControls, kb_name, model_text, plain_chat, readable, safe_markdown

GENERATION = ("temperature", "top_p", "top_k", "max_new_tokens", "seed", "retrieval_k")
UNTITLED = "（未命名 untitled）"

Choices = list[tuple[str, str]]  # (label, conversation id), newest first


def day_label(when: float, today: dt.date) -> str:
    day = dt.datetime.fromtimestamp(when).date()
    if day == today:
        return "今天 Today"
    if day == today - dt.timedelta(days=1):
        return "昨天 Yesterday"
    return day.isoformat()


def choices(store: ConversationStore, owner: str, query: str = "", today: dt.date | None = None) -> Choices:
    """The sidebar's entries: ``day · title``, most recently used first (so grouped by day)."""
    today = today or dt.date.today()
    return [
        (f"{day_label(c.updated, today)} · {c.title or UNTITLED}", c.id)
        for c in store.conversations(owner, query or "")
    ]


@dataclass(frozen=True)
class Saved:
    conversation_id: str  # "" while the chat is empty and nothing was saved
    choices: Choices | None  # None: the sidebar is unchanged
    warning: str | None = None


CHANGED_ELSEWHERE = (
    "这个对话在别处（另一个标签页）改过了，本次对话另存为新对话 / "
    "the conversation changed elsewhere (another tab): this chat was saved as a new conversation"
)


def _rows(chat: Sequence[Any] | None) -> list[tuple[str, str]]:
    return [(m["role"], model_text(m["content"])) for m in plain_chat(chat)]


def save(
    store: ConversationStore,
    owner: str,
    conversation_id: str | None,
    chat: Sequence[Any] | None,
    controls: ChatControls,
    based_on: Sequence[Any] | None = None,
) -> Saved:
    """Store the chat as shown, with the settings it was answered with, in the session's conversation (a
    new one when it has none yet, or when its conversation was deleted meanwhile). ``based_on``: the chat
    the answer started from; when the conversation no longer holds it (another tab went on with it), the
    chat is saved as a new conversation rather than over the other tab's messages."""
    messages = _rows(chat)
    cid = conversation_id or ""
    if not messages and not cid:
        return Saved("", None)
    kb = kb_name(controls.kb)
    system_prompt = (controls.system_prompt or "").strip()
    settings = {name: getattr(controls, name) for name in GENERATION if getattr(controls, name) is not None}
    warning = None
    try:
        if cid:
            try:
                store.save_messages(owner, cid, messages, settings, None if based_on is None else _rows(based_on))
                store.update(owner, cid, kb=kb, clear_kb=kb is None, system_prompt=system_prompt)
                return Saved(cid, choices(store, owner))
            except ConversationChanged:
                warning = CHANGED_ELSEWHERE
            except ConversationError:
                pass  # deleted meanwhile: saved as a new one
        if not messages:
            return Saved("", choices(store, owner))
        cid = store.create(owner, kb=kb, system_prompt=system_prompt, settings=settings).id
        store.save_messages(owner, cid, messages, settings)
        return Saved(cid, choices(store, owner), warning)
    except ConversationError as err:
        return Saved(cid, None, f"the conversation was not saved: {readable(err)}")


@dataclass(frozen=True)
class Opened:
    conversation_id: str
    chat: list[dict[str, str]]
    controls: ChatControls  # what the conversation was answered with; None fields: the config's default
    warning: str | None = None
    title: str = ""


def open_conversation(store: ConversationStore, owner: str, conversation_id: str | None) -> Opened:
    """The conversation's chat and settings; an empty chat (and a warning when an id was given) when it
    cannot be opened, e.g. deleted in another tab."""
    if not conversation_id:
        return Opened("", [], ChatControls())
    try:
        conv = store.get(owner, conversation_id)
        messages = store.messages(owner, conversation_id)
    except ConversationError as err:
        return Opened("", [], ChatControls(), readable(err))
    known = {f.name for f in fields(ChatControls)}
    generation = {k: v for k, v in conv.settings.items() if k in GENERATION and k in known}
    controls = ChatControls(kb=conv.kb or NO_KB, system_prompt=conv.system_prompt, **generation)
    chat = [{"role": m.role, "content": safe_markdown(m.content)} for m in messages]
    return Opened(conv.id, chat, controls, title=conv.title)


def safe_choices(store: ConversationStore, owner: str, query: str = "") -> tuple[Choices, str | None]:
    """:func:`choices`, or none and the reason when the store cannot be read."""
    try:
        return choices(store, owner, query), None
    except ConversationError as err:
        return [], readable(err)


def rename(store: ConversationStore, owner: str, conversation_id: str | None, title: str | None) -> Saved:
    if not conversation_id:
        return Saved("", None, "no conversation is open: ask something first, or pick one from the list")
    try:
        store.update(owner, conversation_id, title=title or "")
        return Saved(conversation_id, choices(store, owner))
    except ConversationError as err:
        return Saved(conversation_id, None, readable(err))


def delete(store: ConversationStore, owner: str, conversation_id: str | None) -> Saved:
    """Delete the open conversation; the session then has none (its chat is cleared by the caller)."""
    if not conversation_id:
        return Saved("", None, "no conversation is open")
    try:
        store.delete(owner, conversation_id)
        return Saved("", choices(store, owner))
    except ConversationError as err:
        return Saved(conversation_id, None, readable(err))


def export(
    store: ConversationStore,
    owner: str,
    conversation_id: str | None,
    kind: Literal["md", "json"],
    folder: Path | None = None,
) -> tuple[Path | None, str | None]:
    """(a file holding the conversation as Markdown or JSON, None) or (None, why not)."""
    if not conversation_id:
        return None, "no conversation is open: ask something first, or pick one from the list"
    try:
        if kind == "md":
            text = store.export_markdown(owner, conversation_id)
        else:
            text = json.dumps(store.export_json(owner, conversation_id), ensure_ascii=False, indent=1)
    except ConversationError as err:
        return None, readable(err)
    # the id is checked by the store (16 hex digits): safe in a file name
    folder = folder or Path(tempfile.mkdtemp(prefix="zhiku-export-"))
    path = folder / f"conversation-{conversation_id}.{kind}"  # rewritten by the next export of it
    path.write_text(text, encoding="utf-8")
    return path, None


def feedback(
    store: ConversationStore, owner: str, conversation_id: str | None, index: Any, liked: bool | str
) -> str | None:
    """Store 👍 (``liked`` True) or 👎 (False) on the answer at ``index`` of the open conversation (any
    other feedback text is kept as the comment); the warning to show, or None."""
    if not conversation_id or not isinstance(index, int):
        return "this answer is not saved yet: wait until it is complete"
    rating = 1 if liked is True else -1 if liked is False else None
    comment = liked if isinstance(liked, str) else ""
    try:
        store.rate_at(owner, conversation_id, index, rating, comment)
    except ConversationError as err:
        return readable(err)
    return None
