"""The web UI's handlers as plain functions, testable without Gradio or a browser.

Each takes the services it needs and the values of the components it reads, and returns plain values or a
small dataclass in which ``None`` means "leave that component as it is". :mod:`app.ui` wraps them for
Gradio (toasts for ``warning``/``info``, ``gr.skip()`` for ``None``, dropdown updates).

One error boundary per handler: a :class:`ZhikuError` is shown with its one-line message; a ValueError or an
OSError (option validation, presets, uploads) is made readable; anything else is a bug, logged with its
traceback and shown as "内部错误 / internal error". Nothing reaches Gradio's blank "Error" toast.

Everything shown in the browser that came from a model, a document or a user goes through
:func:`safe_markdown` or :func:`md_cell` (Markdown), or ``html.escape`` (the sources panel, HTML), so that
rendering it makes the browser fetch nothing.
"""

from __future__ import annotations

import errno
import html
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.chat import AnswerEvent, ChatRequest, Source, SourcesEvent, StatusEvent, TextEvent
from common.errors import ZhikuError
from knowledge.preview import evidence_share, evidence_spans, render_page
from llms.base import GenerationOptions, Message

if TYPE_CHECKING:
    from app.presets import PresetStore
    from app.services import ChatService, IngestService, KnowledgeBaseService, UploadResult

log = logging.getLogger(__name__)

NO_KB = "（无 / none）"
ERROR_MARK = "⚠️"  # assistant bubbles that start with this are errors, not part of the conversation
NONE_YET = '<p class="sources-note"><em>暂无 / none yet</em></p>'
SEARCHING = '<p class="sources-note"><em>检索中… / searching…</em></p>'
NOT_SEARCHED = '<p class="sources-note"><em>—</em></p>'  # an answer that failed before its sources came
EMPTY_ANSWER = "（模型没有给出回答 / empty answer）"
STOPPED_MARK = "（已停止 / stopped）"  # ends an answer cut short by Stop
# ends an answer the model stopped at max_new_tokens
CUT_SHORT_MARK = "（已达到最大生成长度，回答可能不完整 / reached max new tokens: the answer may be unfinished）"
STOPPED, ABANDONED = "stopped", "abandoned"  # what ended an answer (Stopper.state)
INTERNAL_ERROR = "内部错误 / internal error"
NO_QUESTION = "请输入问题 / Please type a question"
NOTHING_TO_REGENERATE = "还没有可以重新生成的问题 / Nothing to regenerate yet"
MIN_EVIDENCE_SHARE = 0.5  # an uncited source is marked when the answer holds this share of a sentence


# ----- Markdown that cannot make the browser fetch anything ----------------------------------------------
# The Chatbot renders messages as Markdown (marked, then a sanitizer that keeps <img>, <video>, <iframe>...),
# so an image or a tag in an answer, e.g. echoed from a planted document, would be fetched by the reader's
# browser. safe_markdown() leaves no raw "<" that starts a tag and no "![" outside code; code blocks are
# re-emitted in one canonical form, so the browser's parser cannot disagree about where they end and read
# their (untouched) content as Markdown or HTML.
_FENCE = re.compile(r"^([ \t]*)(`{3,}|~{3,})(.*)$")
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")  # what starts an HTML tag, comment or declaration
_DANGER = re.compile(r"<[A-Za-z/!?]|!\[")
_BACKTICKS = re.compile(r"`+")
_BLANK_LINE = re.compile(r"(\n[ \t]*\n)")
_LANGUAGE = re.compile(r"[\w+#.-]*")


