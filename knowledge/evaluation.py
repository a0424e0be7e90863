"""Retrieval evaluation on a question set whose gold answers are known.

Question file (JSON Lines, one object a line), e.g. ``../shared/data/dev/questions.jsonl``::

    {"id": "q1", "question": "...", "answers": ["gold text", "another accepted text"], "lang": "zh"}

An answer counts as retrieved when one of ``answers`` occurs verbatim in the retrieved text.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import InvalidRequestError
from knowledge.store import Hit


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]
    lang: str = "zh"


def load_questions(path: Path) -> list[Question]:
    out: list[Question] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append(Question(str(obj.get("id", n)), obj["question"], tuple(obj["answers"]), obj.get("lang", "zh")))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InvalidRequestError(
                f"{path.name} line {n}: not a question object ({err})",
                'write one {"question": "...", "answers": ["..."]} object per line',
            ) from None
    return out


def contains_answer(text: str, answers: Sequence[str]) -> bool:
    return any(a and a in text for a in answers)


@dataclass
class EvalResult:
    ks: tuple[int, ...]
    budget_chars: int
    questions: int = 0
    hits_at: dict[int, int] = field(default_factory=dict)
    hits_budget: int = 0
    reciprocal_ranks: list[float] = field(default_factory=list)
    context_chars: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    by_language: dict[str, EvalResult] = field(default_factory=dict)

    def add(self, hits_rank: int | None, in_budget: bool, context_chars: int, latency_ms: float) -> None:
        self.questions += 1
        self.reciprocal_ranks.append(1.0 / (hits_rank + 1) if hits_rank is not None else 0.0)
        for k in self.ks:
            self.hits_at[k] = self.hits_at.get(k, 0) + (hits_rank is not None and hits_rank < k)
        self.hits_budget += in_budget
        self.context_chars.append(context_chars)
        self.latencies_ms.append(latency_ms)

    def to_json(self) -> dict[str, Any]:
        n = max(self.questions, 1)
        lat = sorted(self.latencies_ms) or [0.0]
        out: dict[str, Any] = {
            "questions": self.questions,
            **{f"recall@{k}": round(self.hits_at.get(k, 0) / n, 4) for k in self.ks},
            "recall@budget": round(self.hits_budget / n, 4),
            "budget_chars": self.budget_chars,
            "mrr": round(sum(self.reciprocal_ranks) / n, 4),
            "mean_context_chars": round(sum(self.context_chars) / n, 1),
            "p50_ms": round(statistics.median(lat), 1),
            "p95_ms": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1),
        }
        if self.by_language:
            out["by_language"] = {lang: r.to_json() for lang, r in sorted(self.by_language.items())}
        return out


def evaluate(
    questions: Iterable[Question],
    search: Callable[[str, int], list[Hit]],
    context: Callable[[str, int], list[str]],
    *,
    ks: tuple[int, ...] = (1, 3, 5, 10),
    budget_chars: int = 1500,
) -> EvalResult:
    """recall@k: a gold answer inside one of the top k retrieved chunks; MRR over those ranks.
    recall@budget: a gold answer inside the context as the LLM would get it (``context(question,
    budget_chars)``: passages joined in order), cut at ``budget_chars`` — bigger chunks cannot buy recall.
    Latency is the search call's."""
    result = EvalResult(ks=ks, budget_chars=budget_chars)
    depth = max(ks)
    for q in questions:
        started = time.perf_counter()
        hits = search(q.question, depth)
        latency = (time.perf_counter() - started) * 1000
        rank = next((i for i, h in enumerate(hits) if contains_answer(h.chunk.text, q.answers)), None)
        text = "\n".join(context(q.question, budget_chars))[:budget_chars]
        in_budget = contains_answer(text, q.answers)
        result.add(rank, in_budget, len(text), latency)
        lang = result.by_language.setdefault(q.lang, EvalResult(ks=ks, budget_chars=budget_chars))
        lang.add(rank, in_budget, len(text), latency)
    return result
