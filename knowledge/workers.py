"""Run a function over items in worker processes, with a time limit per item, surviving crashed workers.

Each worker is a process with its own pipe that runs one item at a time, and has the next one waiting in its
pipe (_QUEUED), so that it never waits for the caller between items. So:

- a stuck item is ended by killing its own worker only: the item waiting behind it has not started, and goes
  to another worker; none is lost or run twice (the killed worker is replaced by a fresh one);
- a worker that dies (``os._exit``, a segfault in a native parser, the OOM killer) fails only the item it ran;
- at most ``(1 + _QUEUED) * workers`` items are taken from ``items`` and not yet yielded (plus the results of
  one round), so memory stays flat whatever the number of items.

Workers start from multiprocessing's fork server where the platform has one: a clean process, started once
per caller process, that imported ``preload`` (the function's module, say), from which each worker forks in
milliseconds. Spawned workers (Windows) import everything again each: on an H200 box, 16 spawned parser workers
were ready only 2.5-4 s into an ingest of 9 s, 12 forked ones at 1.1-1.8 s. Never a plain fork of the caller,
which may hold torch/BLAS threads and locks that do not survive one.

Only public APIs: ``multiprocessing`` processes and pipes, and ``multiprocessing.connection.wait``.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Generic, Literal, TypeVar

from common.errors import ZhikuError

__all__ = ["WorkerFailure", "WorkerStartError", "run_in_workers"]

T = TypeVar("T")
R = TypeVar("R")

_READY = ("ready",)
_STOP = ("stop",)
_END: Any = object()  # no more items
_JOIN_S = 5.0  # a killed process stuck in uninterruptible I/O (a dead NFS mount) is left behind, not awaited
# items waiting in a worker's pipe behind the one it runs. Without one, a worker idles from its reply until the
# caller, a thread among others in a busy process, reads it and sends the next item
_QUEUED = 1


@dataclass(frozen=True)
class WorkerFailure:
    """Why an item has no result: ``timeout`` (over the time limit; its worker was killed), ``crash`` (its
    worker died) or ``error`` (the function raised, or the item or result could not be passed over)."""

    kind: Literal["timeout", "crash", "error"]
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


class WorkerStartError(ZhikuError, RuntimeError):
    """A worker process died before it could run anything (e.g. a fresh interpreter cannot import the
    function): a setup problem, not one item's."""


def _describe(err: BaseException) -> str:
    return (f"{type(err).__name__}: {err}".splitlines() or [""])[0]


def _exit_detail(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _release_fork_server() -> None:
    """A worker forked by the fork server holds, as every client of the server does, the pipe end by which the
    server knows that its clients live: the server would outlive a SIGKILLed caller, and the worker with it
    (_die_with_parent watches the server, its parent). Workers start no processes: let it go. (The attribute is
    CPython's own, read defensively: without it this is a no-op, as it is in a spawned worker.)"""
    from multiprocessing import forkserver

    server: Any = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None


def _die_with_parent() -> None:
    """On Linux, a worker stuck in a parse must not run on forever after its parent was SIGKILLed (the parent
    ends its workers itself in every other case). The parent is the caller, or the fork server, which exits
    when the caller is gone; a worker whose parent died before the prctl fails its first write to the pipe."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # best effort
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


def _serve(func: Callable[[Any], Any], initializer: Callable[[], object] | None, conn: Connection) -> None:
    """A worker's loop: one item in, one reply out, until told to stop or the parent is gone."""
    _release_fork_server()
    _die_with_parent()
    # Ctrl-C reaches the whole process group: the parent ends its workers itself, without their tracebacks
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer()  # an error here ends the worker before it is ready: WorkerStartError in the parent
    conn.send(_READY)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message == _STOP:
            return
        try:
            reply: tuple[str, Any] = ("ok", func(message[1]))
        except Exception as err:  # noqa: BLE001 - the function's error is this item's failure; the worker goes on
            reply = ("error", _describe(err))
        try:
            conn.send(reply)
        except Exception as err:  # noqa: BLE001 - an unpicklable result (send pickles before it writes)
            conn.send(("error", f"the result could not be passed back: {_describe(err)}"))


class _Worker(Generic[T]):
    def __init__(
        self, ctx: Any, func: Callable[[T], Any], initializer: Callable[[], object] | None, time_limit: float
    ) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_serve, args=(func, initializer, child), daemon=True)
        self.process.start()
        child.close()  # only the worker holds its end now: a dead worker reads as EOF
        self.ready = False  # it has imported what the function needs, run the initializer, and waits
        self.items: deque[T] = deque()  # sent and not replied to, in order: it runs the first
        self.deadline: float | None = None  # of the first
        self.time_limit = time_limit  # seconds per item, 0 for none

    @property
    def idle(self) -> bool:
        return self.ready and not self.items

    @property
    def dead(self) -> bool:
        return self.process.exitcode is not None

    def give(self, item: T) -> None:
        """Send an item; raises OSError when the worker died meanwhile, another error when it cannot be pickled."""
        self.conn.send(("run", item))
        self.items.append(item)
        if len(self.items) == 1:
            # the clock starts when the worker gets the item: its start-up (imports, initializer) is not counted
            self._start_clock()

    def _start_clock(self) -> None:
        self.deadline = time.monotonic() + self.time_limit if self.time_limit else None

    def waiting(self) -> list[T]:
        """The items sent that it has not started (they go to another worker when this one is ended)."""
        return list(self.items)[1:]

    def receive(self) -> tuple[T, Any] | None:
        """Read the pending message, if any; returns (item, result or WorkerFailure) for a reply."""
        if not self.conn.poll():
            return None
        try:
            message = self.conn.recv()
        except (EOFError, OSError):  # the worker is gone; its exit code tells the caller
            return None
        except Exception as err:  # noqa: BLE001 - a reply that cannot be unpickled here fails its item only
            message = ("error", f"the result could not be read: {_describe(err)}")
        if message == _READY:
            self.ready = True
            return None
        if not self.items:  # cannot happen: a worker replies only to an item
            return None
        item = self.items.popleft()
        if self.items:  # it starts the next one now (as far as this side can tell: a little later)
            self._start_clock()
        kind, payload = message
        return item, payload if kind == "ok" else WorkerFailure("error", payload)

    def stop(self) -> None:
        if self.idle and not self.dead:
            try:
                self.conn.send(_STOP)
                self.process.join(_JOIN_S)
            except OSError:
                pass  # it died meanwhile: nothing to stop
        if not self.dead:
            self.process.kill()
            self.process.join(_JOIN_S)
        self.conn.close()


