"""The remote embedder (issue 15) against real HTTP servers on 127.0.0.1: an OpenAI-shaped /v1/embeddings that
can be scripted to fail, stall or count requests in flight; a port where nothing listens; Zhiku's own API.
No test measures time: a slow server is one that waits for an Event the test sets at teardown."""

from __future__ import annotations

import email.utils
import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.container import Zhiku
from app.settings import load_settings
from common.retry import retry_delay
from knowledge.embed_remote import (
    MAX_RETRY_DELAY_S,
    RemoteEmbedder,
    RemoteEmbedderFactory,
    RemoteEmbedderUnavailable,
    RemoteEmbeddingError,
    remote_model_id,
)
from knowledge.embedding import Embedders, EmbedderUnavailableError, EmbeddingSettings, normalise
from knowledge.store import StoreError
from tests.conftest import HashingEmbedder
from tests.helpers import make_corpus

CHAR_DIMS, HASH_DIMS = 32, 16
DIM = CHAR_DIMS + HASH_DIMS
WAIT_S = 30.0  # the longest a server waits for the test's go-ahead; only reached when a test is failing anyway
LINGER_S = 0.3


def server_vector(text: str) -> list[float]:
    """Unnormalised (the client must normalise): characters counted into buckets, so texts that share characters
    are near, plus a small part derived from the whole text, so that no two texts are alike."""
    vec = np.zeros(DIM)
    for ch in text:
        vec[int(hashlib.md5(ch.encode()).hexdigest(), 16) % CHAR_DIMS] += 1.0
    digest = hashlib.sha256(text.encode()).digest()
    vec[CHAR_DIMS:] = [b / 1024 for b in digest[:HASH_DIMS]]
    return [float(x) for x in vec]


def expected(texts: list[str], prefix: str = "") -> np.ndarray:
    return normalise(np.asarray([server_vector(prefix + t) for t in texts], dtype=np.float32))


