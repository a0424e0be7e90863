"""Retrieval evaluation on a question set whose gold answers are known.

Question file (JSON Lines, one object a line), e.g. ``../shared/data/dev/questions.jsonl``::

    {"id": "q1", "question": "...", "answers": ["gold text", "another accepted text"], "lang": "zh"}

An answer counts as retrieved when one of ``answers`` occurs verbatim in the retrieved text.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
            raise ValueError(
                f"{path.name} line {n}: not a question object ({err}); expected "
                '{"question": "...", "answers": ["..."]}'
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
    latencies_ms: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        n = max(self.questions, 1)
        lat = sorted(self.latencies_ms) or [0.0]
        return {
            "questions": self.questions,
            **{f"recall@{k}": round(self.hits_at.get(k, 0) / n, 4) for k in self.ks},
            "recall@budget": round(self.hits_budget / n, 4),
            "budget_chars": self.budget_chars,
            "mrr": round(sum(self.reciprocal_ranks) / n, 4),
            "p50_ms": round(statistics.median(lat), 1),
            "p95_ms": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1),
        }


def evaluate(
    questions: Sequence[Question],
    search: Callable[[str, int], list[Hit]],
    *,
    ks: tuple[int, ...] = (1, 3, 5, 10),
    budget_chars: int = 1500,
    context_k: int | None = None,
) -> EvalResult:
    """Recall@k (answer inside one of the top k passages), recall within the first ``budget_chars``
    characters of the top passages (all retrieved, or the first ``context_k``) joined in rank order, and MRR."""
    result = EvalResult(ks=ks, budget_chars=budget_chars)
    depth = max(ks)
    for q in questions:
        started = time.perf_counter()
        hits = search(q.question, depth)
        result.latencies_ms.append((time.perf_counter() - started) * 1000)
        result.questions += 1
        texts = [h.chunk.text for h in hits]
        first = next((i for i, t in enumerate(texts) if contains_answer(t, q.answers)), None)
        result.reciprocal_ranks.append(1.0 / (first + 1) if first is not None else 0.0)
        for k in ks:
            result.hits_at[k] = result.hits_at.get(k, 0) + (first is not None and first < k)
        context = "\n".join(texts[:context_k])[:budget_chars]
        result.hits_budget += contains_answer(context, q.answers)
    return result
