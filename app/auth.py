"""Optional login for the web UI: salted scrypt password hashes, never the passwords themselves.

A stored hash is one string (put it in the config, e.g. ``server.users: [{name, password_hash}]``)::

    scrypt$<n>$<r>$<p>$<salt>$<hash>

``n``, ``r``, ``p`` are scrypt's cost parameters (defaults 2**14, 8, 1: ~16 MB and ~50 ms per check), ``salt``
(16 random bytes) and ``hash`` (32 bytes) are base64. Make one with ``python -m app.auth`` (it asks for the
password twice and prints the hash) or :func:`hash_password`.

Passwords are compared in constant time, an unknown user costs as much as a wrong password, a failed login
waits a moment (to slow guessing), and nothing here logs a password or a hash.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from common.errors import ZhikuError

log = logging.getLogger(__name__)

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1
SALT_BYTES = 16
HASH_BYTES = 32
FAILED_LOGIN_DELAY_S = 0.5  # after the first failure; doubled by each further one, up to the maximum
MAX_FAILED_LOGIN_DELAY_S = 60.0
_MAX_N = 2**20  # refuse stored parameters that would make each check take seconds or gigabytes


class AuthConfigError(ZhikuError, ValueError):
    """The configured UI users cannot be used (a missing name, a name listed twice, a bad hash)."""


class InvalidHashError(AuthConfigError):
    """A stored password hash that is not in the ``scrypt$n$r$p$salt$hash`` format."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 2**20, dklen=length)


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    """The stored form of ``password``: ``scrypt$n$r$p$salt$hash`` with a fresh random salt."""
    if not isinstance(password, str) or not password:
        raise ValueError("the password is empty")
    salt = os.urandom(SALT_BYTES)
    return "$".join([SCHEME, str(n), str(r), str(p), _b64(salt), _b64(_scrypt(password, salt, n, r, p, HASH_BYTES))])


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$") if isinstance(stored, str) else []
    if len(parts) != 6 or parts[0] != SCHEME:
        raise InvalidHashError("a password hash must look like scrypt$n$r$p$salt$hash (see python -m app.auth)")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except (ValueError, binascii.Error) as err:
        raise InvalidHashError("a password hash has a damaged number or base64 part") from err
    if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 0 < r <= 64 and 0 < p <= 16 and salt and len(digest) >= 16):
        raise InvalidHashError("a password hash has out-of-range scrypt parameters")
    return n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the stored hash (constant-time comparison). A malformed stored hash is
    a configuration error: InvalidHashError."""
    n, r, p, salt, digest = _parse(stored)
    if not isinstance(password, str):
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(digest)), digest)


Users = Iterable[tuple[str, str]]


class LoginThrottle:
    """Slows password guessing: checks for one user name run one at a time, and each failure in a row makes
    the next check of that name wait twice as long (0.5 s, 1 s, 2 s, ... up to a minute); a success resets
    it. All unknown names share one entry, so guessing names does not escape the back-off."""

    def __init__(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._sleep = sleep
        self._failures: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def delay(self, key: str) -> float:
        failures = self._failures.get(key, 0)
        return 0.0 if not failures else min(FAILED_LOGIN_DELAY_S * 2 ** (failures - 1), MAX_FAILED_LOGIN_DELAY_S)

    async def attempt(self, key: str, check: Callable[[], Awaitable[bool]]) -> bool:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # concurrent guesses for one name queue up behind each other's delays
            if (wait := self.delay(key)) > 0:
                await self._sleep(wait)
            ok = await check()
            self._failures[key] = 0 if ok else self._failures.get(key, 0) + 1
            return ok


def make_auth(users: Users, throttle: LoginThrottle | None = None) -> Callable[[str, str], Awaitable[bool]]:
    """Gradio's ``auth=`` callable for (name, password hash) pairs. Every hash is checked here, so a bad
    config fails at start-up with the user's name (never the hash). The check runs in a worker thread, so
    a login never stalls the other sessions' streams."""
    table: dict[str, str] = {}
    for name, stored in users:
        if not isinstance(name, str) or not name.strip():
            raise AuthConfigError("a UI user needs a name", "give every entry of server.users a name")
        try:
            _parse(stored)
        except InvalidHashError as err:
            raise InvalidHashError(f"UI user {name!r}: {err}") from None
        if name in table:
            raise AuthConfigError(f"UI user {name!r} is listed twice", "remove one entry from server.users")
        table[name] = stored
    if not table:
        raise AuthConfigError("login is on but no UI users are configured", "add users to server.users")
    decoy = hash_password(os.urandom(16).hex())  # unknown names cost as much as known ones

    def check(username: str, password: str) -> bool:
        stored = table.get(username)
        matched = verify_password(password, stored if stored is not None else decoy)
        return matched and stored is not None

    limiter = throttle or LoginThrottle()

    async def auth(username: str, password: str) -> bool:
        key = username if username in table else "\x00unknown"
        ok = await limiter.attempt(key, lambda: asyncio.to_thread(check, username, password))
        if not ok:  # a known name is logged; an unknown one may be a password typed into the wrong box
            log.warning("failed UI login for %s", repr(username) if username in table else "an unknown user")
        return ok

    return auth


