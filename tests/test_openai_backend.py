"""The ``openai`` backend against a real HTTP server on 127.0.0.1 that answers like vLLM: a normal answer,
and a server that is down, refuses, is busy, never answers, stalls or breaks off mid-answer. Each ends in an
answer or in one clear error, never a hang, and an answer already streamed is never sent twice. The server
is steered with events, not sleeps; the only waits are the backend's own (short) timeouts. Also through the
chat UI's handlers and the CLI, where the user reads the message."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.container import Zhiku
from app.settings import load_settings
from app.ui_handlers import ERROR_MARK, NO_KB, ChatControls, ask, regenerate
from common.errors import BackendUnavailableError
from llms.base import CUT_SHORT, GenerationOptions, Message
from llms.openai_backend import OpenAIBackend, OpenAISettings
from tests.conftest import REPO, HashingPlugin, write_config

MODEL = "zhiku-test"
OPTIONS = GenerationOptions(temperature=0.0, max_new_tokens=32)
QUESTION = [Message("system", "你是一个有帮助的助手。"), Message("user", "你好")]


# ----- a vLLM-like server --------------------------------------------------------------------------------
@dataclass
class Step:
    """How the server answers one request.

    kind: ``answer`` (stream ``pieces``, then ``finish``), ``status`` (an error status with vLLM's error
    body), ``hang`` (read the request, send nothing), ``stall`` (stream ``pieces``, then send nothing more),
    ``drop`` (close the connection after ``pieces``: before any response when there are none, else in the
    middle of the stream), ``error_event`` (stream ``pieces``, then vLLM's in-stream error event)."""

    kind: str = "answer"
    pieces: list[str] = field(default_factory=lambda: ["你好", "，", "世界"])
    finish: str = "stop"
    status: int = 200
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    flat: bool = False  # an error body as older vLLM wrote it: {"object": "error", "message": ...}


class FakeVLLM:
    """An OpenAI-compatible server like ``vllm serve``: ``POST /v1/chat/completions`` (SSE when ``stream``
    is true, one JSON object otherwise) and ``GET /v1/models``, over HTTP/1.1 with chunked encoding. Each
    request takes the next :class:`Step` of ``plan``, then ``default``. ``release`` (set at teardown) ends
    every hang and stall."""

    def __init__(self) -> None:
        self.plan: list[Step] = []
        self.default = Step()
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/") != "/v1/models":
                    return self._json(404, {"error": {"message": f"no route {self.path}", "code": 404}})
                self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "vllm"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with fake._lock:
                    fake.requests.append(body)
                    step = fake.plan.pop(0) if fake.plan else fake.default
                try:
                    fake.serve(self, step, body)
                except OSError:  # the client gave up (its timeout): nothing left to say
                    self.close_connection = True

            def _json(self, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(obj, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that went away while a hang or stall ended at teardown: expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> FakeVLLM:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()

    def serve(self, h: Any, step: Step, body: dict[str, Any]) -> None:
        if step.kind == "status":
            error = {"message": step.message or f"status {step.status}", "type": "Error", "code": step.status}
            return h._json(step.status, {"object": "error", **error} if step.flat else {"error": error}, step.headers)
        if step.kind == "hang" or (step.kind == "drop" and not step.pieces):
            if step.kind == "hang":
                self.release.wait()
            h.close_connection = True
            return None
        if not body.get("stream"):
            text = "".join(step.pieces)
            return h._json(200, self.completion(text, step.finish))
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def send(data: bytes) -> None:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        def event(obj: dict[str, Any] | str) -> None:
            send(b"data: " + (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)).encode() + b"\n\n")

        event(self.chunk({"role": "assistant", "content": ""}))  # vLLM's first chunk: the role, no text
        for piece in step.pieces:
            event(self.chunk({"content": piece}))
        if step.kind == "stall":
            self.release.wait()
            h.close_connection = True
            return None
        if step.kind == "drop":  # the server died mid-answer: the chunked body never ends
            h.close_connection = True
            return None
        if step.kind == "error_event":
            event({"error": {"message": step.message, "type": "InternalServerError", "code": 500}})
        else:
            event(self.chunk({"content": ""}, step.finish))
        event("[DONE]")
        send(b"")  # the last chunk
        return None

    @staticmethod
    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": [choice],
        }

    @staticmethod
    def completion(text: str, finish: str) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": MODEL, "choices": [choice]}


@pytest.fixture
def server() -> Iterator[FakeVLLM]:
    fake = FakeVLLM().start()
    try:
        yield fake
    finally:
        fake.stop()


def dead_url() -> str:
    """The /v1 URL of a port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def backend(url: str, **settings: Any) -> OpenAIBackend:
    return OpenAIBackend(OpenAISettings(base_url=url, model=MODEL, **{"retry_backoff": 0.01, **settings}))


def collect(b: OpenAIBackend, options: GenerationOptions = OPTIONS) -> tuple[list[str], BackendUnavailableError]:
    """The pieces streamed before the backend raised, and its error (the test fails if none is raised)."""
    pieces: list[str] = []
    with pytest.raises(BackendUnavailableError) as raised:
        for piece in b.stream(QUESTION, options):
            pieces.append(piece)
    return pieces, raised.value


@pytest.fixture
def retries(caplog: pytest.LogCaptureFixture) -> Any:
    """The retry notes the backend logged."""
    caplog.set_level(logging.INFO, logger="llms.openai_backend")
    return lambda: [r.getMessage() for r in caplog.records if "sending the request again" in r.getMessage()]


# ----- the backend -----------------------------------------------------------------------------------------
def test_a_streamed_answer_arrives_in_pieces_as_sent(server: FakeVLLM) -> None:
    assert list(backend(server.url).stream(QUESTION, OPTIONS)) == ["你好", "，", "世界"]
    (sent,) = server.requests
    assert sent["model"] == MODEL and sent["stream"] is True and sent["max_tokens"] == 32
    assert sent["messages"] == [
        {"role": "system", "content": "你是一个有帮助的助手。"},
        {"role": "user", "content": "你好"},
    ]
    # the model stopped at max_tokens: the reply says it was cut short
    server.default = Step(pieces=["一", "二"], finish="length")
    assert list(backend(server.url).stream(QUESTION, OPTIONS)) == ["一", "二", CUT_SHORT]
    # a stop string still cuts the reply where it first occurs
    stopped = backend(server.url).stream(QUESTION, OPTIONS.model_copy(update={"stop": ["二"]}))
    assert "".join(stopped) == "一"


def test_the_fake_answers_without_streaming_too(server: FakeVLLM) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key="EMPTY", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "你好，世界" and [m.id for m in client.models.list()] == [MODEL]


def test_a_server_that_is_down_is_a_clear_error_after_the_retries(retries: Any) -> None:
    url = dead_url()
    pieces, err = collect(backend(url, retries=2))
    assert pieces == [] and len(retries()) == 2
    text = str(err)
    assert f"cannot reach the OpenAI-compatible server at {url}" in text and "3 attempts" in text
    assert "check that it is running" in text and "vllm serve" in text and "llm.openai.base_url" in text


def test_a_server_busy_twice_answers_on_the_third_attempt(server: FakeVLLM, retries: Any) -> None:
    server.plan = [Step("status", status=503, message="the engine is starting"), Step("status", status=502)]
    assert "".join(backend(server.url, retries=2).stream(QUESTION, OPTIONS)) == "你好，世界"
    assert len(server.requests) == 3 and len(retries()) == 2


def test_a_server_that_stays_busy_is_an_error_naming_the_status(server: FakeVLLM) -> None:
    server.default = Step("status", status=503, message="no free KV cache blocks")
    _, err = collect(backend(server.url, retries=2))
    assert len(server.requests) == 3
    text = str(err)
    assert server.url in text and "busy or failing" in text and "HTTP 503: no free KV cache blocks" in text
    assert "3 attempts" in text and "Regenerate" in text


def test_retry_after_is_followed_and_a_long_one_is_not_waited_for(server: FakeVLLM, retries: Any) -> None:
    server.plan = [Step("status", status=429, headers={"Retry-After": "0"})]
    assert "".join(backend(server.url, retry_backoff=5).stream(QUESTION, OPTIONS)) == "你好，世界"
    assert len(server.requests) == 2 and "again in 0.0 s" in retries()[0]  # not the 5 s backoff
    server.requests.clear()
    server.plan = [Step("status", status=429, headers={"Retry-After": "3600"})]
    _, err = collect(backend(server.url))
    assert len(server.requests) == 1 and "HTTP 429" in str(err) and "asks to wait 3600 s" in str(err)


@pytest.mark.parametrize(
    ("status", "message", "fix"),
    [
        (400, "This model's maximum context length is 4096 tokens.", "llm.openai.context_window"),
        (400, "As of transformers v4.44, default chat template is no longer allowed", "--chat-template"),
        (401, "Unauthorized", "llm.openai.api_key"),
        (404, f"The model `{MODEL}` does not exist.", "--served-model-name"),
    ],
)
@pytest.mark.parametrize("flat", [False, True])
def test_a_refused_request_is_not_sent_again_and_says_how_to_fix_it(
    server: FakeVLLM, status: int, message: str, fix: str, flat: bool
) -> None:
    server.default = Step("status", status=status, message=message, flat=flat)
    _, err = collect(backend(server.url, retries=2))
    assert len(server.requests) == 1
    assert server.url in str(err) and f"HTTP {status}: {message}" in str(err) and fix in str(err)


def test_a_server_that_never_answers_is_an_error_after_the_timeout(server: FakeVLLM) -> None:
    server.plan = [Step("hang")]
    pieces, err = collect(backend(server.url, timeout=1.5, retries=2))
    assert pieces == [] and len(server.requests) == 1  # not sent again: the server has it
    assert f"{server.url} accepted the request but sent nothing for 1.5 s" in str(err)
    assert "llm.openai.timeout" in str(err)


def test_a_connection_dropped_before_any_text_is_retried(server: FakeVLLM, retries: Any) -> None:
    server.plan = [Step("drop", pieces=[])]
    assert "".join(backend(server.url).stream(QUESTION, OPTIONS)) == "你好，世界"
    assert len(server.requests) == 2 and len(retries()) == 1


@pytest.mark.parametrize(
    ("step", "said"),
    [
        (Step("stall", pieces=["长江", "全长"]), "stopped sending mid-answer (nothing for 1.5 s)"),
        (Step("drop", pieces=["长江", "全长"]), "closed the connection mid-answer"),
        (Step("error_event", pieces=["长江", "全长"], message="engine died"), "failed mid-answer (engine died)"),
    ],
)
def test_an_answer_broken_off_mid_way_keeps_its_text_and_is_never_sent_again(
    server: FakeVLLM, step: Step, said: str
) -> None:
    server.plan = [step]
    pieces, err = collect(backend(server.url, timeout=1.5, retries=2))
    assert pieces == ["长江", "全长"] and len(server.requests) == 1
    assert f"{server.url} {said}" in str(err) and "the answer is incomplete" in str(err) and "Regenerate" in str(err)


def test_stop_mid_answer_ends_the_stream_without_waiting_for_the_server(server: FakeVLLM) -> None:
    server.plan = [Step("stall", pieces=["长江"])]
    stream = backend(server.url, timeout=60).stream(QUESTION, OPTIONS)
    assert next(stream) == "长江"
    stream.close()  # the UI's Stop: returns at once, though the server would stay silent for 60 s
    assert "".join(backend(server.url).stream(QUESTION, OPTIONS)) == "你好，世界"


# ----- where the user reads it -------------------------------------------------------------------------------
@pytest.fixture
def chat_app(tmp_path: Path, server: FakeVLLM) -> Zhiku:
    extra = (
        f"llm:\n  backend: openai\n  openai:\n    base_url: {server.url}\n    model: {MODEL}\n"
        "    timeout: 1.5\n    retries: 1\n    retry_backoff: 0.01\n"
    )
    app = Zhiku(load_settings(write_config(tmp_path / "c.yml", tmp_path / "data", extra)), entry_points=False)
    app.plugins.register(HashingPlugin())
    return app


def test_the_ui_shows_a_busy_server_and_regenerate_answers_once_it_is_back(chat_app: Zhiku, server: FakeVLLM) -> None:
    server.plan = [Step("status", status=503, message="loading the model")] * 2
    *_, last = ask(chat_app.chat, "你好", [], ChatControls(kb=NO_KB))
    assert [m["role"] for m in last.chat or []] == ["user", "assistant"]
    error = (last.chat or [])[-1]["content"]
    assert error.startswith(ERROR_MARK) and "busy or failing" in error and "loading the model" in error
    assert last.warning is not None and server.url in last.warning
    *_, again = regenerate(chat_app.chat, last.chat, ChatControls(kb=NO_KB))  # the server is back
    assert [(m["role"], m["content"]) for m in again.chat or []] == [("user", "你好"), ("assistant", "你好，世界")]


def test_the_ui_keeps_a_stalled_answer_once_and_ends_it_with_the_error(chat_app: Zhiku, server: FakeVLLM) -> None:
    server.plan = [Step("stall", pieces=["长江", "全长"])]
    *_, last = ask(chat_app.chat, "长江有多长？", [], ChatControls(kb=NO_KB))
    _, partial, error = last.chat or []
    assert partial == {"role": "assistant", "content": "长江全长"}
    assert error["content"].startswith(ERROR_MARK) and "stopped sending mid-answer" in error["content"]
    assert len(server.requests) == 1


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )


def cli_env(url: str, **settings: str) -> dict[str, str]:
    env = {"ZHIKU_LLM__BACKEND": "openai", "ZHIKU_LLM__OPENAI__BASE_URL": url, "ZHIKU_LLM__OPENAI__MODEL": MODEL}
    return env | {f"ZHIKU_LLM__OPENAI__{k.upper()}": v for k, v in settings.items()}


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_the_cli_says_the_server_is_down_in_one_line_after_retrying(tmp_path: Path) -> None:
    url = dead_url()
    done = run_cli("chat", "你好", "--data-dir", str(tmp_path), env=cli_env(url, retry_backoff="0.01"))
    line = error_line(done)
    assert f"cannot reach the OpenAI-compatible server at {url}" in line and "3 attempts" in line
    assert "check that it is running" in line


def test_the_cli_prints_a_stalled_answer_once_then_the_error(tmp_path: Path, server: FakeVLLM) -> None:
    server.plan = [Step("stall", pieces=["长江", "全长"])]
    done = run_cli("chat", "长江有多长？", "--data-dir", str(tmp_path), env=cli_env(server.url, timeout="1.5"))
    assert "stopped sending mid-answer" in error_line(done)
    assert done.stdout.count("长江全长") == 1 and len(server.requests) == 1


# ----- the chat templates of docs/vllm.md --------------------------------------------------------------------
TEMPLATES = REPO / "docs" / "chat_templates"
CONVERSATIONS = {
    "two turns with a system message": [
        Message("system", "你是知库的问答助手。用中文回答，准确、简洁。"),
        Message("user", "长江有多长？"),
        Message("assistant", "约6300公里。"),
        Message("user", " 黄河呢？ "),
    ],
    "no system message": [Message("user", "Where is the Yangtze?")],
    "a blank system message": [Message("system", "  \n"), Message("user", "你好")],
    "a finished conversation": [Message("system", "Be brief."), Message("user", "hi"), Message("assistant", "Hello! ")],
    "a system message alone": [Message("system", "你是知库的问答助手。")],
}


def render_template(name: str, messages: list[Message]) -> str:
    """``name`` rendered as vLLM renders a --chat-template: through transformers' apply_chat_template, whose
    Jinja environment is this one, with the tokenizer's special tokens and add_generation_prompt=True."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    template = env.from_string((TEMPLATES / name).read_text(encoding="utf-8"))
    return template.render(
        messages=[{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=True,
        bos_token="<s>",
        eos_token="</s>",
    )


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_the_chat_templates_write_the_prompts_zhikus_own_backends_write(conversation: str) -> None:
    """docs/vllm.md serves MOSS, Llama-2-chat and Baichuan2 with these templates: a server must build the
    prompt Zhiku's own backends build (llms/formats.py), so the docs cannot drift from the code."""
    from llms.formats import BaichuanFormat, Llama2Format, MossFormat

    messages = CONVERSATIONS[conversation]
    assert render_template("moss.jinja", messages) == MossFormat().render(messages)
    assert render_template("llama-2-chat.jinja", messages) == Llama2Format().render(messages)
    # BaichuanFormat shows its role tokens by id: Baichuan2 names ids 195 and 196 <reserved_106>, <reserved_107>
    baichuan = BaichuanFormat().render(messages)
    expected = baichuan.replace("<token:195>", "<reserved_106>").replace("<token:196>", "<reserved_107>")
    assert render_template("baichuan2.jinja", messages) == expected
