"""Question -> ranked passages with their sources."""

from __future__ import annotations

from knowledge.embedding import Embedder
from knowledge.store import FaissKnowledgeBase, Hit


class VectorRetriever:
    """Top-k by cosine similarity of normalised embeddings."""

    def __init__(self, kb: FaissKnowledgeBase, embedder: Embedder) -> None:
        kb.check_compatible(embedder.model_id, embedder.dim)
        self.kb = kb
        self.embedder = embedder

    def search(self, question: str, k: int) -> list[Hit]:
        question = question.strip()
        if not question:
            raise ValueError("the question is empty")
        return self.kb.search(self.embedder.embed_query(question), k)