def safe_markdown(text: str) -> str:
    """``text`` as Markdown that renders the same (bold, lists, code, plain links) but fetches nothing:
    images (``![alt](url)``, ``![alt][ref]``) and HTML tags (``<img>``, ``<iframe>``, ``<video>``, a
    ``style`` with ``url(...)``...) are shown as the text they are."""
    out: list[str] = []
    prose: list[str] = []
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # the lines marked will see
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None or (fence[2][0] == "`" and "`" in fence[3]):
            # not a code fence; one that only looks like one is escaped so that no parser opens it
            prose.append(lines[i] if fence is None else f"{fence[1]}\\{fence[2]}{fence[3]}")
            i += 1
            continue
        if prose:
            out.append(_safe_prose("\n".join(prose)))
            prose = []
        indent, run, info = len(fence[1]), fence[2], fence[3]
        body: list[str] = []
        i += 1
        while i < len(lines):
            line = lines[i]
            if line.strip() and len(line) - len(line.lstrip(" \t")) < indent:
                break  # less indented than the fence: the list item holding it has ended, and so has the block
            i += 1
            close = _FENCE.match(line)
            if close and close[2].startswith(run) and not close[3].strip() and len(close[1]) <= indent + 3:
                break
            body.append(line[min(indent, len(line) - len(line.lstrip(" \t"))) :])
        # a blank line before it, unless the text has one (again and again through a save and a reopen)
        out.append(_code_block(run[0], info, body, blank_before=bool(out) and not out[-1].endswith("\n")))
    if prose:
        out.append(_safe_prose("\n".join(prose)))
    return "\n".join(out)


def _code_block(char: str, info: str, body: list[str], *, blank_before: bool) -> str:
    """A fenced block at column 0 after a blank line (so it is one wherever the original stood: in a list
    item, after a paragraph), with a fence longer than any run of its character that starts a line of the
    body (so no body line can close it), always closed, and never ``mermaid`` (Gradio would render that
    block as raw HTML)."""
    longest = max((len(line.lstrip(" \t")) - len(line.lstrip(" \t").lstrip(char)) for line in body), default=0)
    fence = char * max(3, longest + 1)
    language = _LANGUAGE.match(info.strip())
    lang = language[0] if language else ""
    opener = f"{fence} {lang}" if lang.startswith("mermaid") else fence + lang
    return "\n".join([*([""] if blank_before else []), opener, *body, fence])


def _safe_prose(text: str) -> str:
    """Text outside code blocks: tag starts and ``![`` escaped; inline code that holds either is written as
    a ``<code>`` element with entity-escaped content, so it still shows exactly what the model wrote."""
    out: list[str] = []
    text = text.replace("```mermaid", "``` mermaid")  # even in a fence in a quote or a list item: see _code_block
    for part in _BLANK_LINE.split(text):  # inline code never spans a blank line
        pos = search = 0
        while (tick := _BACKTICKS.search(part, search)) is not None:
            start = backslash = tick.start()
            while backslash > 0 and part[backslash - 1] == "\\":
                backslash -= 1
            if (start - backslash) % 2:  # "\`": that backtick is literal
                start += 1
            run = tick.end() - start
            close = re.compile(rf"(?<!`)`{{{run}}}(?!`)").search(part, tick.end()) if run else None
            if close is None:
                search = tick.end()
                continue
            content = part[tick.end() : close.start()]
            out.append(_escape_prose(part[pos:start]))
            out.append(_code_element(content) if _DANGER.search(content) else part[start : close.end()])
            pos = search = close.end()
        out.append(_escape_prose(part[pos:]))
    return "".join(out)


def _escape_prose(text: str) -> str:
    return _TAG_START.sub("&lt;", text).replace("![", "!\\[")


def _code_element(content: str) -> str:
    content = content.replace("\n", " ")
    if len(content) > 2 and content[0] == content[-1] == " " and content.strip():
        content = content[1:-1]  # as CommonMark strips one space on each side
    return "<code>" + "".join(ch if ch.isalnum() or ch == " " else f"&#{ord(ch)};" for ch in content) + "</code>"


_CODE_ELEMENT = re.compile(r"<code>(.*?)</code>")
_CANONICAL_FENCE = re.compile(r"^(`{3,}|~{3,}) ?[\w+#.-]*$")


def model_text(shown: str) -> str:
    """The text a message shown with :func:`safe_markdown` stands for, to give back to the model (code
    blocks keep their canonical fences)."""
    out: list[str] = []
    fence = ""
    for line in shown.split("\n"):
        canonical = _CANONICAL_FENCE.match(line)
        if fence:
            fence = "" if line == fence else fence
        elif canonical:
            fence = canonical[1]
        else:
            line = _CODE_ELEMENT.sub(lambda m: _backticked(html.unescape(m[1])), line)
            line = line.replace("&lt;", "<").replace("!\\[", "![").replace("``` mermaid", "```mermaid")
        out.append(line)
    return "\n".join(out)


