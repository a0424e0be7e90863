"""UI accounts managed from the command line (``python -m app users add|remove|list``).

Stored as ``{name: password hash}`` in ``<data_dir>/users.json`` (hashes from :func:`app.auth.hash_password`,
never passwords), rewritten atomically. ``serve`` logs in the users of this file together with those of
``server.users`` in config.yml; a name in both is a configuration error, not a silent override.
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from app.auth import AuthConfigError, hash_password
from common.errors import ZhikuError
from common.files import read_json_object, write_json_object

FILE_NAME = "users.json"
MAX_NAME = 64


class UserError(ZhikuError, ValueError):
    """A user that cannot be added, removed or read; the message says why and what to do."""


def validate_user_name(name: str) -> str:
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        raise UserError("the user name is empty")
    if len(name) > MAX_NAME:
        raise UserError(f"the user name is {len(name)} characters long; use at most {MAX_NAME}")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise UserError(f"the user name {name!r} must not contain control characters")
    return name


class UserStore:
    def __init__(self, data_dir: Path | str) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._lock = threading.Lock()

    def _read(self) -> dict[str, str]:
        data = read_json_object(self.path, UserError)
        if not all(isinstance(v, str) for v in data.values()):
            raise UserError(f"{self.path} must hold a JSON object of name: password hash")
        return {str(k): v for k, v in data.items()}

    def _write(self, data: dict[str, str]) -> None:
        write_json_object(self.path, dict(data), UserError)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._read())

    def logins(self) -> list[tuple[str, str]]:
        """(name, password hash) pairs, for the UI's login."""
        with self._lock:
            return sorted(self._read().items())

    def add(self, name: str, password: str, *, replace: bool = False) -> str:
        """Store ``name`` with the hash of ``password``; an existing name needs ``replace``."""
        name = validate_user_name(name)
        if not password:
            raise UserError("the password is empty")
        with self._lock:
            data = self._read()
            if name in data and not replace:
                raise UserError(f"user {name!r} exists", "use --replace to set a new password")
            data[name] = hash_password(password)
            self._write(data)
        return name

    def remove(self, name: str) -> None:
        name = validate_user_name(name)
        with self._lock:
            data = self._read()
            if name not in data:
                raise UserError(f"no user {name!r} in {self.path.name}", "list them with: python -m app users list")
            del data[name]
            self._write(data)


def all_logins(configured: Iterable[tuple[str, str]], store: UserStore) -> list[tuple[str, str]]:
    """The users of config.yml and of the data dir's users.json; a name in both is an error."""
    configured = list(configured)
    stored = store.logins()
    both = sorted({n for n, _ in configured} & {n for n, _ in stored})
    if both:
        raise AuthConfigError(
            f"UI user {both[0]!r} is both in server.users (config.yml) and in {store.path}",
            f"remove it from one of them (python -m app users remove {both[0]})",
        )
    return configured + stored
