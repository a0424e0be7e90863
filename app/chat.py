"""The chat service: the one place where retrieval and generation meet.

Callable without Gradio (CLI, UI and a future HTTP API use it alike). It keeps no conversation state:
each call gets the conversation's history and settings, so browser sessions never share anything.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from app.settings import Settings
from common.errors import InvalidRequestError
from common.text import has_han
from knowledge.library import KnowledgeLibrary
from knowledge.retrieval import Passage
from llms.base import ChatBackend, GenerationOptions, Message, fit_messages


def is_chinese(text: str) -> bool:
    """The question's language picks the system prompt: any Han character counts as Chinese."""
    return has_han(text)


@dataclass(frozen=True)
class Source:
    file: str
    path: str
    page: int | None
    snippet: str
    score: float

    @classmethod
    def from_passage(cls, passage: Passage) -> Source:
        score = passage.similarity if passage.similarity is not None else passage.score
        return cls(Path(passage.source).name, passage.source, passage.page, passage.text, score)

    def label(self) -> str:
        return f"{self.file}" + (f" p.{self.page}" if self.page is not None else "")



@dataclass
class ChatRequest:
    question: str
    history: list[Message] = field(default_factory=list)  # earlier user/assistant turns, oldest first
    kb: str | None = None  # None: chat without a knowledge base
    system_prompt: str | None = None  # None: the config's default for the question's language
    options: GenerationOptions | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class SourcesEvent:
    sources: list[Source]


@dataclass(frozen=True)
class TextEvent:
    text: str


ChatEvent = SourcesEvent | TextEvent


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

    def build_messages(self, request: ChatRequest, passages: Sequence[Passage]) -> list[Message]:
        chat = self.settings.chat
        system = request.system_prompt or self.default_system_prompt(request.question)
        content = request.question
        zh = is_chinese(request.question)
        quoted: tuple[str, ...] = ()
        if request.kb and not passages:  # say so, rather than let the model think it was given context
            content = (chat.no_context_template_zh if zh else chat.no_context_template_en).format(
                question=request.question
            )
        if passages:
            sources = [Source.from_passage(p) for p in passages]
            quoted = tuple(s.snippet for s in sources)
            rendered = "\n\n".join(
                chat.passage_template.format(
                    n=n, file=s.file, page=f" p.{s.page}" if s.page is not None else "", text=s.snippet
                )
                for n, s in enumerate(sources, 1)
            )
            template = chat.context_template_zh if zh else chat.context_template_en
            content = template.format(passages=rendered, question=request.question)
        turns = [m for m in request.history if m.role in ("user", "assistant")]
        return [Message("system", system), *turns, Message("user", content, quoted)]

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
        """Sources first (possibly empty), then the answer in pieces."""
        request = self.checked(request)
        options = request.options or self.settings.chat.generation
        k = self.settings.chat.top_k if request.top_k is None else request.top_k
        passages = self.retrieve(request.kb, request.question, k) if request.kb and k > 0 else []
        yield SourcesEvent([Source.from_passage(p) for p in passages])
        backend, slot = self._backend_and_slot()
        messages = fit_messages(backend, self.build_messages(request, passages), options.max_new_tokens)
        # bounded concurrency: extra requests wait here; closing() ends the generation as soon as the
        # consumer stops (UI stop button, client gone) instead of whenever the generator is collected
        with slot, contextlib.closing(backend.stream(messages, options)) as pieces:
            for piece in pieces:
                yield TextEvent(piece)
