"""API keys for the HTTP API (``python -m app keys create|list|revoke``).

A key is ``zk-<id>-<secret>``: ``id`` (8 hex digits) names it in lists and revocations, ``secret`` is 32 random
bytes (urlsafe base64). Only SHA-256 of the secret is stored, in ``<data_dir>/api_keys.json`` (rewritten
atomically), with the user it acts for, a label and when it was made. A fast hash is enough: the secret is
random and long, so there is nothing to guess from its hash (passwords, which people choose, get scrypt).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.users import validate_user_name
from common.errors import ZhikuError
from common.files import read_json_object, write_json_object

FILE_NAME = "api_keys.json"
_KEY = re.compile(r"zk-([0-9a-f]{8})-([A-Za-z0-9_-]{20,100})")


class ApiKeyError(ZhikuError, ValueError):
    """A key that cannot be made, revoked or read; the message says why and what to do."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    user: str
    label: str
    created: float


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, data_dir: Path | str) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict[str, Any]]:
        data = read_json_object(self.path, ApiKeyError)
        if not all(isinstance(v, dict) for v in data.values()):
            raise ApiKeyError(f"{self.path} must hold a JSON object of key id: key", f"move {self.path.name} aside")
        return data

    def create(self, user: str, label: str = "") -> tuple[ApiKey, str]:
        """A new key for ``user``: (its record, the key itself, which is shown this once and never stored)."""
        user = validate_user_name(user)
        with self._lock:
            data = self._read()
            key_id = secrets.token_hex(4)
            while key_id in data:
                key_id = secrets.token_hex(4)
            secret = secrets.token_urlsafe(32)
            key = ApiKey(key_id, user, " ".join(label.split())[:100], time.time())
            data[key_id] = {**asdict(key), "sha256": _digest(secret)}
            write_json_object(self.path, data, ApiKeyError)
        return key, f"zk-{key_id}-{secret}"

    def list(self, user: str | None = None) -> list[ApiKey]:
        with self._lock:
            data = self._read()
        keys = [
            ApiKey(k, str(v.get("user", "")), str(v.get("label", "")), float(v.get("created", 0)))
            for k, v in data.items()
        ]
        return sorted((k for k in keys if user is None or k.user == user), key=lambda k: (k.user, k.created))

    def revoke(self, key_id: str) -> ApiKey:
        with self._lock:
            data = self._read()
            found = data.pop(key_id.strip(), None)
            if found is None:
                raise ApiKeyError(f"no API key {key_id!r}", "see `python -m app keys list` for the ids")
            write_json_object(self.path, data, ApiKeyError)
        return ApiKey(key_id.strip(), str(found.get("user", "")), str(found.get("label", "")), float(found["created"]))

    def user_of(self, token: str) -> str | None:
        """The user a presented key acts for; None for a malformed, unknown or revoked key."""
        match = _KEY.fullmatch(token.strip())
        if match is None:
            return None
        with self._lock:
            found = self._read().get(match[1])
        if found is None or not hmac.compare_digest(str(found.get("sha256", "")), _digest(match[2])):
            return None
        return str(found.get("user", "")) or None
