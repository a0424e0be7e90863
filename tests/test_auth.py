"""Login back-off and the hash command (hostile-use finding 13 of issue 10: ~17 guesses/s, no back-off)."""

from __future__ import annotations

import asyncio
import subprocess

from app.auth import MAX_FAILED_LOGIN_DELAY_S, LoginThrottle, hash_password, make_auth, verify_password
from tests.conftest import REPO

HASH = hash_password("right", n=2**4)


def test_each_failure_doubles_the_wait_and_a_success_resets_it() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    auth = make_auth([("alice", HASH)], LoginThrottle(sleep))

    async def attempts() -> list[bool]:
        results = [await auth("alice", "wrong") for _ in range(12)]
        results.append(await auth("alice", "right"))
        results.append(await auth("alice", "right"))
        return results

    results = asyncio.run(attempts())
    assert results == [False] * 12 + [True, True]
    assert waits[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert waits[-1] == MAX_FAILED_LOGIN_DELAY_S and len(waits) == 12  # no wait after the success


def test_concurrent_guesses_for_one_name_and_for_unknown_names_queue_up() -> None:
    """Guesses sent at once do not run in parallel: each waits for the one before it and its back-off."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    auth = make_auth([("alice", HASH)], LoginThrottle(sleep))

    async def burst(names: list[str]) -> list[bool]:
        return list(await asyncio.gather(*(auth(name, "wrong") for name in names)))

    assert asyncio.run(burst(["alice"] * 6)) == [False] * 6
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0]
    waits.clear()
    assert asyncio.run(burst([f"nobody{i}" for i in range(4)])) == [False] * 4
    assert waits == [0.5, 1.0, 2.0]  # unknown names share one back-off
    assert verify_password("right", HASH)


def test_the_hash_command_has_help_and_never_hangs_without_a_terminal(python: str) -> None:
    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, "-m", "app.auth", *args], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=60
        )

    helped = run("--help")
    assert helped.returncode == 0 and "password_hash" in helped.stdout
    no_tty = run()
    assert no_tty.returncode != 0 and "--stdin" in no_tty.stderr and "Traceback" not in no_tty.stderr
    piped = run("--stdin", stdin="s3cret\n")
    assert piped.returncode == 0 and verify_password("s3cret", piped.stdout.strip())