class FakeServer:
    """What the handler threads share: the script of answers, the requests seen, the requests in flight."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        # (status, headers, body) answered, in turn, before any embedding; a body of None: OpenAI's error shape
        self.script: list[tuple[int, dict[str, str], Any]] = []
        self.hold = threading.Event()  # cleared by a test: every request not scripted waits (a stalled server)
        self.hold.set()
        self.company = 0  # > 0: the first requests wait until this many are in flight together (then linger)
        self.released = threading.Event()  # set at teardown: nothing waits any more
        self.url = ""

    def answer(self, body: dict[str, Any], auth: str | None) -> tuple[int, dict[str, str], Any]:
        with self.cond:
            self.requests.append(body)
            self.auth.append(auth)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.cond.notify_all()
            if self.company:
                together = lambda: self.max_in_flight >= self.company or self.released.is_set()  # noqa: E731
                if self.cond.wait_for(together, WAIT_S):
                    # the first wave, held a moment more: a client that ignores its limit sends more requests
                    # meanwhile. Only such a client ends this wait early; a correct one never fails by it
                    self.cond.wait_for(lambda: self.in_flight > self.company or self.released.is_set(), LINGER_S)
                self.company = 0  # later requests are answered at once
            scripted = self.script.pop(0) if self.script else None
        try:
            if scripted is None:
                self.hold.wait(WAIT_S)
            else:
                status, headers, payload = scripted
                if payload is None:
                    payload = {"error": {"message": f"scripted {status}", "type": "error", "code": status}}
                return status, headers, payload
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [{"object": "embedding", "index": i, "embedding": server_vector(t)} for i, t in enumerate(texts)]
            data.reverse()  # the client must order by "index"
            usage = {"prompt_tokens": 0, "total_tokens": 0}
            return 200, {}, {"object": "list", "data": data, "model": body["model"], "usage": usage}
        finally:
            with self.cond:
                self.in_flight -= 1  # before the answer is written: the client cannot start its next request sooner


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

    def do_POST(self) -> None:
        fake: FakeServer = self.server.fake  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/embeddings":
            status, headers, payload = 404, {}, {"detail": "Not Found"}
        else:
            status, headers, payload = fake.answer(body, self.headers.get("Authorization"))
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (the timeout tests): nothing to answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.fake = fake  # type: ignore[attr-defined]
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.released.set()
        fake.hold.set()
        with fake.cond:
            fake.cond.notify_all()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A port that is bound but not listening: a connection is refused at once, and no other test can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def embedder(url: str, **options: Any) -> RemoteEmbedder:
    options = {"batch_size": 4, "concurrency": 3, "retries": 2, "retry_backoff": 0.01, "timeout": 10.0, **options}
    return RemoteEmbedder(url, options.pop("model", "test-model"), **options)


def varied(n: int) -> list[str]:
    """Texts of varied lengths in no order, so that length-sorted batches reorder them."""
    return [f"{'长江黄河大海'[i % 5] * (1 + (i * 7) % 13)} text {i}" for i in range(n)]


# ----- vectors, batches, order -------------------------------------------------------------------------------------
def test_vectors_come_back_normalised_in_input_order_across_batches(server: FakeServer) -> None:
    texts = varied(37)
    emb = embedder(server.url, batch_size=4, passage_prefix="passage: ", query_prefix="query: ")
    seen: list[tuple[int, int]] = []
    vecs = emb.embed_documents(texts, progress=lambda n: seen.append((n, threading.get_ident())))
    assert vecs.dtype == np.float32 and vecs.shape == (37, DIM) and emb.dim == DIM
    np.testing.assert_allclose(vecs, expected(texts, "passage: "), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    # ten requests of at most batch_size texts, each text sent once, with the model's name and the prefix
    assert len(server.requests) == 10 and all(len(r["input"]) <= 4 for r in server.requests)
    assert sorted(t for r in server.requests for t in r["input"]) == sorted("passage: " + t for t in texts)
    assert {r["model"] for r in server.requests} == {"test-model"}
    # progress counts every text, in the caller's thread
    assert sum(n for n, _ in seen) == 37 and {ident for _, ident in seen} == {threading.get_ident()}

    query = emb.embed_query("长江")
    assert query.shape == (DIM,) and query.dtype == np.float32
    np.testing.assert_allclose(query, expected(["长江"], "query: ")[0], rtol=1e-5, atol=1e-6)
    assert server.requests[-1]["input"] == ["query: 长江"]
    assert emb.embed_documents([]).shape == (0, DIM)


def test_dim_is_learned_from_the_server_or_checked_against_the_setting(server: FakeServer) -> None:
    assert embedder(server.url).dim == DIM  # asked with one request
    assert len(server.requests) == 1
    assert embedder(server.url, dim=DIM).dim == DIM  # known: no request
    assert len(server.requests) == 1
    with pytest.raises(RemoteEmbeddingError, match=rf"answered with {DIM}-d vectors but embedding.openai.dim says 8"):
        embedder(server.url, dim=8).embed_query("x")


# ----- concurrency -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [1, 3])
def test_requests_in_flight_never_exceed_the_limit(server: FakeServer, limit: int) -> None:
    # the first requests wait (on a condition, not a clock) until `limit` of them are in flight together: a
    # client that never overlaps them leaves max_in_flight at 1, one that overlaps too many exceeds the limit
    server.company = limit
    emb = embedder(server.url, batch_size=2, concurrency=limit)
    texts = varied(40)
    np.testing.assert_allclose(emb.embed_documents(texts), expected(texts), rtol=1e-5, atol=1e-6)
    assert server.max_in_flight == limit


def test_the_limit_holds_across_callers(server: FakeServer) -> None:
    server.company = 2
    emb = embedder(server.url, batch_size=1, concurrency=2)
    texts = varied(12)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def call(n: int) -> None:
        try:
            results[n] = emb.embed_documents(texts[n::3])
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            errors.append(err)

    callers = [threading.Thread(target=call, args=(n,)) for n in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert errors == []
    for n in range(3):
        np.testing.assert_allclose(results[n], expected(texts[n::3]), rtol=1e-5, atol=1e-6)
    assert server.max_in_flight == 2


# ----- failures ----------------------------------------------------------------------------------------------------
def test_503_and_429_are_retried_then_succeed(server: FakeServer) -> None:
    server.script = [(503, {}, None), (429, {"Retry-After": "0"}, None), (502, {}, "<html>bad gateway</html>")]
    emb = embedder(server.url, retries=3, concurrency=1)
    vecs = emb.embed_documents(["长江", "黄河"])
    np.testing.assert_allclose(vecs, expected(["长江", "黄河"]), rtol=1e-5, atol=1e-6)
    assert len(server.requests) == 4


def test_retries_run_out_with_the_last_answer_named(server: FakeServer) -> None:
    server.script = [(503, {}, None)] * 3
    with pytest.raises(RemoteEmbeddingError) as caught:
        embedder(server.url, retries=2).embed_query("长江")
    assert caught.value.status == 503 and len(server.requests) == 3
    message = str(caught.value)
    assert f"{server.url}/embeddings failed 3 times" in message and "HTTP 503: scripted 503" in message
    assert "embedding.openai.base_url" in message and "\n" not in message


def test_a_400_is_not_retried_and_says_what_to_change(server: FakeServer) -> None:
    server.script = [(400, {}, {"error": {"message": "input is too long for the model", "type": "invalid"}})] * 5
    with pytest.raises(RemoteEmbeddingError) as caught:
        embedder(server.url, retries=3).embed_documents(varied(3))
    assert len(server.requests) == 1 and caught.value.status == 400
    message = str(caught.value)
    assert f"{server.url}/embeddings refused the request (HTTP 400: input is too long for the model)" in message
    assert "embedding.batch_size" in message and "chunking.chunk_size" in message


def test_a_failing_batch_stops_the_others(server: FakeServer) -> None:
    server.script = [(400, {}, None)]
    server.hold.clear()  # the first request is refused; the others stall until they time out
    with pytest.raises(RemoteEmbeddingError, match="HTTP 400"):
        embedder(server.url, batch_size=1, concurrency=2, timeout=0.3, retries=3).embed_documents(varied(30))
    # the batch in flight ends at its next attempt; the batches not yet sent never are
    assert len(server.requests) < 10


def test_a_wrong_key_and_a_wrong_path_name_their_settings(server: FakeServer) -> None:
    server.script = [(401, {}, {"error": {"message": "Incorrect API key provided", "type": "auth"}})]
    with pytest.raises(RemoteEmbeddingError, match=r"HTTP 401: Incorrect API key provided.*embedding.openai.api_key"):
        embedder(server.url, api_key="sk-wrong").embed_query("x")
    assert server.auth == ["Bearer sk-wrong"]
    with pytest.raises(RemoteEmbeddingError, match=r"HTTP 404: Not Found\).*embedding.openai.base_url"):
        embedder(server.url.removesuffix("/v1")).embed_query("x")


def test_an_answer_that_is_not_embeddings_is_an_error(server: FakeServer) -> None:
    server.script = [(200, {}, {"object": "list", "results": []})]
    with pytest.raises(RemoteEmbeddingError, match="did not answer with OpenAI-style embeddings"):
        embedder(server.url).embed_query("x")
    assert len(server.requests) == 1


def test_a_server_that_is_down_is_named_after_the_retries(dead_url: str) -> None:
    with pytest.raises(RemoteEmbeddingError) as caught:
        embedder(dead_url, retries=2).embed_documents(varied(9))
    message = str(caught.value)
    assert f"the embedding server at {dead_url}/embeddings failed 3 times (cannot connect" in message
    assert "is running and reachable from here" in message and caught.value.status is None


def test_a_stalled_server_times_out(server: FakeServer) -> None:
    server.hold.clear()  # every request waits until teardown
    emb = embedder(server.url, timeout=0.2, retries=1)
    with pytest.raises(
        RemoteEmbeddingError, match=r"failed 2 times \(no answer within embedding.openai.timeout = 0.2 s\)"
    ):
        emb.embed_query("长江")
    assert len(server.requests) == 2
    with pytest.raises(RemoteEmbeddingError, match=r"embedding\.openai\.timeout"):
        emb.embed_documents(varied(8))


def test_retry_delay_doubles_with_jitter_and_honours_retry_after() -> None:
    for retry in range(4):
        for _ in range(20):
            assert 0.5 * 2**retry / 2 <= retry_delay(retry, 0.5) <= 0.5 * 2**retry
    assert retry_delay(10, 0.5, cap=MAX_RETRY_DELAY_S) == MAX_RETRY_DELAY_S
    assert retry_delay(0, 5.0, "2") == 2.0
    assert retry_delay(0, 5.0, "0") == 0.0
    assert retry_delay(0, 5.0, "86400", cap=MAX_RETRY_DELAY_S) == MAX_RETRY_DELAY_S
    now = 1_700_000_000.0
    assert retry_delay(0, 5.0, email.utils.formatdate(now + 7, usegmt=True), now=now) == 7.0
    assert retry_delay(0, 5.0, email.utils.formatdate(now - 7, usegmt=True), now=now) == 0.0
    assert 2.5 <= retry_delay(0, 5.0, "soon") <= 5.0


# ----- settings, model ids, the app --------------------------------------------------------------------------------
def test_model_ids_name_the_server_and_round_trip_through_for_model(server: FakeServer) -> None:
    assert (
        remote_model_id("HTTP://User:Secret@Host:8080/v1/", "BAAI/bge-m3") == "openai:BAAI/bge-m3@http://host:8080/v1"
    )
    settings = EmbeddingSettings(backend="auto", openai={"base_url": "http://elsewhere:1/v1", "model": "other"})
    embedders = Embedders(settings, {"openai": RemoteEmbedderFactory()}.__getitem__)
    stored = remote_model_id(server.url, "org/model@v2")
    found = embedders.for_model(stored)
    assert isinstance(found, RemoteEmbedder) and found.model_id == stored and found.endpoint.startswith(server.url)
    assert embedders.for_model(stored) is found  # loaded once
    assert embedders.for_model(remote_model_id(server.url, "another")) is not found
    with pytest.raises(EmbedderUnavailableError, match="not a remote embedding model id"):
        embedders.for_model("openai:no-url")
    with pytest.raises(EmbedderUnavailableError, match=r"embedding\.openai\.model is empty"):
        RemoteEmbedderFactory()(EmbeddingSettings(backend="openai"))
    with pytest.raises(ValueError, match="http:// or https://"):
        EmbeddingSettings(openai={"base_url": "127.0.0.1:8080/v1"})


def remote_config(root: Path, url: str, extra: str = "") -> Path:
    config = root / "config.yml"
    config.write_text(
        f"data_dir: {json.dumps(str(root / 'data'))}\n"
        "ingest:\n  workers: 1\n  max_file_seconds: 0\n"
        "chunking:\n  chunk_size: 120\n  chunk_overlap: 20\n"
        f"embedding:\n  backend: openai\n  batch_size: 3\n  openai:\n    base_url: {url}\n    model: chars-48\n"
        f"    concurrency: 2\n    retry_backoff: 0.01\n{extra}",
        encoding="utf-8",
    )
    return config


def test_a_knowledge_base_is_built_and_searched_through_the_server(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZHIKU_EMBEDDING__OPENAI__API_KEY", "sk-from-env")
    files = make_corpus(tmp_path / "docs")
    app = Zhiku(load_settings(remote_config(tmp_path, server.url)), entry_points=False)
    with app.open_kb("remote", create=True) as kb:
        report = app.ingestor(kb).run([tmp_path / "docs"], progress=False)
        assert report.failures == [] and report.count("added") == len(files)
        assert (kb.manifest.embedding_model, kb.manifest.dim) == (f"openai:chars-48@{server.url}", DIM)
        hits = app.retriever(kb).search("晉太元中武陵人", 1)
        assert hits[0].chunk.source == str(files["big5"].resolve())
    assert len(server.requests) > 2 and set(server.auth) == {"Bearer sk-from-env"}

    # with backend auto, the base is searched through the server it was built with, whatever the config says
    auto = Zhiku(
        load_settings(remote_config(tmp_path, "http://127.0.0.1:9/v1", "    retries: 0\n")), entry_points=False
    )
    auto.settings.embedding.backend = "auto"
    sent = len(server.requests)
    with auto.open_kb("remote", readonly=True) as kb:
        assert auto.retriever(kb).search("黄河是中国第二长河", 1)[0].chunk.page == 2
    assert len(server.requests) > sent
    # configured for another model, the base refuses it instead of mixing vectors
    other = Zhiku(load_settings(remote_config(tmp_path, server.url, "    dim: 48\n")), entry_points=False)
    other.settings.embedding.openai.model = "another-model"
    with other.open_kb("remote", readonly=True) as kb, pytest.raises(StoreError, match="openai:another-model@"):
        other.retriever(kb)


def test_an_ingest_stops_when_the_server_is_down_and_fails_only_the_file_it_refuses(
    server: FakeServer, tmp_path: Path
) -> None:
    make_corpus(tmp_path / "docs")
    app = Zhiku(load_settings(remote_config(tmp_path, server.url, "    retries: 1\n")), entry_points=False)
    with app.open_kb("remote", create=True) as kb:
        assert app.ingestor(kb).run([tmp_path / "docs"], progress=False).failures == []
        before = len(kb.files())
    more = tmp_path / "more"
    more.mkdir()
    for i in range(3):
        (more / f"note{i}.txt").write_text(f"第{i}篇笔记：洞庭湖是中国第二大淡水湖。" * 3, encoding="utf-8")
    # one text refused (400): first for the whole group, then for the file alone; the others go in
    server.script = [(400, {}, None), (400, {}, None)]
    with app.open_kb("remote") as kb:
        report = app.ingestor(kb).run([more], progress=False)
    assert report.count("added") == 2 and len(report.failures) == 1
    assert "HTTP 400" in report.failures[0].reason
    # down for good (every answer a 503): the run stops with the server's name instead of failing file after file
    (more / "note3.txt").write_text("鄱阳湖是中国最大的淡水湖。" * 3, encoding="utf-8")
    server.script = [(503, {}, None)] * 50
    with app.open_kb("remote") as kb, pytest.raises(RemoteEmbedderUnavailable, match="failed 2 times"):
        app.ingestor(kb).run([more], progress=False)
    server.script = []
    with app.open_kb("remote", readonly=True) as kb:
        assert len(kb.files()) == before + 2  # what was committed before stays
        assert app.retriever(kb).search("晉太元中武陵人", 1)[0].chunk.source.endswith("big5.txt")


def test_the_backend_is_registered_like_the_builtins(app: Zhiku) -> None:
    assert "openai" in app.embedder_factories.names()


# ----- Zhiku's own API as the server -------------------------------------------------------------------------------
def test_zhikus_own_api_serves_the_remote_embedder(app: Zhiku) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from app.api import create_api

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connections queue from now on: no need to wait for uvicorn to start
    web = uvicorn.Server(
        uvicorn.Config(Starlette(routes=[Mount("/v1", app=create_api(app, None))]), log_level="warning")
    )
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        remote = embedder(url, model=app.embedder().model_id, batch_size=2, concurrency=2)
        texts = ["长江是中国最长的河流", "黄河", "首钢集团总部位于北京", "天生三桥", "x"]
        local = HashingEmbedder()
        np.testing.assert_allclose(remote.embed_documents(texts), local.embed_documents(texts), atol=1e-6)
        np.testing.assert_allclose(remote.embed_query("长江"), local.embed_query("长江"), atol=1e-6)
        with pytest.raises(RemoteEmbeddingError, match=r"HTTP 404: no embedding model 'wrong'"):
            embedder(url, model="wrong").embed_query("x")
    finally:
        web.should_exit = True
        thread.join()
        sock.close()
