"""The chat service: the one place where retrieval and generation meet.

Callable without Gradio (CLI, UI and a future HTTP API use it alike). It keeps no conversation state:
each call gets the conversation's history and settings, so browser sessions never share anything.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from app.settings import Settings
from common.errors import InvalidRequestError
from common.text import has_han
from knowledge.evidence import (
    CITATION,
    LEADING_CITATIONS,
    NOT_FOUND_EN,
    NOT_FOUND_ZH,
    best_quotes,
    citations,
    cite,
    coverage,
    is_follow_up,
    is_not_found,
    normalize,
    select_evidence,
)
from knowledge.library import KnowledgeLibrary
from knowledge.retrieval import Passage
from llms.base import ChatBackend, CutShort, GenerationOptions, Message, fit_messages


def is_chinese(text: str) -> bool:
    """The question's language picks the system prompt: any Han character counts as Chinese."""
    return has_han(text)


# What the start of a reply may be while it could still become a citation marker: "", " ", "[", "[1"
_MARKER_SO_FAR = re.compile(r"\s*(?:\[\d{0,2})?")


def without_leading_citations(pieces: Iterable[str]) -> Iterator[str]:
    """Streamed pieces without the "[1] " a small model copies from the passages' layout at the start of
    its reply, as the answer shown at the end drops it: the first piece waits until the reply's start is
    clearly not a marker."""
    stream = iter(pieces)
    head = ""
    for piece in stream:
        head += piece
        rest = LEADING_CITATIONS.sub("", head)
        if not _MARKER_SO_FAR.fullmatch(rest):
            yield rest
            break
    yield from stream


@dataclass(frozen=True)
class Source:
    file: str
    path: str
    page: int | None
    snippet: str
    score: float

    @classmethod
    def from_passage(cls, passage: Passage) -> Source:
        return cls(Path(passage.source).name, passage.source, passage.page, passage.text, passage.relevance)

    def label(self) -> str:
        return f"{self.file}" + (f" p.{self.page}" if self.page is not None else "")

    def to_json(self, index: int) -> dict[str, Any]:
        """What ``chat --json`` and the API give for the source an answer cites as ``[index]``."""
        return {
            "index": index,
            "file": self.file,
            "path": self.path,
            "page": self.page,
            "score": round(self.score, 4),
            "snippet": self.snippet,
        }


@dataclass
class ChatRequest:
    question: str
    history: list[Message] = field(default_factory=list)  # earlier user/assistant turns, oldest first
    kb: str | None = None  # None: chat without a knowledge base
    system_prompt: str | None = None  # None: the config's default for the question's language
    options: GenerationOptions | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class StatusEvent:
    """What the service is doing before the first word of the answer: ``searching`` the knowledge base,
    ``reading`` ``passages`` passages (the model's prompt evaluation), or ``thinking`` (the model at work
    without passages)."""

    stage: str
    passages: int = 0


@dataclass(frozen=True)
class SourcesEvent:
    """The passages the answer may cite, best first; [n] in the answer is ``sources[n - 1]``."""

    sources: list[Source]


@dataclass(frozen=True)
class TextEvent:
    text: str


@dataclass(frozen=True)
class AnswerEvent:
    """The last event: the whole answer as it should be shown — with [n] markers attached where the model
    gave none and, when configured, the source sentence that supports it. ``not_found``: the reply says the
    knowledge base does not hold the answer. ``evidence``: the passage text the model read."""

    text: str
    not_found: bool = False
    cited: tuple[int, ...] = ()
    evidence: tuple[str, ...] = ()
    cut_short: bool = False  # the model stopped at max_new_tokens: the answer may be unfinished
    # what follows the model's words in ``text`` (the quoted sources): a stream that cannot replace what it
    # sent (the API's) ends with this instead
    appended: str = ""
    prompt_tokens: int = 0  # what the model read, in its own tokens (0: the model was not asked)
    completion_tokens: int = 0  # what it wrote


ChatEvent = StatusEvent | SourcesEvent | TextEvent | AnswerEvent


