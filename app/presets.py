"""System-prompt presets, shared by every browser session of a data dir.

Stored as one JSON object ``{name: text}`` in ``<data_dir>/presets.json``, rewritten atomically (a temp
file in the same folder, then ``os.replace``) so a crash never leaves half a file. Names are JSON keys,
never file paths; they are validated anyway so that they stay printable and unambiguous.
"""

from __future__ import annotations

import hashlib
import json
import threading
import unicodedata
from pathlib import Path

from common.errors import ZhikuError
from common.files import atomic_write_bytes

FILE_NAME = "presets.json"
MAX_NAME = 64
MAX_TEXT = 20_000


class PresetError(ZhikuError, ValueError):
    """A preset that cannot be read, saved or found; the message says why and what to do."""


def validate_preset_name(name: str) -> str:
    """Return the name without surrounding whitespace, or raise PresetError saying what is wrong."""
    if not isinstance(name, str):
        raise PresetError("preset name must be text")
    name = name.strip()
    if not name:
        raise PresetError("preset name is empty: give the preset a name (1-64 characters)")
    if len(name) > MAX_NAME:
        raise PresetError(f"preset name is {len(name)} characters long; use at most {MAX_NAME}")
    if "/" in name or "\\" in name:
        raise PresetError(f"preset name {name!r} must not contain '/' or '\\'")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise PresetError(f"preset name {name!r} must not contain control characters")
    if name in (".", ".."):
        raise PresetError(f"preset name {name!r} is not allowed")
    return name


class PresetStore:
    """CRUD on ``<data_dir>/presets.json`` (``owner`` "": no login) or on a logged-in user's own file
    ``<data_dir>/presets-<hash of the name>.json`` (a user name never becomes a path); safe to share between
    the threads of one process."""

    def __init__(self, data_dir: Path | str, owner: str = "") -> None:
        name = FILE_NAME
        if owner:
            name = f"presets-{hashlib.sha256(owner.encode('utf-8')).hexdigest()[:16]}.json"
        self.path = Path(data_dir) / name
        self._lock = threading.Lock()

    def _read(self) -> dict[str, str]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise PresetError(f"cannot read presets from {self.path.name}: {err.strerror or err}") from None
        try:
            data = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as err:
            raise PresetError(f"{self.path.name} is not valid JSON ({err.msg}); fix or delete it") from None
        if not isinstance(data, dict):
            raise PresetError(f"{self.path.name} must hold a JSON object of name: text")
        return {str(k): str(v) for k, v in data.items()}

    def _write(self, data: dict[str, str]) -> None:
        text = json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, text.encode("utf-8"))
        except OSError as err:  # a read-only data dir, a full disk: say which and what to do
            raise PresetError(
                f"cannot save presets to {self.path} ({err.strerror or err})",
                f"give the user running Zhiku write access to {self.path.parent}, or free disk space",
            ) from err

    def list(self) -> dict[str, str]:
        """All presets, sorted by name."""
        with self._lock:
            return dict(sorted(self._read().items()))

    def get(self, name: str) -> str:
        with self._lock:
            data = self._read()
        return data[_existing(data, name)]

    def save(self, name: str, text: str) -> str:
        """Create or replace a preset; returns the (stripped) name it was saved under."""
        name = validate_preset_name(name)
        if not isinstance(text, str) or not text.strip():
            raise PresetError("preset text is empty: write the system prompt first")
        if "\x00" in text:
            raise PresetError("preset text must not contain NUL characters")
        if len(text) > MAX_TEXT:
            raise PresetError(f"preset text is {len(text)} characters long; use at most {MAX_TEXT}")
        with self._lock:
            data = self._read()
            data[name] = text
            self._write(data)
        return name

    def delete(self, name: str) -> None:
        with self._lock:
            data = self._read()
            del data[_existing(data, name)]
            self._write(data)


def _existing(data: dict[str, str], name: str) -> str:
    name = validate_preset_name(name)
    if name not in data:
        raise PresetError(f"no preset named {name!r}", "pick one from the list, or save it first")
    return name