def _backticked(code: str) -> str:
    run = "`" * (max((len(r) for r in _BACKTICKS.findall(code)), default=0) + 1)
    return f"{run} {code} {run}" if code.startswith("`") or code.endswith("`") else f"{run}{code}{run}"


def md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, no HTML, no table, emphasis, link or image syntax."""
    text = html.escape(" ".join(text.split()), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+!|~>$])", r"\\\1", text)


def chat_placeholder(kb_choice: str | None) -> str:
    """What an empty chat says: which knowledge base the answers will come from, if any."""
    kb = kb_name(kb_choice)
    if kb is None:
        return "未选择知识库：直接和模型对话 · No knowledge base: the model answers on its own"
    return f"向知识库 **{md_cell(kb)}** 提问 · Ask about the knowledge base **{md_cell(kb)}**"


def status_text(event: StatusEvent) -> str:
    if event.stage == "searching":
        return "_正在检索知识库… / searching…_"
    if event.stage == "reading":
        return f"_正在阅读 {event.passages} 段资料… / reading {event.passages} passages…_"
    if event.stage == "thinking":
        return "_正在思考… / thinking…_"
    return f"_{md_cell(event.stage)}…_"


# ----- the sources panel (HTML: every text in it escaped) ---------------------------------------------------
def _note(text: str) -> str:
    return f'<p class="sources-note"><em>{html.escape(text)}</em></p>'


def no_kb_html() -> str:
    return _note("未使用知识库 / no knowledge base selected")


def retrieval_off_html() -> str:
    return _note("未检索：检索段落数为 0 / not searched: retrieval top-k is 0")


def not_found_html(kb: str) -> str:
    return _note(f"知识库 {kb} 中没有找到能回答这个问题的段落 / nothing in the knowledge base answers this")


def marked_passage(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """``text`` escaped, with each (start, end) span in a ``<mark>``."""
    out: list[str] = []
    pos = 0
    for start, end in sorted(spans):
        if start < pos:
            continue
        out += [html.escape(text[pos:start]), "<mark>", html.escape(text[start:end]), "</mark>"]
        pos = end
    out.append(html.escape(text[pos:]))
    return "".join(out)


def highlights(sources: Sequence[Source], answer: str, cited: Sequence[int] = ()) -> list[list[tuple[int, int]]]:
    """Per source, the spans of its passage to mark: the sentences that share most with the answer, for
    the sources it cites (or, uncited, those it takes at least :data:`MIN_EVIDENCE_SHARE` of a sentence
    from); [] for the others."""
    out: list[list[tuple[int, int]]] = []
    for n, s in enumerate(sources, 1):
        used = n in cited or evidence_share(s.snippet, answer) >= MIN_EVIDENCE_SHARE
        out.append(evidence_spans(s.snippet, answer) if used else [])
    return out


def sources_html(
    sources: Sequence[Source], kb: str | None, marks: Sequence[Sequence[tuple[int, int]]] | None = None
) -> str:
    """The sources panel: one collapsed ``<details>`` per source, ``[n] file p.X · score`` in its summary
    and the whole passage in its body, the spans in ``marks`` (per source) marked."""
    if kb is None:
        return no_kb_html()
    if not sources:
        return not_found_html(kb)
    rows = []
    for n, s in enumerate(sources, 1):
        spans = marks[n - 1] if marks is not None and n <= len(marks) else []
        summary = f"[{n}] {s.label()} · {s.score:.3f}"
        rows.append(
            f'<details class="source" data-n="{n}"><summary>{html.escape(summary)}</summary>'
            f'<div class="passage">{marked_passage(s.snippet, spans)}</div></details>'
        )
    return '<div class="sources-list">' + "".join(rows) + "</div>"


@dataclass(frozen=True)
class PageRef:
    """A PDF page an answer drew on, for the page view: what the dropdown shows, and what to render."""

    label: str  # "[n] file p.X"
    path: str
    page: int
    highlight: str


def page_refs(sources: Sequence[Source], marks: Sequence[Sequence[tuple[int, int]]]) -> list[PageRef]:
    """The PDF sources, each with the text to mark on its page: its marked sentences, or its passage."""
    refs = []
    for n, s in enumerate(sources, 1):
        if s.page is None or not s.path.lower().endswith(".pdf"):
            continue
        spans = marks[n - 1] if n <= len(marks) else []
        highlight = "\n".join(s.snippet[a:b] for a, b in spans) or s.snippet
        refs.append(PageRef(f"[{n}] {s.label()}", s.path, s.page, highlight))
    return refs


@dataclass(frozen=True)
class PageView:
    """The page view after a choice: the image (None: none), and a warning."""

    image: Any = None
    warning: str | None = None


def show_page(refs: Sequence[PageRef] | None, choice: str | None, resolution: int = 100) -> PageView:
    """Render the page the dropdown names, with its passage marked. Only the current answer's sources can
    be shown: ``choice`` is looked up among ``refs`` (the session's state), never used as a path."""
    if not choice:
        return PageView()
    ref = next((r for r in refs or [] if r.label == choice), None)
    if ref is None:
        return PageView(warning=f"{choice} is not a source of the current answer; ask again")
    try:
        return PageView(render_page(Path(ref.path), ref.page, ref.highlight, resolution))
    except (ZhikuError, ValueError, OSError) as err:
        return PageView(warning=f"cannot show {ref.label}: {readable(err)}")
    except Exception as err:
        log.exception("rendering %s failed", ref.label)
        return PageView(warning=internal_error(err))


# ----- the chat as the browser holds it ---------------------------------------------------------------------
def message_text(content: Any) -> str:
    """The text of a Chatbot message's content: a string, a {"type": "text"} part, or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        text = content.get("text")
        return text if isinstance(text, str) else ""
    if isinstance(content, list | tuple):
        return "".join(message_text(part) for part in content)
    return ""


def plain_chat(chat: Sequence[Any] | None) -> list[dict[str, str]]:
    """The Chatbot's value as simple ``{"role", "content"}`` text messages (as shown; anything else the
    client sent is dropped)."""
    out: list[dict[str, str]] = []
    for m in chat or []:
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("user", "assistant"):
            out.append({"role": str(role), "content": message_text(m.get("content"))})
    return out


def history_of(chat: Sequence[dict[str, str]]) -> list[Message]:
    """Completed question/answer turns, oldest first, as the model wrote and read them; unanswered questions
    and error bubbles are left out."""
    turns: list[Message] = []
    pending: str | None = None
    for m in chat:
        text = model_text(m["content"]).strip()
        for mark in (STOPPED_MARK, CUT_SHORT_MARK):  # the UI's, not the model's
            text = text.removesuffix(mark).strip()
        if m["role"] == "user":
            pending = text or None
        elif pending is not None and text and not text.startswith(ERROR_MARK):
            turns += [Message("user", pending), Message("assistant", text)]
            pending = None
    return turns


def kb_name(value: str | None) -> str | None:
    """The knowledge base a dropdown value names; None for "none"."""
    return None if not value or value == NO_KB else value


def kb_choices(kbs: KnowledgeBaseService) -> list[str]:
    return [NO_KB, *kbs.names()]


# ----- errors -----------------------------------------------------------------------------------------------
def one_line(text: str) -> str:
    return " ".join(text.split())


def readable(err: BaseException) -> str:
    """The one line shown for an expected failure (a ZhikuError says what and how to fix it itself)."""
    return one_line(str(err)) or type(err).__name__


def internal_error(err: BaseException) -> str:
    """The line shown for a bug; the traceback goes to the log."""
    return f"{INTERNAL_ERROR}: {type(err).__name__}: {readable(err)}"


def cannot_write(err: OSError, what: str, folder: Path) -> ZhikuError:
    """A raw OSError while writing under ``folder`` as a ZhikuError that says why and what to do."""
    reason = err.strerror or type(err).__name__
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"give the user running Zhiku write access to {folder}"
    elif err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free some disk space for {folder}"
    else:
        fix = f"check that {folder} exists and the user running Zhiku can write to it"
    return ZhikuError(f"cannot write {what} ({reason})", fix)


# ----- chat -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatControls:
    """The chat settings of a session, as the components hold them; None: the config's default."""

    kb: str | None = None  # a dropdown value: NO_KB or empty for none
    system_prompt: str | None = None  # empty: the default for the question's language
    temperature: float | None = None
    top_p: float | None = None
    top_k: float | None = None
    max_new_tokens: float | None = None
    seed: float | str | None = None  # None or empty: random (it has no config default to fall back to)
    retrieval_k: float | None = None


