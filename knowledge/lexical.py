"""Word-level tokens for BM25: jieba for Chinese, lower-cased words and numbers for everything else."""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Any

# Runs of Han characters go to jieba; Latin words, numbers and other scripts' words are taken whole.
_PIECES = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]+|[^\W_\u3400-\u9fff\uf900-\ufaff]+", re.UNICODE)
_HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@lru_cache(maxsize=1)
def _jieba() -> Any:
    import jieba  # lazily: building its dictionary takes ~0.4 s

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def tokenize(text: str) -> list[str]:
    """Search tokens of ``text``. Chinese uses jieba's search mode (long words and their parts), so
    "路口镇" matches both "路口镇" and "路口"."""
    tokens: list[str] = []
    for piece in _PIECES.findall(text):
        if _HAN.match(piece):
            tokens.extend(t for t in _jieba().cut_for_search(piece) if t.strip())
        else:
            tokens.append(piece.lower())
    return tokens


def fts_document(text: str) -> str:
    """Tokens joined by spaces: what the SQLite FTS5 index stores (its own tokenizer splits on spaces)."""
    return " ".join(tokenize(text))


def fts_query(text: str) -> str:
    """An FTS5 query that matches any of the question's tokens (BM25 ranks the matches)."""
    unique = dict.fromkeys(t.replace('"', '""') for t in tokenize(text))
    return " OR ".join(f'"{t}"' for t in unique)
