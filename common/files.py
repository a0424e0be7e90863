"""Atomic file writes: readers see the old file or the new one, never half of one. Small JSON files (users,
API keys, who owns which base) read and written that way."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from common.errors import ZhikuError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Have ``write`` fill a temp file in the same folder, then fsync and rename it to ``path``.

    The temp file is created with mode 0666, so the kernel applies the umask (and default ACLs) as for any
    other file of the data dir; mkstemp's fixed 0600 would hide a shared knowledge base's index from the
    users who may read its docstore. A writer killed half way leaves only a ``.NAME.*.tmp`` file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json_object(path: Path, error: type[ZhikuError]) -> dict[str, Any]:
    """The JSON object in ``path`` ({} when there is no file); a file that cannot be read, or holds no JSON
    object, raises ``error`` naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"cannot read {path}: {err}", f"fix or move {path.name} aside") from err
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object", f"fix or move {path.name} aside")
    return data


def write_json_object(path: Path, data: dict[str, Any], error: type[ZhikuError]) -> None:
    """Write ``data`` to ``path`` atomically (its folder made if missing); a failure raises ``error``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True).encode("utf-8"))
    except OSError as err:
        raise error(
            f"cannot save {path} ({err.strerror or err})", f"give the user running Zhiku write access to {path.parent}"
        ) from err