@dataclass(frozen=True)
class ChatUpdate:
    """The chat's components after one step of an answer; None: unchanged."""

    chat: list[dict[str, str]] | None
    sources: str | None = None  # the sources panel's HTML
    effective: str | None = None  # the system prompt the answer uses
    warning: str | None = None
    pages: list[PageRef] | None = None  # the PDF pages the page view offers ([]: none; None: unchanged)


def generation_options(defaults: GenerationOptions, controls: ChatControls) -> GenerationOptions:
    """The config's generation settings with the session's; invalid values raise a ValidationError (a
    ValueError) naming them."""
    given = {
        "temperature": controls.temperature,
        "top_p": controls.top_p,
        "top_k": None if controls.top_k is None else int(controls.top_k),
        "max_new_tokens": None if controls.max_new_tokens is None else int(controls.max_new_tokens),
    }
    options = {**defaults.model_dump(), **{k: v for k, v in given.items() if v is not None}}
    options["seed"] = parse_seed(controls.seed)
    return GenerationOptions(**options)


def parse_seed(seed: float | str | None) -> int | None:
    """The seed box's value as an int; None (random) when empty."""
    if isinstance(seed, str):
        text = seed.strip()
        if not text:
            return None
        if not re.fullmatch(r"[+-]?\d{1,19}", text):
            raise ValueError(
                f"seed {text[:40]!r} is not a whole number: write one, or leave it empty for a random seed"
            )
        return int(text)
    return None if seed is None else int(seed)