def _context(preload: Sequence[str]) -> Any:
    """The fork server's context where the platform has one (see the module's docstring), else spawn's."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # read when the server starts (the first worker of the process): a later call's list changes nothing.
    # "__main__" as multiprocessing's default list has it
    ctx.set_forkserver_preload(["__main__", *preload])
    return ctx


def run_in_workers(
    func: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    time_limit: float = 0.0,
    initializer: Callable[[], object] | None = None,
    preload: Sequence[str] = (),
) -> Iterator[tuple[T, R | WorkerFailure]]:
    """Yield ``(item, func(item))`` for every item, in the order they finish, computed in ``workers``
    processes; an item without a result gets a :class:`WorkerFailure` instead.

    ``func`` must be picklable (a module-level function, or a ``functools.partial`` of one) and should catch
    its own expected errors. ``initializer`` (picklable too) runs once in each worker before it takes items:
    warm-up that must not count against ``time_limit`` (seconds, 0 for none), which bounds each item from the
    moment its worker starts it. ``preload``: modules the fork server imports once for every worker (the
    function's own, say). Items are taken from ``items`` lazily, as workers have room. Closing the generator early
    ends the workers. Raises :class:`WorkerStartError` when a worker dies before it is ready.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    source: Iterator[T] = iter(items)
    first = next(source, _END)
    if first is _END:
        return  # no process started for nothing
    # items whose worker died before it got them are given to the next idle worker first
    queue: deque[T] = deque([first])
    exhausted = False

    def take() -> Any:
        """The next item, or _END."""
        nonlocal exhausted
        if queue:
            return queue.popleft()
        item = next(source, _END)
        exhausted = item is _END
        return item

    ctx = _context(preload)
    pool: list[_Worker[T]] = []

    def feed() -> list[tuple[T, R | WorkerFailure]]:
        unsendable: list[tuple[T, R | WorkerFailure]] = []
        # an item to run for every worker first; one to wait behind it only once every worker runs one (none
        # is starting): no item queues behind another while a worker is free to take it
        for wanted in range(_QUEUED + 1):
            if wanted and not all(w.ready and w.items for w in pool):
                break
            for worker in pool:
                while worker.ready and len(worker.items) <= wanted and (queue or not exhausted):
                    item = take()
                    if item is _END:
                        break
                    try:
                        worker.give(item)
                    except OSError:
                        queue.appendleft(item)  # the worker died: it is replaced after the next wait
                        break
                    except Exception as err:  # noqa: BLE001 - an item that cannot be pickled fails alone
                        reason = f"could not pass the item: {_describe(err)}"
                        unsendable.append((item, WorkerFailure("error", reason)))
        return unsendable

    try:
        pool.extend(_Worker(ctx, func, initializer, time_limit) for _ in range(workers))
        while True:
            done = feed()
            busy = [w for w in pool if w.items]
            if exhausted and not queue and not busy and not done:
                return
            deadlines = [w.deadline for w in busy if w.deadline is not None]
            if not done:
                timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                wait([w.conn for w in pool] + [w.process.sentinel for w in pool], timeout)
            for worker in list(pool):
                if (result := worker.receive()) is not None:
                    done.append(result)
                failure: WorkerFailure | None = None
                if worker.dead:
                    while (result := worker.receive()) is not None:  # a reply written just before the exit
                        done.append(result)
                    if not worker.ready:
                        detail = _exit_detail(worker.process.exitcode)
                        raise WorkerStartError(f"a worker process ended before it was ready ({detail})")
                    failure = WorkerFailure("crash", _exit_detail(worker.process.exitcode))
                elif worker.deadline is not None and worker.items and time.monotonic() >= worker.deadline:
                    if (result := worker.receive()) is not None:  # it finished after all
                        done.append(result)
                        continue
                    # a running function cannot be interrupted: end its process (the items waiting go elsewhere)
                    failure = WorkerFailure("timeout", f"over the time limit of {time_limit:g} s")
                if failure is None:
                    continue
                if worker.items:
                    queue.extendleft(reversed(worker.waiting()))  # not started: run by another worker
                    done.append((worker.items[0], failure))
                worker.stop()  # killed: it holds an item (a stuck one would not read a request to stop)
                pool.remove(worker)
                if queue or not exhausted:
                    pool.append(_Worker(ctx, func, initializer, time_limit))  # takes items once it is ready
            done.extend(feed())  # before yielding: the workers go on while the caller handles these results
            yield from done
    finally:
        for worker in pool:
            worker.stop()
