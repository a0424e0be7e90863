"""Turn files into raw (uncleaned) LangChain Documents: text files of any common Chinese encoding and PDFs.

Every problem with one file becomes a LoadError whose message is one line naming the file, so a bulk
ingest can report it and go on with the next file. The loaders themselves live in knowledge.textfile
(decoding) and knowledge.pdf; this module picks one by extension and is where callers import them from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from langchain_core.documents import Document

from knowledge.load_errors import LoadError, open_regular, os_error
from knowledge.pdf import load_pdf
from knowledge.textfile import decode_bytes, load_text

__all__ = [
    "LoadError",
    "Loader",
    "LoaderRegistry",
    "builtin_loaders",
    "decode_bytes",
    "load_file",
    "load_pdf",
    "load_text",
]

Loader = Callable[[Path], list[Document]]  # a loader returns RAW (uncleaned) pages


def _normalise_extension(extension: str) -> str:
    ext = extension.strip().lower()
    if not ext.startswith("."):
        ext = "." + ext
    if len(ext) < 2 or "/" in ext or "\\" in ext or any(ch.isspace() for ch in ext):
        raise ValueError(f"not a file extension: {extension!r}")
    return ext


class LoaderRegistry:
    """Map from lower-case file extension (with dot, e.g. ".pdf") to Loader. Plugins extend it; registering
    an extension again replaces its loader."""

    def __init__(self, loaders: Mapping[str, Loader] | None = None) -> None:
        self._loaders: dict[str, Loader] = {}
        for extension, loader in (loaders or {}).items():
            self.register(extension, loader)

    def register(self, extension: str, loader: Loader) -> None:
        """Register loader for extension; ".PDF", "pdf" and ".pdf" all mean ".pdf"."""
        self._loaders[_normalise_extension(extension)] = loader

    def loader_for(self, path: Path) -> Loader | None:
        suffix = Path(path).suffix.lower()
        return self._loaders.get(suffix) if suffix else None

    @property
    def extensions(self) -> frozenset[str]:
        return frozenset(self._loaders)


def builtin_loaders() -> dict[str, Loader]:
    return {".txt": load_text, ".md": load_text, ".pdf": load_pdf}


def _supported(extensions: Iterable[str]) -> str:
    return ", ".join(sorted(extensions)) or "none registered"


def load_file(path: Path, registry: LoaderRegistry) -> list[Document]:
    """Pick the loader by extension, check that the file is a regular file (a FIFO or a device fails at
    once instead of blocking), non-empty and readable, and run the loader."""
    path = Path(path)
    loader = registry.loader_for(path)
    if loader is None:
        kind = f"'{path.suffix}'" if path.suffix else "(no extension)"
        raise LoadError(
            path, f"unsupported file type {kind}", f"supported extensions: {_supported(registry.extensions)}"
        )
    # Plugin loaders open the file by name themselves: only a regular file may get that far.
    with open_regular(path) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            fh.read(1)
        except OSError as err:
            raise os_error(path, err) from err
    if size == 0:
        raise LoadError(path, "the file is empty (0 bytes)", "remove it or replace it with a complete copy")
    try:
        return loader(path)
    except OSError as err:
        raise os_error(path, err) from err
