"""The error every user-facing failure derives from, so each entry point catches one type, once.

``str(err)`` is one line that says what went wrong and how to fix it; ``exit_code`` is what the CLI exits
with (2: bad usage, configuration, knowledge base or backend, as the README documents).
"""

from __future__ import annotations


class ZhikuError(Exception):
    """A failure the user can fix; the message names the thing and the fix."""

    exit_code = 2

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message, fix)
        self.message = " ".join(str(message).split())
        self.fix = " ".join(str(fix).split())

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


class InvalidRequestError(ZhikuError, ValueError):
    """A question, a history or an option that cannot be served as given."""


class BackendUnavailableError(ZhikuError, ConnectionError):
    """An LLM or embedding backend cannot be reached or loaded."""
