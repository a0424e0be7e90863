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
import logging
import os
from collections.abc import Awaitable, Callable, Iterable

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


def make_auth(
    users: Users, throttle: LoginThrottle | None = None
) -> Callable[[str, str], Awaitable[bool]]:
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