class ChatService:
    """Shared by all sessions of a process; holds only shared resources (backends and their slots). The
    knowledge bases are the library's; nothing here calls back into the code that built it."""

    def __init__(
        self, settings: Settings, library: KnowledgeLibrary, make_backend: Callable[[str], ChatBackend]
    ) -> None:
        self.settings = settings
        self.library = library
        self._make_backend = make_backend
        self._lock = threading.Lock()
        self._backends: dict[str, tuple[ChatBackend, threading.BoundedSemaphore]] = {}

    # ----- resources ---------------------------------------------------------------------------
    def backend(self, name: str | None = None) -> ChatBackend:
        return self._backend_and_slot(name)[0]

    def _backend_and_slot(self, name: str | None = None) -> tuple[ChatBackend, threading.BoundedSemaphore]:
        name = name or self.settings.llm.backend
        with self._lock:
            if name not in self._backends:
                slot = threading.BoundedSemaphore(self.settings.llm.max_concurrent)
                self._backends[name] = (self._make_backend(name), slot)
            return self._backends[name]

    def retrieve(self, kb: str, question: str, k: int) -> list[Passage]:
        """Passages from a knowledge base, all from one committed generation of it."""
        return self.library.retriever(kb).context(question, k)

    def knowledge_bases(self) -> list[str]:
        return self.library.names()

    # ----- prompting ---------------------------------------------------------------------------
    def default_system_prompt(self, question: str) -> str:
        chat = self.settings.chat
        return chat.system_prompt_zh if is_chinese(question) else chat.system_prompt_en

    def search_query(self, request: ChatRequest) -> str:
        """What retrieval searches for: the question, and for a follow-up ("他为什么要出山？", "and its
        length?") the user's previous question too, which names what the pronoun or ellipsis refers to."""
        previous = next((m.content for m in reversed(request.history) if m.role == "user"), None)
        if previous and is_follow_up(request.question):
            return f"{previous}\n{request.question}"
        return request.question

    def evidence(self, query: str, passages: Sequence[Passage]) -> list[str]:
        """Per passage, what the model reads: its sentences that best match the query (within
        ``chat.evidence_budget`` tokens in all; an empty string for a passage that gave none), or the whole
        passages when the budget is 0. A small model answers better from three sentences than from five
        paragraphs, and reads them faster."""
        texts = [p.text for p in passages]
        budget = self.settings.chat.evidence_budget
        if not budget:
            return texts
        return select_evidence(query, texts, budget)

    def build_messages(
        self, request: ChatRequest, passages: Sequence[Passage], evidence: Sequence[str] | None = None
    ) -> list[Message]:
        """System prompt, earlier turns, and the question — with the passages' evidence when there are
        passages; [n] in the prompt is ``passages[n - 1]`` whichever of them gave evidence."""
        chat = self.settings.chat
        system = request.system_prompt or self.default_system_prompt(request.question)
        content = request.question
        quoted: tuple[str, ...] = ()
        if passages:
            texts = [p.text for p in passages] if evidence is None else list(evidence)
            quoted = tuple(t for t in texts if t)
            rendered = "\n".join(chat.passage_template.format(n=n, text=t) for n, t in enumerate(texts, 1) if t)
            template = chat.context_template_zh if is_chinese(request.question) else chat.context_template_en
            content = template.format(passages=rendered, question=request.question)
        turns = [m for m in request.history if m.role in ("user", "assistant")]
        return [Message("system", system), *turns, Message("user", content, quoted)]

    def not_found_reply(self, question: str) -> str:
        return NOT_FOUND_ZH if is_chinese(question) else NOT_FOUND_EN

    def holds_answer(self, query: str, passages: Sequence[Passage]) -> bool:
        """Whether the passages can answer: some passage contains enough of the query's content words
        (``chat.min_coverage``). Off-topic questions still retrieve passages above the similarity floor
        (E5 gives unrelated Chinese text 0.80-0.88), but those passages do not name the question's subject."""
        if not passages:
            return False
        return coverage(query, [p.text for p in passages]) >= self.settings.chat.min_coverage

    def finish(self, query: str, answer: str, passages: Sequence[Passage], evidence: Sequence[str] = ()) -> AnswerEvent:
        """The answer as shown: [n] markers where the model gave none, and the source text that answers
        ``query`` (what retrieval searched for: a follow-up with the question it follows), when
        ``chat.quote_evidence``. A reply with no words of its own (the small model sometimes echoes the
        passages' "[1]" and stops) is replaced by that source text."""
        if not passages:
            return AnswerEvent(answer)
        if is_not_found(answer):
            return AnswerEvent(answer, not_found=True, evidence=tuple(evidence))
        texts = [p.text for p in passages]
        chat = self.settings.chat
        answer = LEADING_CITATIONS.sub("", answer)  # "[1] 2个社区" copies the passages' layout
        words = normalize(CITATION.sub("", answer))
        quoting = chat.quote_evidence or not words
        quotes = best_quotes(query, texts, chat.quote_min_chars, chat.quotes) if quoting else []
        if quotes and not words:
            shown = appended = "\n\n".join(f"{q.text}[{q.passage + 1}]" for q in quotes)
        else:
            shown, appended = cite(answer, texts), ""
            quoted = [f"> {q.text} [{q.passage + 1}]" for q in quotes if normalize(q.text) not in words]
            if quoted:
                appended = "\n\n" + "\n>\n".join(quoted)
                shown = shown.rstrip() + appended
        return AnswerEvent(shown, cited=tuple(citations(shown)), evidence=tuple(evidence), appended=appended)

    def checked(self, request: ChatRequest) -> ChatRequest:
        """The request within the configured bounds, so one huge request cannot hold retrieval or a
        generation slot for minutes: a clear error for an over-long question or history, and only the
        newest ``chat.max_history_messages`` turns kept (older ones would be trimmed to fit anyway)."""
        chat = self.settings.chat
        question = request.question.strip()
        if not question:
            raise InvalidRequestError("the question is empty", "type a question")
        if len(question) > chat.max_question_chars:
            raise InvalidRequestError(
                f"the question is {len(question):,} characters long; at most {chat.max_question_chars:,} are accepted",
                "ask a shorter question, or upload long text into a knowledge base and ask about it",
            )
        if request.system_prompt is not None and len(request.system_prompt) > chat.max_question_chars:
            raise InvalidRequestError(
                f"the system prompt is {len(request.system_prompt):,} characters long; at most "
                f"{chat.max_question_chars:,} are accepted",
                "shorten the system prompt",
            )
        history = [m for m in request.history if m.role in ("user", "assistant")][-chat.max_history_messages :]
        if history and history[0].role == "assistant":
            history = history[1:]  # a turn starts with the user's message
        size = sum(len(m.content) for m in history)
        if size > chat.max_history_chars:
            raise InvalidRequestError(
                f"the conversation's last {len(history)} messages hold {size:,} characters; at most "
                f"{chat.max_history_chars:,} are accepted",
                "start a new conversation",
            )
        return replace(request, question=question, history=history)

    # ----- answering ---------------------------------------------------------------------------
    def stream(self, request: ChatRequest) -> Iterator[ChatEvent]:
        """With a knowledge base: ``searching``, the sources, ``reading``, the answer in pieces, and the
        answer as shown (:class:`AnswerEvent`). When the knowledge base does not hold the answer, no
        sources and the not-found reply, without asking the model (so it cannot answer from memory)."""
        request = self.checked(request)
        chat = self.settings.chat
        options = request.options or chat.generation
        k = chat.top_k if request.top_k is None else request.top_k
        passages: list[Passage] = []
        query = request.question
        if request.kb and k > 0:
            yield StatusEvent("searching")
            query = self.search_query(request)
            # the pipeline picks the passages; they are numbered by the score shown (cosine similarity)
            passages = sorted(self.retrieve(request.kb, query, k), key=lambda p: -p.relevance)
            if not self.holds_answer(query, passages):
                reply = self.not_found_reply(request.question)
                yield SourcesEvent([])
                yield TextEvent(reply)
                yield AnswerEvent(reply, not_found=True)
                return
            if chat.greedy_with_context:
                options = options.model_copy(update={"temperature": 0.0})
        yield SourcesEvent([Source.from_passage(p) for p in passages])
        backend, slot = self._backend_and_slot()
        evidence = self.evidence(query, passages) if passages else None
        messages = fit_messages(backend, self.build_messages(request, passages, evidence), options.max_new_tokens)
        # something on screen until the first word: reading the passages, or the model at work (a remote
        # server may take seconds to answer, or a model to load)
        yield StatusEvent("reading", len(passages)) if passages else StatusEvent("thinking")
        answer, cut_short = "", []

        def text(pieces: Iterable[str]) -> Iterator[str]:
            for piece in pieces:
                if isinstance(piece, CutShort):
                    cut_short.append(True)
                else:
                    yield piece

        # bounded concurrency: extra requests wait here; closing() ends the generation as soon as the
        # consumer stops (UI stop button, client gone) instead of whenever the generator is collected
        with slot, contextlib.closing(backend.stream(messages, options)) as pieces:
            for piece in without_leading_citations(text(pieces)) if passages else text(pieces):
                answer += piece
                yield TextEvent(piece)
        read = backend.count_tokens(messages)
        written = backend.count_tokens([*messages, Message("assistant", answer)]) - read if answer else 0
        yield replace(
            self.finish(query, answer, passages, evidence or ()),
            cut_short=bool(cut_short),
            prompt_tokens=read,
            completion_tokens=max(written, 1 if answer else 0),
        )
