"""Answer evaluation: the real chat service (configured LLM, prompt and retrieval) end to end on
questions with known answers.

A question with an empty ``answers`` list is *unanswerable* from the knowledge base: the right reply says
the knowledge base does not hold the answer. An answer is right when a gold answer occurs in the reply
as shown (citations and the supporting sentence included), ignoring case, width, spaces and punctuation.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.chat import AnswerEvent, ChatRequest, ChatService, TextEvent
from knowledge.evaluation import Question
from knowledge.evidence import CITATION, contains_normalized, is_not_found
from llms.base import GenerationOptions


@dataclass(frozen=True)
class AnswerRun:
    """One question as the chat service answered it."""

    question: Question
    answer: str
    context: str  # what the model read (the evidence from the passages)
    not_found: bool
    ttft_s: float | None  # seconds to the first piece of the answer
    total_s: float

    @property
    def correct(self) -> bool:
        """A gold answer occurs in the answer, its [n] markers aside (they annotate, they are not its words)."""
        return contains_normalized(CITATION.sub("", self.answer), self.question.answers)

    @property
    def in_context(self) -> bool:
        return contains_normalized(self.context, self.question.answers)

    def to_json(self) -> dict[str, Any]:
        """One line of ``eval --answers --dump``: the question, its gold answers and what happened."""
        q = self.question
        return {
            "id": q.id,
            "question": q.question,
            "answers": list(q.answers),
            "lang": q.lang,
            "answer": self.answer,
            "correct": self.correct if q.answers else self.not_found,
            "in_context": self.in_context if q.answers else None,
            "not_found": self.not_found,
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 3),
            "total_s": round(self.total_s, 3),
        }


def ask(service: ChatService, kb: str, question: Question, options: GenerationOptions | None = None) -> AnswerRun:
    started = time.perf_counter()
    first: float | None = None
    streamed = ""
    final: AnswerEvent | None = None
    for event in service.stream(ChatRequest(question.question, kb=kb, options=options)):
        if isinstance(event, TextEvent) and event.text:
            first = first if first is not None else time.perf_counter() - started
            streamed += event.text
        elif isinstance(event, AnswerEvent):
            final = event
    answer = final.text if final is not None else streamed
    not_found = final.not_found if final is not None else is_not_found(answer)
    context = "\n".join(final.evidence) if final is not None else ""
    return AnswerRun(question, answer, context, not_found, first, time.perf_counter() - started)


@dataclass
class AnswerEvalResult:
    runs: list[AnswerRun] = field(default_factory=list)

    def to_json(self, *, by_language: bool = True) -> dict[str, Any]:
        answerable = [r for r in self.runs if r.question.answers]
        unanswerable = [r for r in self.runs if not r.question.answers]
        ttft = [r.ttft_s for r in self.runs if r.ttft_s is not None]
        totals = sorted(r.total_s for r in self.runs)

        def share(runs: Sequence[AnswerRun], test: Callable[[AnswerRun], bool]) -> float | None:
            return round(sum(map(test, runs)) / len(runs), 4) if runs else None

        out: dict[str, Any] = {
            "answer_acc": share(answerable, lambda r: r.correct),
            "answer_in_context": share(answerable, lambda r: r.in_context),
            "not_found_rate": share(unanswerable, lambda r: r.not_found),
            "false_not_found": share(answerable, lambda r: r.not_found),
            "p50_ttft_s": round(statistics.median(ttft), 3) if ttft else None,
            "p50_s": round(statistics.median(totals), 3) if totals else None,
            "p95_s": round(totals[min(len(totals) - 1, int(0.95 * len(totals)))], 3) if totals else None,
            "questions": len(self.runs),
        }
        if by_language:
            langs = sorted({r.question.lang for r in self.runs})
            out["by_language"] = {
                lang: AnswerEvalResult([r for r in self.runs if r.question.lang == lang]).to_json(by_language=False)
                for lang in langs
            }
        return out


def evaluate_answers(
    service: ChatService, kb: str, questions: Iterable[Question], options: GenerationOptions | None = None
) -> AnswerEvalResult:
    result = AnswerEvalResult()
    for q in questions:
        result.runs.append(ask(service, kb, q, options))
    return result