def answer(
    service: ChatService, question: str, prior: list[dict[str, str]], controls: ChatControls
) -> Iterator[ChatUpdate]:
    """Stream the chat (``prior`` as shown, the question, the growing answer), the sources and the effective
    system prompt for one question. A failure ends the chat with an error bubble after whatever part of
    the answer was shown; closing the generator (Stop) ends the model's generation at once."""
    kb = kb_name(controls.kb)
    chat = [*prior, {"role": "user", "content": safe_markdown(question)}]
    # top-k 0 answers without searching: the panel says so instead of "nothing found"
    retrieval_off = kb is not None and controls.retrieval_k is not None and int(controls.retrieval_k) <= 0
    sources = (retrieval_off_html() if retrieval_off else SEARCHING) if kb else no_kb_html()
    found: list[Source] = []
    effective = text = ""

    def failed(message: str) -> ChatUpdate:
        partial = [{"role": "assistant", "content": safe_markdown(text)}] if text else []
        error = {"role": "assistant", "content": f"{ERROR_MARK} {safe_markdown(message)}"}
        shown = NOT_SEARCHED if sources == SEARCHING else sources
        return ChatUpdate([*chat, *partial, error], shown, effective, warning=message)

    try:
        request = ChatRequest(
            question,
            history=history_of(prior),
            kb=kb,
            system_prompt=(controls.system_prompt or "").strip() or None,
            options=generation_options(service.settings.chat.generation, controls),
            top_k=None if controls.retrieval_k is None else int(controls.retrieval_k),
        )
        effective = service.build_messages(request, [])[0].content
        yield ChatUpdate(chat, sources, effective, pages=[])  # the last answer's pages are not this one's
        events = service.stream(request)
        try:
            for event in events:
                if isinstance(event, StatusEvent):  # something on screen before the first word
                    status = {"role": "assistant", "content": status_text(event)}
                    yield ChatUpdate([*chat, status], sources, effective)
                elif isinstance(event, SourcesEvent):  # shown at once, marked when the answer is complete
                    found = list(event.sources)
                    sources = retrieval_off_html() if retrieval_off else sources_html(found, kb)
                    yield ChatUpdate(chat, sources, effective)
                elif isinstance(event, TextEvent) and event.text:
                    text += event.text
                    yield ChatUpdate([*chat, {"role": "assistant", "content": safe_markdown(text)}], sources, effective)
                elif isinstance(event, AnswerEvent):  # the answer as shown: citations, supporting sentence
                    text = event.text
                    pages: list[PageRef] = []
                    if event.not_found and kb:
                        sources = not_found_html(kb)
                    elif found:
                        marks = highlights(found, text, event.cited)
                        sources, pages = sources_html(found, kb, marks), page_refs(found, marks)
                    shown = safe_markdown(text) if text else EMPTY_ANSWER
                    if event.cut_short:
                        shown = f"{shown}\n\n{CUT_SHORT_MARK}"
                    yield ChatUpdate([*chat, {"role": "assistant", "content": shown}], sources, effective, pages=pages)
        finally:  # Stop closes this generator: end the model's generation and free its slot now
            close = getattr(events, "close", None)
            if close is not None:
                close()
        if not text:
            yield ChatUpdate([*chat, {"role": "assistant", "content": EMPTY_ANSWER}], sources, effective)
    except (ZhikuError, ValueError, OSError) as err:
        yield failed(readable(err))
    except Exception as err:
        log.exception("answering %r failed", question)
        yield failed(internal_error(err))


