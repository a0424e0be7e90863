"""One chat protocol for every LLM backend.

A chat is a list of :class:`Message` (system / user / assistant, the same shape for every backend) plus
:class:`GenerationOptions`; a backend streams text. Each backend owns its prompt format and its context
window; :func:`fit_messages` trims history oldest-first so that the prompt plus ``max_new_tokens`` fit.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from common.errors import InvalidRequestError

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    # The retrieved passages a user message was built from (already rendered into ``content``); prompt
    # formats ignore it, the extractive fallback quotes it.
    context: tuple[str, ...] = ()


class GenerationOptions(BaseModel):
    """Sampling settings shared by every backend. Unknown options are an error that names them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, description="0 = off")
    max_new_tokens: int = Field(512, ge=1, le=32768)
    stop: list[str] = Field(default_factory=list, description="extra stop strings")
    seed: int | None = Field(None, description="fixed seed for reproducible sampling")


class ContextOverflowError(InvalidRequestError):
    """The newest message alone does not fit the model's context window."""


@runtime_checkable
class ChatBackend(Protocol):
    """What the chat service needs from an LLM. Implementations load their model lazily."""

    name: str

    @property
    def context_window(self) -> int:
        """Tokens the model attends to: prompt and generated tokens together."""
        ...

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt tokens of ``messages`` in this backend's own format (with the generation prompt when the
        last message is the user's)."""
        ...

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Generator[str, None, None]:
        """Yield the reply in pieces; stops at the model's end marker, a stop string or max_new_tokens. A
        reply that ended at max_new_tokens ends with :data:`CUT_SHORT` (where the backend can tell)."""
        ...


class CutShort(str):
    """The type of :data:`CUT_SHORT`: an empty last piece, so that a consumer that only joins text is unaffected."""


CUT_SHORT = CutShort()  # the reply stopped at max_new_tokens: it may be unfinished


LLMFactory = Callable[[Any], ChatBackend]  # factory(its settings model, validated) -> backend


class NoOptions(BaseModel):
    """The options of a backend that has none: any key is an error that names it."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class LLMSpec:
    """A registered backend: its factory and the pydantic model of its ``llm.<name>`` options."""

    factory: LLMFactory
    settings: type[BaseModel] = NoOptions

    def build(self, options: BaseModel) -> ChatBackend:
        return self.factory(options)


class LLMCatalog:
    """Builds registered backends by name with their validated options (the app validates every
    ``llm.<name>`` section at start-up and hands the results here)."""

    def __init__(self, spec_of: Callable[[str], LLMSpec], options: Mapping[str, BaseModel]) -> None:
        self._spec_of = spec_of
        self._options = dict(options)

    def build(self, name: str) -> ChatBackend:
        spec = self._spec_of(name)  # an unknown name is an error listing the registered ones
        return spec.build(self._options.get(name) or spec.settings())


def fit_messages(backend: ChatBackend, messages: Sequence[Message], max_new_tokens: int) -> list[Message]:
    """Drop the oldest turns (never the system prompt or the newest user message) until the prompt plus
    ``max_new_tokens`` fits the context window. Assistant replies go with the user turn before them."""
    if any(m.role == "system" for m in messages[1:]):
        raise ValueError("a system message may only come first")
    system = list(messages[:1]) if messages and messages[0].role == "system" else []
    turns = list(messages[len(system) :])
    if not turns or turns[-1].role != "user":
        raise ValueError("the last message must be the user's")
    budget = backend.context_window - max_new_tokens
    while True:
        candidate = system + turns
        if backend.count_tokens(candidate) <= budget:
            return candidate
        if len(turns) == 1:
            raise ContextOverflowError(
                f"the question and its context need {backend.count_tokens(candidate)} tokens, but "
                f"{backend.name} has {backend.context_window} with {max_new_tokens} kept for the answer; "
                "ask a shorter question, lower retrieval top-k or max_new_tokens"
            )
        # drop the oldest user turn and the assistant reply that answered it
        turns = turns[2:] if len(turns) > 2 and turns[1].role == "assistant" else turns[1:]


def chat_completion_request(messages: Sequence[Message], options: GenerationOptions) -> dict[str, Any]:
    """The OpenAI chat-completion arguments both llama-cpp-python and OpenAI-compatible servers take
    (top_k is not among them: each passes it its own way)."""
    return {
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "temperature": options.temperature,
        "top_p": options.top_p,
        "max_tokens": options.max_new_tokens,
        "stop": list(options.stop) or None,
        "seed": options.seed,
        "stream": True,
    }


def apply_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop string; the flag says whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stream_with_stops(
    pieces: Iterator[str], stops: Sequence[str], at_limit: Callable[[], bool] | None = None
) -> Iterator[str]:
    """Stream pieces, holding back just enough text to never emit the start of a stop string. When the pieces
    end without one and ``at_limit()`` says the model stopped at max_new_tokens, end with :data:`CUT_SHORT`."""
    stops = [s for s in stops if s]
    hold = max((len(s) for s in stops), default=1) - 1
    buffer = ""
    for piece in pieces:
        buffer += piece
        text, stopped = apply_stop(buffer, stops)
        if stopped:
            if text:
                yield text
            return
        if len(buffer) > hold:
            cut = len(buffer) - hold
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer
    if at_limit is not None and at_limit():
        yield CUT_SHORT
