"""The chat service: the one place where retrieval and generation meet.

Callable without Gradio (CLI, UI and a future HTTP API use it alike). It keeps no conversation state:
each call gets the conversation's history and settings, so browser sessions never share anything.
"""

from __future__ import annotations

import contextlib
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.container import Zhiku
from knowledge.retrieval import Passage
from knowledge.store import FaissKnowledgeBase
from llms.base import ChatBackend, GenerationOptions, Message, fit_messages

_CJK = re.compile(r"[\u4e00-\u9fff]")


def is_chinese(text: str) -> bool:
    """The question's language picks the system prompt: any Han character counts as Chinese."""
    return bool(_CJK.search(text))


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

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "path": self.path, "page": self.page, "snippet": self.snippet, "score": self.score}


@dataclass
class ChatRequest:
    question: str
    history: list[Message] = field(default_factory=list)  # earlier user/assistant turns, oldest first
    kb: str | None = None  # None: chat without a knowledge base
    system_prompt: str | None = None  # None: the config's default for the question's language
    options: GenerationOptions | None = None
    top_k: int | None = None
    conversation_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class SourcesEvent:
    sources: list[Source]


@dataclass(frozen=True)
class TextEvent:
    text: str


ChatEvent = SourcesEvent | TextEvent


class ChatService:
    """Shared by all sessions of a process; holds only shared resources (models, open knowledge bases)."""

    def __init__(self, zhiku: Zhiku) -> None:
        self.zhiku = zhiku
        self.settings = zhiku.settings
        self._lock = threading.Lock()
        self._backends: dict[str, ChatBackend] = {}
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._kbs: dict[str, FaissKnowledgeBase] = {}
        self._kb_lock = threading.Lock()

    # ----- resources ---------------------------------------------------------------------------
    def backend(self, name: str | None = None) -> ChatBackend:
        return self._backend_and_slot(name)[0]

    def _backend_and_slot(self, name: str | None = None) -> tuple[ChatBackend, threading.BoundedSemaphore]:
        name = name or self.settings.llm.backend
        with self._lock:
            if name not in self._backends:
                options = self.settings.llm.options_for(name)
                if name == "default" and not options.get("cache_dir"):
                    options["cache_dir"] = str(self.settings.data_dir / "models")
                self._backends[name] = self.zhiku.llm_factories.get(name)(options)
                self._slots[name] = threading.BoundedSemaphore(self.settings.llm.max_concurrent)
            return self._backends[name], self._slots[name]

    def retrieve(self, kb: str, question: str, k: int) -> list[Passage]:
        """Passages from a knowledge base (reopened when an ingest committed a newer generation)."""
        with self._kb_lock:
            store = self._kbs.get(kb)
            if store is None or store.is_stale():
                if store is not None:
                    del self._kbs[kb]  # closed now: never left cached if the reopen fails
                    store.close()
                store = self._kbs[kb] = self.zhiku.open_kb(kb, readonly=True)
            return self.zhiku.retriever(store).context(question, k)

    def knowledge_bases(self) -> list[str]:
        return self.zhiku.catalog.names()

    # ----- prompting ---------------------------------------------------------------------------
    def default_system_prompt(self, question: str) -> str:
        chat = self.settings.chat
        return chat.system_prompt_zh if is_chinese(question) else chat.system_prompt_en

    def build_messages(self, request: ChatRequest, passages: Sequence[Passage]) -> list[Message]:
        chat = self.settings.chat
        system = request.system_prompt if request.system_prompt is not None else None
        system = system or self.default_system_prompt(request.question)
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

    # ----- answering ---------------------------------------------------------------------------
    def stream(self, request: ChatRequest) -> Iterator[ChatEvent]:
        """Sources first (possibly empty), then the answer in pieces."""
        question = request.question.strip()
        if not question:
            raise ValueError("the question is empty")
        options = request.options or self.settings.chat.generation
        k = self.settings.chat.top_k if request.top_k is None else request.top_k
        passages = self.retrieve(request.kb, question, k) if request.kb and k > 0 else []
        yield SourcesEvent([Source.from_passage(p) for p in passages])
        backend, slot = self._backend_and_slot()
        messages = fit_messages(backend, self.build_messages(request, passages), options.max_new_tokens)
        # bounded concurrency: extra requests wait here; closing() ends the generation as soon as the
        # consumer stops (UI stop button, client gone) instead of whenever the generator is collected
        with slot, contextlib.closing(backend.stream(messages, options)) as pieces:
            for piece in pieces:
                yield TextEvent(piece)