class Stopper:
    """One browser session's answers in progress, and what ends them. Stop ends the session's answer at its
    next piece of text, the way an answer ends by itself: the model's generation is closed and the event
    completes normally. (Gradio's ``cancels=`` on a streaming event can leave the browser waiting forever for
    the cancelled event, gradio-app/gradio#11586; our browser test met it on a busy machine.)

    Opening another conversation (or a new chat, or clearing it) *abandons* the answers in progress: they
    show nothing more, save what they had to their own conversation, and :meth:`switch` returns only once
    they have ended. Every update an answer sent is then already on its way to the browser, ahead of the
    opened conversation, so none of it can land in the chat just opened. Each switch also gives the chat a
    new *view*: an answer asked from the view before (one still waiting for a model slot, or sent while
    the previous one streamed) is abandoned when it begins.

    Each session gets its own (``gr.State`` deep-copies its initial value per session)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._count = 0
        self._running: dict[int, str] = {}  # ticket -> "" (answering), STOPPED or ABANDONED
        self._view = ""

    def __deepcopy__(self, memo: dict[int, Any]) -> Stopper:
        return Stopper()

    def begin(self, view: str | None = None) -> int:
        """A new answer starts, asked from ``view`` (None: the current one): its ticket for :meth:`state`;
        :meth:`end` it when it ends."""
        with self._changed:
            self._count += 1
            self._running[self._count] = "" if view is None or view == self._view else ABANDONED
            return self._count

    def end(self, ticket: int) -> None:
        with self._changed:
            self._running.pop(ticket, None)
            self._changed.notify_all()

    def state(self, ticket: int) -> str:
        """Empty while the answer goes on, else :data:`STOPPED` or :data:`ABANDONED`."""
        with self._changed:
            return self._running.get(ticket, "")

    def stop(self) -> None:
        """Stop the answers in progress (none that begins later)."""
        with self._changed:
            for ticket, state in self._running.items():
                self._running[ticket] = state or STOPPED

    def touched(self) -> bool:
        """Whether the chat has changed since the page loaded: an answer began, or another chat was opened."""
        with self._changed:
            return bool(self._count or self._view)

    def switch(self, timeout: float) -> str:
        """Abandon the answers in progress and wait up to ``timeout`` seconds for them to end; returns the
        new view. (Past the timeout, e.g. a model still reading a long prompt, an abandoned answer shows
        nothing more anyway: it checks before each update.)"""
        with self._changed:
            for ticket in self._running:
                self._running[ticket] = ABANDONED
            self._view = uuid.uuid4().hex
            if not self._changed.wait_for(lambda: not self._running, timeout):
                log.warning("an abandoned answer had not ended after %.0f s; the chat is switched anyway", timeout)
            return self._view


def until_stopped(updates: Iterator[ChatUpdate], stopper: Stopper | None, ticket: int) -> Iterator[ChatUpdate]:
    """``updates`` until the answer ``ticket`` is stopped or abandoned; then ``updates`` is closed, which ends
    the model's generation, and the answer shown so far is marked as stopped. The caller shows nothing of an
    abandoned answer, but saves it, mark included."""
    last: ChatUpdate | None = None
    try:
        for update in updates:
            if stopper is not None and stopper.state(ticket):
                break  # this piece came after the Stop: it is not shown
            yield update
            last = update if update.chat is not None else last
            if stopper is not None and stopper.state(ticket):
                break
        else:
            return
        if last is not None and last.chat and last.chat[-1]["role"] == "assistant":
            text = last.chat[-1]["content"]
            if not text.startswith(ERROR_MARK) and not text.endswith(STOPPED_MARK):
                yield ChatUpdate([*last.chat[:-1], {"role": "assistant", "content": f"{text}\n\n{STOPPED_MARK}"}])
    finally:
        close = getattr(updates, "close", None)
        if close is not None:
            close()


def ask(
    service: ChatService, question: str | None, chat: Sequence[Any] | None, controls: ChatControls
) -> Iterator[ChatUpdate]:
    """Send: answer the typed question after the chat shown so far."""
    question = (question or "").strip()
    if not question:
        yield ChatUpdate(None, warning=NO_QUESTION)
        return
    yield from answer(service, question, plain_chat(chat), controls)


def regenerate(service: ChatService, chat: Sequence[Any] | None, controls: ChatControls) -> Iterator[ChatUpdate]:
    """Answer the last question again, in place of its answer (or error)."""
    prior = plain_chat(chat)
    while prior and prior[-1]["role"] != "user":
        prior.pop()
    question = model_text(prior.pop()["content"]).strip() if prior else ""
    if not question:
        yield ChatUpdate(None, warning=NOTHING_TO_REGENERATE)
        return
    yield from answer(service, question, prior, controls)


# ----- knowledge bases and presets --------------------------------------------------------------------------
@dataclass(frozen=True)
class PresetUpdate:
    """The preset components after an action; None: unchanged."""

    choices: list[str] | None = None  # the preset list's choices, and with them its value:
    selected: str | None = None
    name: str | None = None  # the preset-name box
    prompt: str | None = None  # the system-prompt box
    info: str | None = None
    warning: str | None = None


@dataclass(frozen=True)
class Refresh:
    """What a page load shows: the knowledge bases and presets on disk now."""

    kbs: list[str]
    kb: str
    presets: list[str]
    preset: str | None
    warning: str | None = None


def preset_names(store: PresetStore) -> tuple[list[str], str | None]:
    """The saved presets' names, and a warning when they cannot be read."""
    try:
        return list(store.list()), None
    except (ZhikuError, ValueError, OSError) as err:
        return [], readable(err)
    except Exception as err:
        log.exception("listing presets failed")
        return [], internal_error(err)


