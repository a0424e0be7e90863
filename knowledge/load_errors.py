"""LoadError, and opening a file only when it is a regular one: shared by the text and PDF loaders and by
load_file (knowledge.loaders re-exports LoadError; import it from there)."""

from __future__ import annotations

import os
import stat
from io import BufferedReader
from pathlib import Path

from common.errors import ZhikuError

__all__ = ["LoadError", "not_regular", "one_line", "open_regular", "os_error"]


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class LoadError(ZhikuError):
    """One bad file. str(err) is ONE line that names the file, says what is wrong and how to fix it,
    e.g. "encrypted.pdf: the PDF is password-protected; remove the password (e.g. qpdf --decrypt) and
    ingest again"."""

    def __init__(self, path: Path, reason: str, fix: str = "") -> None:
        path = Path(path)
        reason = one_line(reason)
        super().__init__(f"{path.name}: {reason}", fix)
        # The name exactly as it is (ZhikuError folds runs of spaces): the user has to find the file.
        self.message = f"{path.name}: {reason}"
        # args are the constructor's arguments, so the error pickles across process pools.
        self.args = (path, reason, self.fix)
        self.path = path
        self.reason = reason


def os_error(path: Path, err: OSError) -> LoadError:
    return LoadError(
        path,
        f"cannot read the file ({err.strerror or type(err).__name__})",
        "check that it exists and that you may read it",
    )


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "an unknown kind of file"


NOT_REGULAR_FIX = "remove it, or pass a file, not a folder, pipe or device (Zhiku never reads pipes or devices)"


def not_regular_reason(mode: int) -> str:
    return f"not a regular file ({_kind(mode)})"


def not_regular(path: Path, mode: int) -> LoadError | None:
    """The LoadError for anything but a regular file (``mode`` from os.stat), else None."""
    if stat.S_ISREG(mode):
        return None
    return LoadError(path, not_regular_reason(mode), NOT_REGULAR_FIX)


# O_NONBLOCK: a FIFO swapped in after the stat must not block the open (fstat then refuses it); O_NOCTTY: a
# terminal swapped in must not become ours. getattr: Windows has neither.
_OPEN_FLAGS = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def open_regular(path: Path) -> BufferedReader:
    """Open a regular file for reading; LoadError for anything else, at once.

    Opening a FIFO blocks until a writer comes, and reading a device (/dev/zero) never ends, so the type is
    checked before opening, and again with fstat on what was really opened. Regular files ignore
    O_NONBLOCK: reads block and return whole as usual.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode  # follows a symbolic link: what it points to must be a file
    except OSError as err:
        raise os_error(path, err) from err
    error = not_regular(path, mode)
    if error is not None:
        raise error
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError as err:
        raise os_error(path, err) from err
    try:
        error = not_regular(path, os.fstat(fd).st_mode)
    except OSError as err:
        os.close(fd)
        raise os_error(path, err) from err
    if error is not None:
        os.close(fd)
        raise error
    return os.fdopen(fd, "rb")
