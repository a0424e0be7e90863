"""Who may see and change which knowledge base when login is on.

A base a logged-in user creates in the browser is theirs: private (only they see it) or shared (everyone
reads it); only they change it (upload, remove a file, delete). A base made with the CLI has no owner: every
user reads it, and it is changed with the CLI. Without login (owner ``""``) there are no rules.

Stored as ``{base: {"owner": name, "private": bool}}`` in ``<data_dir>/kb_access.json``, rewritten
atomically. Every entry point (the UI now, the HTTP API next) asks this service before it lists, reads or
changes a base for a user.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from common.errors import ZhikuError
from common.files import read_json_object, write_json_object

FILE_NAME = "kb_access.json"


class AccessError(ZhikuError, PermissionError):
    """A user asked for a base they may not see or change."""


class KbAccess:
    def __init__(self, data_dir: Path | str) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict[str, object]]:
        return read_json_object(self.path, AccessError)

    def _write(self, data: dict[str, dict[str, object]]) -> None:
        write_json_object(self.path, dict(data), AccessError)

    def entry(self, kb: str) -> tuple[str, bool] | None:
        """(owner, private) of a base a user created in the browser; None for one made with the CLI."""
        with self._lock:
            found = self._read().get(kb)
        if not isinstance(found, dict):
            return None
        return str(found.get("owner", "")), bool(found.get("private", True))

    def visible(self, owner: str, names: Iterable[str]) -> list[str]:
        """The bases of ``names`` that ``owner`` may see."""
        with self._lock:
            data = self._read()
        out = []
        for name in names:
            found = data.get(name)
            if (
                not owner
                or not isinstance(found, dict)
                or not found.get("private", True)
                or found.get("owner") == owner
            ):
                out.append(name)
        return out

    def check_read(self, owner: str, kb: str) -> None:
        if not self.visible(owner, [kb]):
            raise AccessError(f"no knowledge base {kb!r}", "pick one from the list")  # as if it did not exist

    def check_write(self, owner: str, kb: str, exists: bool) -> None:
        """May ``owner`` upload into, remove files from or delete ``kb``? A name no base and no user holds
        may be taken by anyone (it becomes theirs: :meth:`claim`, before the first file goes in)."""
        if not owner:
            return
        found = self.entry(kb)
        if not exists:
            if found is not None and found[0] != owner:  # reserved by someone whose base is on its way
                raise AccessError(f"the name {kb!r} is taken", "choose another name for your knowledge base")
            return
        self.check_read(owner, kb)
        if found is None:
            raise AccessError(
                f"knowledge base {kb!r} is shared read-only (it was made with the command line)",
                "change it with `python -m app ingest`, or upload into a base of your own",
            )
        if found[0] != owner:
            raise AccessError(f"knowledge base {kb!r} belongs to another user", "upload into a base of your own")

    def reserve(self, owner: str, kb: str, exists: bool) -> None:
        """Before files go into ``kb``: :meth:`check_write`, and a new base becomes ``owner``'s (:meth:`claim`)."""
        self.check_write(owner, kb, exists)
        if not exists:
            self.claim(owner, kb)

    def claim(self, owner: str, kb: str, private: bool = True) -> None:
        """Record that ``owner`` creates ``kb``: called before its first file is ingested, so that the base is
        never visible to others on its way (no-op without login, or when the name already has an owner)."""
        if not owner:
            return
        with self._lock:
            data = self._read()
            if kb not in data:
                data[kb] = {"owner": owner, "private": private}
                self._write(data)

    def set_private(self, owner: str, kb: str, private: bool) -> None:
        with self._lock:
            data = self._read()
            found = data.get(kb)
            if not isinstance(found, dict) or found.get("owner") != owner:
                raise AccessError(f"knowledge base {kb!r} is not yours", "only its owner shares or hides it")
            found["private"] = private
            self._write(data)

    def forget(self, kb: str) -> None:
        """A deleted base: a new one of the same name starts without an owner."""
        with self._lock:
            data = self._read()
            if data.pop(kb, None) is not None:
                self._write(data)