def refresh(kbs: KnowledgeBaseService, store: PresetStore, kb_value: str | None, preset_value: str | None) -> Refresh:
    warnings: list[str] = []
    try:
        choices = kb_choices(kbs)
    except (ZhikuError, ValueError, OSError) as err:
        choices = [NO_KB]
        warnings.append(readable(err))
    except Exception as err:
        log.exception("listing knowledge bases failed")
        choices = [NO_KB]
        warnings.append(internal_error(err))
    if kb_value not in choices:
        kb_value = choices[1] if len(choices) > 1 else NO_KB
    names, problem = preset_names(store)
    warnings += [problem] if problem else []
    preset = preset_value if preset_value in names else None
    return Refresh(choices, kb_value or NO_KB, names, preset, "; ".join(warnings) or None)


def pick_preset(store: PresetStore, name: str | None) -> PresetUpdate:
    """Show a preset's text in the system-prompt box and its name in the name box."""
    if not name:
        return PresetUpdate()
    try:
        return PresetUpdate(prompt=store.get(name), name=name)
    except (ZhikuError, ValueError, OSError) as err:
        return PresetUpdate(warning=readable(err))
    except Exception as err:
        log.exception("reading preset %r failed", name)
        return PresetUpdate(warning=internal_error(err))


def save_preset(store: PresetStore, name: str | None, text: str | None) -> PresetUpdate:
    change = lambda: store.save(name or "", text or "")  # noqa: E731 - the name it was saved under
    return _change_presets(store, change, "已保存预设 / saved preset", "预设未保存 / preset not saved", keep=True)


