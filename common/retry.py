"""When to send a request to an HTTP server again, and after how long: shared by the clients of remote
servers (knowledge/embed_remote.py, llms/openai_backend.py)."""

from __future__ import annotations

import email.utils
import math
import random
import time
from typing import Any

# What a busy, overloaded or restarting server answers (5xx but 501 Not Implemented): worth another try.
RETRY_STATUSES = frozenset({408, 429, *range(500, 600)} - {501})


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """The wait a ``Retry-After`` header asks for (seconds or an HTTP date; 0 for a date gone by), or None
    when there is none or it cannot be read."""
    if not value:
        return None
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, IndexError):
            return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def retry_delay(
    retry: int, backoff: float, retry_after: str | None = None, now: float | None = None, cap: float = 60.0
) -> float:
    """Seconds to wait before retry number ``retry`` (0 for the first): the server's ``Retry-After`` when it
    sent one, else ``backoff * 2**retry`` less up to half of it at random, so that requests failing together
    do not come back together; never more than ``cap``."""
    asked = retry_after_seconds(retry_after, now)
    if asked is not None:
        return min(asked, cap)
    return min(backoff * 2**retry * (1.0 - random.random() / 2), cap)


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters (an error message quoting a server)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def server_error_message(body: Any, fallback: str) -> str:
    """A server's own words about an error, on one line: OpenAI's and vLLM's ``{"error": {"message": ...}}``,
    older vLLM's ``{"message": ...}``, TEI's ``{"error": "..."}``, FastAPI's ``{"detail": ...}``; else
    ``fallback`` (the response's text). Empty when neither says anything."""
    found: Any = None
    if isinstance(body, dict):
        found = body.get("error") or body.get("detail") or body.get("message")
        if isinstance(found, dict):
            found = found.get("message")
    return one_line(str(found) if found else fallback)