# Gradio keys a browser session's queue, streamed messages and gr.State values by a session hash the
# browser makes up, and checks the login but not whose session a hash is: anyone logged in who learns
# another's hash (a log line, a shared screen) could read that session's streamed answers or act in it.
_SESSION_ROUTES = re.compile(r"/(queue/join|queue/data|run/predict|cancel|heartbeat/[^/]+)/?$")
MAX_SESSION_BODY = 64 * 2**20  # a request naming a session (the chat so far, settings): far below this


class SessionOwners:
    """ASGI middleware for a UI with login: a session hash belongs to the user who used it first, and
    another user's request naming it is refused (403). Remembers the latest ``limit`` sessions."""

    def __init__(self, app: Any, limit: int = 100_000) -> None:
        self.app = app
        self.limit = limit
        self._owners: OrderedDict[str, str] = OrderedDict()  # session hash -> user, oldest first

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        gradio_app = scope.get("app")
        tokens = getattr(gradio_app, "tokens", None)
        if scope["type"] != "http" or not tokens or not _SESSION_ROUTES.search(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        cookie_id = getattr(gradio_app, "cookie_id", "")
        user = tokens.get(
            request.cookies.get(f"access-token-{cookie_id}")
            or request.cookies.get(f"access-token-unsecure-{cookie_id}")
        )
        session, body = request.query_params.get("session_hash"), b""
        if match := re.search(r"/heartbeat/([^/]+)/?$", scope["path"]):
            session = match.group(1)
        elif scope["method"] == "POST":
            body = await self._body(receive)
            try:
                named = json.loads(body or b"{}")
            except (UnicodeDecodeError, json.JSONDecodeError):
                named = None  # Gradio answers a malformed body itself
            session = named.get("session_hash") if isinstance(named, dict) else None
        if user is not None and isinstance(session, str) and not self._claim(session, user):
            log.warning("refused %s: session of another user (requested by %r)", scope["path"], user)
            response = JSONResponse({"detail": "this session belongs to another user; reload the page"}, 403)
            await response(scope, receive, send)
            return
        await self.app(scope, self._replay(body, receive) if scope["method"] == "POST" else receive, send)

    def _claim(self, session: str, user: str) -> bool:
        # single-threaded: the event loop runs every call of this, so no lock is needed
        owner = self._owners.setdefault(session, user)
        self._owners.move_to_end(session)
        while len(self._owners) > self.limit:
            self._owners.popitem(last=False)
        return owner == user

    @staticmethod
    async def _body(receive: Any) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= MAX_SESSION_BODY:
                chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks) if size <= MAX_SESSION_BODY else b""

    @staticmethod
    def _replay(body: bytes, receive: Any) -> Any:
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()  # after the body: the disconnect
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay


def main(argv: list[str] | None = None) -> None:
    """``python -m app.auth``: ask for a password (twice) and print its hash for the config."""
    import argparse
    import getpass
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m app.auth",
        description="Print the salted scrypt hash of a password, for server.users[].password_hash in config.yml.",
    )
    parser.add_argument("--stdin", action="store_true", help="read the password from standard input (one line)")
    args = parser.parse_args(argv)
    if args.stdin:
        first = sys.stdin.readline().rstrip("\n")
    elif not sys.stdin.isatty():
        raise SystemExit("error: no terminal to ask for the password; pipe it in with --stdin")
    else:
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            raise SystemExit("error: the passwords differ")
    if not first:
        raise SystemExit("error: the password is empty")
    print(hash_password(first))


if __name__ == "__main__":
    main()
