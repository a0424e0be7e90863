"""Uploaded files: safe names, type and size checks, and where they are kept (``<data_dir>/uploads/<kb>``)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Sequence
from pathlib import Path

from knowledge.catalog import validate_name

_UNSAFE_NAME_CHARS = re.compile(r'[<>:"|?*]')


def safe_filename(raw: str) -> str:
    """The base name of an uploaded file, without directories, control characters or leading dots."""
    name = unicodedata.normalize("NFC", raw.replace("\\", "/").rsplit("/", 1)[-1])
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = _UNSAFE_NAME_CHARS.sub("_", name).strip().lstrip(".").rstrip(". ")
    if not name:
        raise ValueError(f"unusable file name {raw!r}")
    while len(name.encode("utf-8")) > 200:  # most file systems allow 255 bytes
        suffix = Path(name).suffix
        name = name[: len(name) - len(suffix) - 1] + suffix
    return name


def check_uploads(
    paths: Sequence[str | Path], extensions: Collection[str], max_upload_mb: float
) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Uploaded files by their safe name, and (name, reason) for those refused: unusable names, types no
    loader reads, files over the size limit, and anything that is not a regular file."""
    rejected: list[tuple[str, str]] = []
    accepted: dict[str, Path] = {}
    for raw in paths:
        src = Path(raw)
        try:
            filename = safe_filename(src.name)
        except ValueError as err:
            rejected.append((src.name, str(err)))
            continue
        if Path(filename).suffix.lower() not in extensions:
            supported = ", ".join(sorted(extensions))
            rejected.append((filename, f"不支持的文件类型 / unsupported type; 支持 supported: {supported}"))
        elif src.is_symlink() or not src.is_file():
            rejected.append((filename, "不是普通文件 / not a regular file"))
        elif (size_mb := src.stat().st_size / 2**20) > max_upload_mb:
            rejected.append(
                (filename, f"{size_mb:.1f} MB，超过上传上限 / over the upload limit of {max_upload_mb:g} MB")
            )
        else:
            accepted[filename] = src
    return accepted, rejected


def uploads_folder(data_dir: Path, kb: str) -> Path:
    return data_dir / "uploads" / validate_name(kb)


def upload_destination(data_dir: Path, kb: str, filename: str) -> Path:
    """Where an uploaded file is stored: ``<data_dir>/uploads/<kb>/<safe name>``. Raises ValueError when the
    name is unusable or the place is not directly in that folder (e.g. a symbolic link as the knowledge
    base's folder or in place of the file). ``uploads`` itself may be a link an administrator made."""
    uploads = data_dir / "uploads"
    folder = uploads_folder(data_dir, kb)
    dest = folder / safe_filename(filename)
    for path in (folder, dest):
        if path.is_symlink():
            raise ValueError(f"{path.name}: a symbolic link in the uploads folder; remove it")
    if dest.resolve().parent != folder.resolve() or folder.resolve().parent != uploads.resolve():
        raise ValueError(f"{dest.name}: unsafe file name")
    return dest