def delete_preset(store: PresetStore, name: str | None, selected: str | None) -> PresetUpdate:
    """Delete the preset named in the name box, or else the one selected in the list."""
    target = (name or "").strip() or (selected or "")

    def delete() -> str:
        store.delete(target)
        return target.strip()

    return _change_presets(store, delete, "已删除预设 / deleted preset", "预设未删除 / preset not deleted", keep=False)


def _change_presets(
    store: PresetStore, change: Callable[[], str], done: str, failed: str, *, keep: bool
) -> PresetUpdate:
    """Run a change that returns the preset's name, and select it (``keep``) or clear the selection; on
    failure say why, never a blank "Error" (e.g. a read-only data dir)."""
    try:
        saved = change()
    except (ZhikuError, ValueError) as err:
        problem = readable(err)
    except OSError as err:
        problem = readable(cannot_write(err, store.path.name, store.path.parent))
    except Exception as err:
        log.exception("%s failed", failed)
        problem = internal_error(err)
    else:
        names, warning = preset_names(store)
        chosen = saved if keep else None
        return PresetUpdate(names, chosen, chosen or "", info=f"{done} “{saved}”", warning=warning)
    return PresetUpdate(warning=f"{failed}: {problem}")


# ----- upload -----------------------------------------------------------------------------------------------
Progress = Callable[[int, int, str], None]  # (files done, files in all, what is being done)


@dataclass(frozen=True)
class UploadUpdate:
    """The upload components after an upload; None: unchanged."""

    summary: str | None = None  # Markdown for the result box
    kbs: list[str] | None = None  # the knowledge-base list's new choices, and with them its value:
    kb: str | None = None  # None: keep the current one
    clear_files: bool = False
    warning: str | None = None


def upload_summary(result: UploadResult) -> tuple[str, bool]:
    """The result box's Markdown for an upload, and whether every file was ingested."""
    report = result.ingest.report if result.ingest else None
    lines = [f"**知识库 knowledge base: {md_cell(result.kb)}**", ""]
    if report is not None:
        lines.append(
            f"新增 added {report.count('added')} · 更新 updated {report.count('updated')} · "
            f"未变 unchanged {report.count('unchanged')} · 失败 failed {len(report.failures)} · "
            f"片段 chunks +{report.chunks_added}"
        )
        lines += [f"- ❌ {md_cell(Path(f.path).name)}: {md_cell(f.reason)}" for f in report.failures]
    lines += [f"- ❌ {md_cell(filename)}: {md_cell(reason)}" for filename, reason in result.rejected]
    complete = not result.rejected and not (report is not None and report.failures)
    return "\n".join(lines), complete


def upload(
    ingest: IngestService,
    kbs: KnowledgeBaseService,
    files: Sequence[str] | str | None,
    target: str | None,
    selected: str | None,
    progress: Progress | None = None,
) -> UploadUpdate:
    """Ingest uploaded files into the named knowledge base (created if new), or else the selected one."""
    paths = [files] if isinstance(files, str) else list(files or [])
    name = (target or "").strip() or kb_name(selected)
    if not paths:
        return UploadUpdate(warning="请先选择文件 / Choose files to upload first")
    if not name:
        return UploadUpdate(warning="请选择知识库或输入新知识库名称 / Pick a knowledge base or type a new name")
    done = 0

    def on_outcome(outcome: Any) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(paths), f"导入 / ingesting {Path(outcome.path).name}")

    try:
        if progress is not None:
            progress(0, len(paths), "导入 / ingesting")
        result = ingest.upload(name, paths, on_outcome=on_outcome)
        summary, complete = upload_summary(result)
        choices = kb_choices(kbs)
    except (ZhikuError, ValueError) as err:
        problem = readable(err)
    except OSError as err:  # storing the files: e.g. a read-only data dir
        problem = readable(cannot_write(err, "the uploaded files", ingest.settings.data_dir / "uploads"))
    except Exception as err:
        log.exception("upload into %r failed", name)
        problem = internal_error(err)
    else:
        warning = None if complete else "部分文件未导入 / some files were not ingested"
        return UploadUpdate(summary, choices, name if name in choices else None, clear_files=True, warning=warning)
    return UploadUpdate(f"{ERROR_MARK} {md_cell(problem)}", warning=problem)
