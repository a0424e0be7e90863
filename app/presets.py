"""System-prompt presets, shared by every browser session of a data dir.

Stored as one JSON object ``{name: text}`` in ``<data_dir>/presets.json``, rewritten atomically (a temp
file in the same folder, then ``os.replace``) so a crash never leaves half a file. Names are JSON keys,
never file paths; they are validated anyway so that they stay printable and unambiguous.
"""

from __future__ import annotations

import json
import threading
import unicodedata
from pathlib import Path

FILE_NAME = "presets.json"
MAX_NAME = 64
MAX_TEXT = 20_000


def validate_preset_name(name: str) -> str:
    """Return the name without surrounding whitespace, or raise ValueError saying what is wrong."""
    if not isinstance(name, str):
        raise ValueError("preset name must be text")
    name = name.strip()
    if not name:
        raise ValueError("preset name is empty: give the preset a name (1-64 characters)")
    if len(name) > MAX_NAME:
        raise ValueError(f"preset name is {len(name)} characters long; use at most {MAX_NAME}")
    if "/" in name or "\\" in name:
        raise ValueError(f"preset name {name!r} must not contain '/' or '\\'")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise ValueError(f"preset name {name!r} must not contain control characters")
    if name in (".", ".."):
        raise ValueError(f"preset name {name!r} is not allowed")
    return name


class PresetStore:
    """CRUD on ``<data_dir>/presets.json``; safe to share between the threads of one process."""

    def __init__(self, data_dir: Path | str) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._lock = threading.Lock()

    def _read(self) -> dict[str, str]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise ValueError(f"cannot read presets from {self.path.name}: {err.strerror or err}") from None
        try:
            data = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path.name} is not valid JSON ({err.msg}); fix or delete it") from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.path.name} must hold a JSON object of name: text")
        return {str(k): str(v) for k, v in data.items()}

    def _write(self, data: dict[str, str]) -> None:
        from knowledge.store import atomic_write_bytes

        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True)
        atomic_write_bytes(self.path, text.encode("utf-8"))

    def list(self) -> dict[str, str]:
        """All presets, sorted by name."""
        with self._lock:
            return dict(sorted(self._read().items()))

    def get(self, name: str) -> str:
        name = validate_preset_name(name)
        with self._lock:
            data = self._read()
        if name not in data:
            raise ValueError(f"no preset named {name!r}")
        return data[name]

    def save(self, name: str, text: str) -> str:
        """Create or replace a preset; returns the (stripped) name it was saved under."""
        name = validate_preset_name(name)
        if not isinstance(text, str) or not text.strip():
            raise ValueError("preset text is empty: write the system prompt first")
        if "\x00" in text:
            raise ValueError("preset text must not contain NUL characters")
        if len(text) > MAX_TEXT:
            raise ValueError(f"preset text is {len(text)} characters long; use at most {MAX_TEXT}")
        with self._lock:
            data = self._read()
            data[name] = text
            self._write(data)
        return name

    def delete(self, name: str) -> None:
        name = validate_preset_name(name)
        with self._lock:
            data = self._read()
            if name not in data:
                raise ValueError(f"no preset named {name!r}")
            del data[name]
            self._write(data)
