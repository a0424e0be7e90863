"""Token ids for BERT WordPiece tokenizers of Chinese (bert-base-chinese's kind: m3e, bge-zh, text2vec), the
same as the tokenizer's, at a fifth of its CPU time.

Such a tokenizer makes every CJK ideograph and every punctuation mark a word of its own, and a one-character
word is its vocabulary entry or ``[UNK]``. Those characters, most of a Chinese text, are looked up in a table
(numpy, a whole batch at once); only the runs of other characters between them (digits, Latin words, spaces)
go through the tokenizer, many runs to a call. A run always ends where a word ends, so its tokens are the
tokens the whole text would give it.

Why: tokenising is most of the CPU an embedding pass costs (H200 box, 16 cores, an ingest of 25,983 chunks:
about 7 of the ingesting process's 10 CPU seconds), and during an ingest those cores belong to the parsers.

The table holds only characters whose treatment cannot differ between this Python's Unicode tables and the
tokenizer's: assigned in Unicode 3.2 with the same category today, unchanged by NFD, with no lower case.
Everything else takes the tokenizer's own path, as does any text holding a special token's literal text
("[SEP]"), which the tokenizer matches before normalising. :meth:`BertTokens.of` also checks the result on
probe texts against the tokenizer, and declines when they differ.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_BMP = 0x10000
_CJK = ((0x4E00, 0x9FA5), (0x3400, 0x4DB5))  # CJK ideographs assigned in Unicode 3.2 (no decompositions)
_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")  # Rust's is_ascii_punctuation
_RUNS_PER_CALL = 256  # runs joined into one string per tokenizer input: one Encoding per run costs more
PROBES = [
    "",
    "中文文本，含标点。",
    "Zhiku 知库 v2.0: RAG（检索增强生成）on 12,345 份 PDF files!",
    "Ｆｕｌｌ　ｗｉｄｔｈ １２３ café naïve ÀÉÎ Ωσς ﬁ ①㊀",
    "控制\x00\x07字符\u200b\ufeff\u00ad与 \t\n\r 空白\u3000\u00a0",
    "[SEP] 和 [CLS]x [UNK] 的 [MASK]",
    "𠀀𪚥 生僻字 e\u0301 中\u0301文 豈 \uf900 龥鿿",
    "a" * 120 + " 长词 " + "中" * 600,
]


def _simple(cp: int, cjk: bool) -> bool:
    """A character that is a word of its own, the same in every Unicode version a tokenizer may use."""
    c = chr(cp)
    old = unicodedata.ucd_3_2_0.category(c)
    if old == "Cn" or unicodedata.category(c) != old:
        return False
    if not (cjk or old.startswith("P") or c in _ASCII_PUNCTUATION):
        return False
    return unicodedata.normalize("NFD", c) == c and unicodedata.ucd_3_2_0.normalize("NFD", c) == c and c.lower() == c


class _Misaligned(Exception):
    """The runs' tokens did not split apart as they were joined."""


