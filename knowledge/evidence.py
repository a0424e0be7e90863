"""Sentence-level evidence inside retrieved passages: what a small model should read, whether the passages
can answer the question at all, and which passage each sentence of an answer comes from.

All of it is lexical (jieba words for Chinese, lower-cased words elsewhere) and costs microseconds: it
runs on every question, on a CPU, before and after the LLM.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.text import estimate_tokens, to_simplified
from knowledge.lexical import tokenize

# A sentence ends after 。！？；!? (with any closing quotes), after a Latin full stop followed by a space,
# or at a line break.
_SENTENCE_END = re.compile(r"(?<=[。！？；!?])[”’」』）)\"']*|(?<=[.;])(?<!\b[A-Z]\.)\s+|\n+")
# Whole sentences only (not the clauses between semicolons): what a quotation should show.
_WHOLE_SENTENCE_END = re.compile(r"(?<=[。！？!?])[”’」』）)\"']*|(?<=\.)(?<!\b[A-Z]\.)\s+|\n+")
# Words that carry no topic: question words, particles and pronouns. A question's *content* words are
# what the passages must contain to answer it.
_QUESTION_WORDS = frozenset(
    word
    for line in (
        "什么 什么样 哪个 哪些 哪里 哪儿 哪 谁 多少 几 几个 怎么 怎样 如何 为什么 为何 是否 吗 呢 吧 啊",
        "的 了 是 在 有 和 与 及 或 被 把 为 对 从 到 于 以 其 之 也 都 而 就 又 还 请问 请 告诉 一下 问",
        "哪一 哪年 哪一年 何时 何地 何 他 她 它 他们 她们 它们 这 那 这个 那个 这些 那些 该 此 其中",
        "甚么 麼 嗎 為什麼 哪裡 誰 什麼 怎麼 這 這個 那個 這些 哪個 為何 與 對 從 於 還 請問 請 問 個",
        "what which who whom whose where when why how is are was were do does did the a an of in on at to",
        "for by with from and or as it its this that these those be been has have had can could would",
        "should please tell me about name",
    )
    for word in line.split()
)
NOT_FOUND_ZH = "知识库中没有找到这个问题的答案。"
NOT_FOUND_EN = "The knowledge base does not contain the answer to this question."
_NOT_FOUND_MARKS = (
    *("没有找到", "沒有找到", "未找到", "没有提到", "沒有提到", "未提及"),
    *("does not contain", "not found in"),
)
CITATION = re.compile(r"\[(\d{1,2})\]")
LEADING_CITATIONS = re.compile(r"^\s*(?:\[\d{1,2}\]\s*)+")
_OPENING, _CLOSING = "《“「『（(【‘", "》”」』）)】’"


def _bracketed(text: str) -> list[bool]:
    """Per character of ``text``: whether it lies inside brackets, quotes or a title that close on the
    same line ("《卡拉OK.LIVE！‧台北‧我》", "（Thomas R. Holtz）"). A bracket left open (a chunk cut mid-way)
    covers nothing, so one stray "（" cannot glue a passage into one sentence."""
    inside = [False] * len(text)
    opened: list[int] = []
    for i, ch in enumerate(text):
        if ch == "\n":
            opened.clear()
        elif ch in _OPENING:
            opened.append(i)
        elif ch in _CLOSING and opened:
            start = opened.pop()
            if not opened:
                inside[start:i] = [True] * (i - start)
    return inside


def sentence_spans(text: str, *, whole: bool = False) -> list[tuple[int, int]]:
    """(start, end) of each sentence of ``text`` (each clause between semicolons, unless ``whole``),
    surrounding whitespace excluded; empty pieces dropped. Never cut inside brackets, quotes or a title."""
    spans: list[tuple[int, int]] = []
    inside = _bracketed(text)
    start = 0
    for m in [*(_WHOLE_SENTENCE_END if whole else _SENTENCE_END).finditer(text), None]:
        if m is not None and m.end() > 0 and inside[m.end() - 1] and "\n" not in m.group():
            continue
        # a sentence keeps its closing punctuation and quotes; a run of whitespace between sentences is dropped
        end = len(text) if m is None else m.end() if m.group().strip() else m.start()
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        if m is not None:
            start = m.end()
    return spans


def split_sentences(text: str, *, whole: bool = False) -> list[str]:
    """Sentences of ``text`` in order, stripped; empty pieces dropped."""
    return [text[a:b] for a, b in sentence_spans(text, whole=whole)]


def content_terms(text: str) -> list[str]:
    """The words of ``text`` that carry its topic (question words, particles, pronouns, single-character
    function words and punctuation dropped), in order, without repeats; in Simplified script, which jieba's
    dictionary knows and which :func:`coverage` and :func:`rank_sentences` compare passages in."""
    out: dict[str, None] = {}
    for token in tokenize(to_simplified(text)):
        if token in _QUESTION_WORDS or not any(ch.isalnum() for ch in token):
            continue
        out.setdefault(token, None)
    return list(out)


# Words that point back into the conversation: pronouns and demonstratives (Simplified, Traditional,
# English), and the "那…呢" of an elliptical follow-up.
_REFERRING = re.compile(
    r"[他她它其該该此這这]|那(?!些年)|当时|當時|那时|那時|双方|雙方|呢[？?]?\s*$|^(?:and|what about|how about)\b|"
    r"\b(?:he|she|it|its|his|her|they|them|their|this|that|these|those|there)\b",
    re.IGNORECASE,
)


def is_follow_up(question: str) -> bool:
    """Whether a question leans on the conversation: it refers back (a pronoun, "那…呢？") or names
    almost nothing itself (one content word or none)."""
    return bool(_REFERRING.search(question.strip())) or len(content_terms(question)) <= 1


def _weight(term: str) -> float:
    # Longer words and numbers are rarer, so they say more about which sentence answers: "548" or
    # "路口镇" over "位于".
    return 1.0 + math.log(len(term)) + (1.0 if any(ch.isdigit() for ch in term) else 0.0)


def coverage(question: str, texts: Sequence[str]) -> float:
    """The weighted share of the question's content words that occur in the best of ``texts`` (0 to 1).
    An answerable question's passage names its subject; a passage retrieved for an unrelated question
    usually does not."""
    terms = content_terms(question)
    if not terms:
        return 1.0
    total = sum(_weight(t) for t in terms)
    best = 0.0
    for text in texts:
        lowered = to_simplified(text).lower()
        best = max(best, sum(_weight(t) for t in terms if t in lowered) / total)
    return best


# How much less a sentence of the next passage (in retrieval's order) counts than one of the passage before:
# the best two quotes held the gold answer for 0.835 of the dev questions without it, 0.866 with 0.2 (English
# set 0.737 -> 0.757, Traditional Chinese 0.747 -> 0.767; 0.1-0.3 all gain on each).
PASSAGE_DECAY = 0.2


@dataclass(frozen=True)
class Evidence:
    """One sentence of one passage (``passage`` counts from 0), with its overlap score."""

    passage: int
    index: int
    text: str
    score: float


def rank_sentences(question: str, passages: Sequence[str], *, whole: bool = False) -> list[Evidence]:
    """Every sentence (or whole sentence, see :func:`sentence_spans`) of the passages, best first, ties to
    the earlier passage (retrieval's order). A sentence scores the question's content words it holds and
    the character pairs it shares with the question, each weighted by how rare it is among these
    sentences: the passages were retrieved for the question's topic, so the topic's words are in most of
    them and say little about which sentence answers; the pairs catch words that jieba cuts differently
    in the question and the passage. (dev, 491 questions: the best whole sentence holds the gold answer
    0.63 -> 0.69; the 150-token evidence 0.81 -> 0.82.)

    ``passages`` come best first, and a sentence's score is divided by ``1 + PASSAGE_DECAY * rank`` of its
    passage: retrieval has already weighed each passage as a whole, which the words of one sentence
    cannot. The subject's own heading and definition sentence otherwise outrank the sentence that answers
    ("黄鳍紫鱼" over "体长可达50公分。" in the best passage) as often as another passage's sentence that
    shares the question's words outranks the answer in the best one."""
    terms = content_terms(question)
    pairs = bigrams(to_simplified(question))
    found = [(p, i, s) for p, text in enumerate(passages) for i, s in enumerate(split_sentences(text, whole=whole))]
    lowered = [to_simplified(s).lower() for _, _, s in found]  # words match across the two Chinese scripts
    shared = [pairs & bigrams(s) for s in lowered]
    n = len(found)
    word_count = {t: sum(t in s for s in lowered) for t in terms}
    pair_count = Counter(g for grams in shared for g in grams)

    def rarity(count: int) -> float:
        return math.log(1 + n / count)

    ranked = [
        Evidence(
            p,
            i,
            s,
            (
                sum(_weight(t) * rarity(word_count[t]) for t in terms if t in low)
                + 0.5 * sum(rarity(pair_count[g]) for g in grams)
            )
            / (1 + PASSAGE_DECAY * p),
        )
        for (p, i, s), low, grams in zip(found, lowered, shared, strict=True)
    ]
    return sorted(ranked, key=lambda e: (-e.score, e.passage, e.index))


def select_evidence(
    question: str,
    passages: Sequence[str],
    budget: int,
    *,
    neighbours: int = 1,
    measure: Callable[[str], int] = estimate_tokens,
) -> list[str]:
    """A tight context for a small model: per passage, the sentences that share most words with the
    question, each with ``neighbours`` sentences around it (an answer often sits in the next sentence),
    best first until ``budget`` tokens. Per passage, the chosen runs of sentences exactly as the passage
    has them, in reading order, joined by " … "; an empty string for a passage that gave none."""
    spans = [sentence_spans(p) for p in passages]
    chosen: list[set[int]] = [set() for _ in passages]
    used = 0
    for ev in rank_sentences(question, passages):
        if ev.score <= 0 and any(chosen):
            break
        text, where = passages[ev.passage], spans[ev.passage]
        around = range(max(ev.index - neighbours, 0), min(ev.index + neighbours + 1, len(where)))
        new = [i for i in around if i not in chosen[ev.passage]]
        cost = sum(measure(text[slice(*where[i])]) for i in new)
        if used + cost > budget:
            if used:
                continue
            new, cost = [ev.index], measure(ev.text)  # the best sentence alone, even when over budget
        chosen[ev.passage].update(new)
        used += cost
        if used >= budget:
            break
    out = []
    for text, where, picked in zip(passages, spans, chosen, strict=True):
        runs: list[list[int]] = []
        for i in sorted(picked):
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        out.append(" … ".join(text[where[r[0]][0] : where[r[-1]][1]] for r in runs))
    return out


def best_quote(question: str, passages: Sequence[str], min_chars: int = 40) -> Evidence | None:
    """The passage text that best answers ``question``: its best-ranked whole sentence, with the sentences
    after it while the quote is shorter than ``min_chars`` (a heading line or "花期从10月起。" alone says too
    little), on one line. None when no sentence shares anything with the question. Ranked on the question
    alone: ranked on the model's answer too, it followed a wrong answer to a wrong sentence (dev, 99
    questions: the answer with its quote held the gold answer 0.70 of the time; 0.77 ranked this way)."""
    found = best_quotes(question, passages, min_chars, 1)
    return found[0] if found else None


def best_quotes(question: str, passages: Sequence[str], min_chars: int = 40, count: int = 2) -> list[Evidence]:
    """Up to ``count`` quotes as :func:`best_quote` makes them, best first, none overlapping another. The
    second best sentence often holds what the first only leads up to (dev, 491 questions: the best quote
    holds the gold answer for 0.77 of them, the best two for 0.87, ranked as rank_sentences does)."""
    ranked = rank_sentences(question, passages, whole=True)
    taken: dict[int, set[int]] = {}  # passage -> its sentences already quoted
    quotes: list[Evidence] = []
    for best in ranked:
        if len(quotes) >= count or best.score <= 0:
            break
        if best.index in taken.get(best.passage, set()):
            continue
        text = passages[best.passage]
        spans = sentence_spans(text, whole=True)
        start, end = spans[best.index]
        last = best.index
        while end - start < min_chars and last + 1 < len(spans) and last + 1 not in taken.get(best.passage, set()):
            last += 1
            end = spans[last][1]
        taken.setdefault(best.passage, set()).update(range(best.index, last + 1))
        quotes.append(Evidence(best.passage, best.index, " ".join(text[start:end].split()), best.score))
    return quotes


def normalize(text: str) -> str:
    """For comparing answers: NFKC, lower case, no whitespace or punctuation."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if ch.isalnum())


def contains_normalized(text: str, answers: Sequence[str]) -> bool:
    """Whether one of ``answers`` occurs in ``text``, ignoring case, width, spaces and punctuation."""
    flat = normalize(text)
    return any((a := normalize(answer)) and a in flat for answer in answers)


def is_not_found(answer: str) -> bool:
    """Whether a reply says the knowledge base does not hold the answer (the service's own reply, or a
    model following the prompt's instruction)."""
    head = answer.strip()[:80].lower()
    return any(mark in head for mark in _NOT_FOUND_MARKS)


def bigrams(text: str) -> set[str]:
    """The character pairs of ``text`` normalized (one item for a one-character text)."""
    flat = normalize(text)
    return {flat[i : i + 2] for i in range(len(flat) - 1)} or ({flat} if flat else set())


def best_source(sentence: str, passages: Sequence[str]) -> tuple[int, float]:
    """The passage (from 0) that shares most character pairs with ``sentence``, and the share."""
    grams = bigrams(sentence)
    if not grams or not passages:
        return -1, 0.0
    shares = [len(grams & bigrams(p)) / len(grams) for p in passages]
    best = max(range(len(passages)), key=lambda i: (shares[i], -i))
    return best, shares[best]


def _answer_sentences(answer: str) -> list[str]:
    """``answer`` cut after each 。！？!? (or a Latin full stop before a space) and before each line break,
    but never inside brackets, quotes or a title: "《卡拉OK.LIVE！‧台北‧我》" is one piece."""
    pieces: list[str] = []
    start = depth = 0
    for i, ch in enumerate(answer):
        if ch in _OPENING:
            depth += 1
        elif ch in _CLOSING:
            depth = max(depth - 1, 0)
        if ch == "\n" and i > start:
            pieces.append(answer[start:i])
            start, depth = i, 0  # an unclosed bracket ends with its line
        elif depth == 0 and (ch in "。！？!?" or (ch == "." and answer[i + 1 : i + 2].isspace())):
            pieces.append(answer[start : i + 1])
            start = i + 1
    return [*pieces, answer[start:]] if start < len(answer) else pieces


def cite(answer: str, passages: Sequence[str], *, min_share: float = 0.5) -> str:
    """``answer`` with a [n] marker (n counts from 1) after each sentence that has none and comes mostly
    from one passage. Markers the model wrote are kept when they name a passage that exists and dropped
    otherwise (a small model invents [6] for five passages)."""
    valid = range(1, len(passages) + 1)
    answer = CITATION.sub(lambda m: m[0] if int(m[1]) in valid else "", answer)
    out = []
    for piece in _answer_sentences(answer):
        if not piece.strip() or CITATION.search(piece):
            out.append(piece)
            continue
        n, share = best_source(piece, passages)
        if n < 0 or share < min_share:
            out.append(piece)
            continue
        stripped = piece.rstrip()
        end = len(stripped)
        while end and stripped[end - 1] in "。！？!?.":  # the marker goes before the final punctuation
            end -= 1
        out.append(f"{stripped[:end]}[{n + 1}]{stripped[end:]}{piece[len(stripped) :]}")
    return "".join(out)


def citations(answer: str) -> list[int]:
    """The passage numbers (from 1) an answer cites, in order of first mention."""
    return list(dict.fromkeys(int(n) for n in CITATION.findall(answer)))