class BertTokens:
    """``texts -> [ids]`` for one tokenizer: special tokens added, truncated to ``max_length`` as the tokenizer
    does. Build with :meth:`of`."""

    def __init__(
        self,
        reference: Any,
        runs: Any,
        table: np.ndarray,
        sentinel: str,
        prefix: np.ndarray,
        suffix: np.ndarray,
        max_length: int,
        specials: list[str],
    ) -> None:
        self._reference = reference  # the tokenizer as configured, for the texts the table path leaves to it
        # a copy without truncation: it tokenises runs, without special tokens
        self._encode = getattr(runs, "encode_batch_fast", runs.encode_batch)
        self._table = table  # code point -> id, or -1 where the tokenizer's path decides
        self._sentinel = sentinel  # a table character joining runs: it splits their tokens apart again
        self._sentinel_id = int(table[ord(sentinel)])
        self._prefix, self._suffix = prefix, suffix
        self._content = max_length - len(prefix) - len(suffix)
        self._special = re.compile("|".join(re.escape(s) for s in specials) or "(?!)", re.IGNORECASE)

    @classmethod
    def of(cls, tokenizer: Any, max_length: int) -> BertTokens | None:
        """The fast path for ``tokenizer`` (a ``tokenizers.Tokenizer``, truncating to ``max_length``), or None
        where it is not a BERT WordPiece tokenizer of this kind or the probe texts come out different."""
        from tokenizers import Tokenizer

        spec = json.loads(tokenizer.to_str())
        normalizer, pre, model = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        if (
            normalizer.get("type") != "BertNormalizer"
            or not normalizer.get("handle_chinese_chars")
            or pre.get("type") != "BertPreTokenizer"
            or model.get("type") != "WordPiece"
            or (model.get("max_input_chars_per_word") or 0) < 1
        ):
            return None
        vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=False)
        unk = vocab.get(model.get("unk_token", ""))
        if unk is None:
            return None
        table = np.full(_BMP, -1, dtype=np.int64)
        for cp in range(_BMP):
            cjk = any(low <= cp <= high for low, high in _CJK)
            if not 0xD800 <= cp <= 0xDFFF and _simple(cp, cjk):
                table[cp] = vocab.get(chr(cp), unk)
        ids = table[table >= 0]
        counts = np.bincount(ids) if len(ids) else np.zeros(0, dtype=np.int64)
        # the sentinel's id must come from the sentinel alone: no compatibility ideograph in a run may normalise
        # to it
        targets = {unicodedata.normalize("NFD", chr(cp)) for cp in (*range(0xF900, 0xFB00), *range(0x2F800, 0x2FA20))}
        sentinel = next(
            (chr(cp) for cp in range(*_CJK[0]) if table[cp] >= 0 and counts[table[cp]] == 1 and chr(cp) not in targets),
            None,
        )
        sentinel_id = -1 if sentinel is None else int(table[ord(sentinel)])
        if sentinel is None or sentinel_id == unk:
            return None  # no character with an id of its own to split runs apart by
        plain = Tokenizer.from_str(tokenizer.to_str())
        plain.no_truncation()
        plain.no_padding()
        around = plain.encode(sentinel).ids  # what the post-processor adds around a text
        if around.count(sentinel_id) != 1:
            return None
        at = around.index(sentinel_id)
        prefix, suffix = np.asarray(around[:at], dtype=np.int64), np.asarray(around[at + 1 :], dtype=np.int64)
        if max_length <= len(prefix) + len(suffix):
            return None
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.content]
        fast = cls(tokenizer, plain, table, sentinel, prefix, suffix, max_length, specials)
        want = _arrays(tokenizer.encode_batch(PROBES))
        got = fast(PROBES)
        if any(not np.array_equal(a, b) for a, b in zip(want, got, strict=True)):
            log.warning("embedding: the fast BERT token path differs from the tokenizer on probe texts; not used")
            return None
        return fast

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        texts = list(texts)
        if not texts:
            return []
        joined = "".join(texts)
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        try:
            out = self._content_ids(joined, bounds)
        except _Misaligned:
            return _arrays(self._reference.encode_batch(texts))
        if len(self._prefix) or len(self._suffix):
            out = [np.concatenate([self._prefix, ids[: self._content], self._suffix]) for ids in out]
        else:
            out = [ids[: self._content] for ids in out]
        # the tokenizer matches its added tokens' text before normalising (or after, lower-cased): those texts
        # take its own path (a match across two texts only sends both there)
        found = {int(i) for m in self._special.finditer(joined) for i in _texts_at(bounds, m.start(), m.end())}
        special = sorted(found)
        for i, ids in zip(special, _arrays(self._reference.encode_batch([texts[i] for i in special])), strict=True):
            out[i] = ids
        return out

    def _content_ids(self, joined: str, bounds: np.ndarray) -> list[np.ndarray]:
        """The ids of each text (``joined[bounds[k]:bounds[k + 1]]``) without special tokens or truncation."""
        points = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = self._table[np.minimum(points, _BMP - 1)]
        ids[points >= _BMP] = -1
        other = ids < 0
        # runs of the tokenizer's characters: they start after a table character or at a text's start, and end
        # before one or at a text's end
        edge = np.zeros(len(points) + 1, dtype=bool)
        edge[bounds] = True
        starts = np.flatnonzero(other & (edge[:-1] | ~np.concatenate([[False], other[:-1]])))
        ends = np.flatnonzero(other & (edge[1:] | ~np.concatenate([other[1:], [False]]))) + 1
        runs = [joined[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
        calls = [self._sentinel.join(runs[i : i + _RUNS_PER_CALL]) for i in range(0, len(runs), _RUNS_PER_CALL)]
        mark = np.asarray([self._sentinel_id], dtype=np.int64)
        pieces = [p for e in self._encode(calls, add_special_tokens=False) for p in (np.asarray(e.ids, np.int64), mark)]
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        marks = tokens == self._sentinel_id  # after each run (a call's last run: the mark appended above)
        if int(marks.sum()) != len(runs):
            raise _Misaligned  # a run gave the sentinel's id after all: the caller takes the tokenizer's path
        run_of = (np.cumsum(marks) - marks)[~marks]
        tokens = tokens[~marks]
        per_run = np.bincount(run_of, minlength=len(runs))[: len(runs)]
        # tokens per character: 1 for a table character, a run's tokens on its first character, else 0
        counts = (~other).astype(np.int64)
        counts[starts] += per_run
        at = np.concatenate([[0], np.cumsum(counts)])
        out = np.empty(int(at[-1]), dtype=np.int64)
        out[at[:-1][~other]] = ids[~other]
        first = np.cumsum(per_run) - per_run
        out[np.repeat(at[starts] - first, per_run) + np.arange(len(tokens))] = tokens
        edges = at[bounds].tolist()
        return [out[a:b] for a, b in itertools.pairwise(edges)]


def _texts_at(bounds: np.ndarray, start: int, end: int) -> range:
    """The indices of the texts that characters start..end of the joined texts belong to."""
    first = int(np.searchsorted(bounds, start, side="right")) - 1
    last = int(np.searchsorted(bounds, max(start, end - 1), side="right")) - 1
    return range(first, last + 1)


def _arrays(encodings: Sequence[Any]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.int64) for e in encodings]
