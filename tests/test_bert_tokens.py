"""The table path for Chinese BERT tokenizers gives exactly the tokenizer's ids, or is not used."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knowledge import bert_tokens
from knowledge.bert_tokens import PROBES, BertTokens
from tests.tiny_models import CORPUS

MAX_LENGTH = 24  # short, so that truncation is exercised


def bert_tokenizer(max_length: int = MAX_LENGTH, *, lowercase: bool = True) -> Any:
    """A WordPiece tokenizer trained here, as bert-base-chinese's: a word of its own per ideograph and
    punctuation mark, subwords for the rest. Characters of the corpus are left out of the vocabulary, so
    ideographs and punctuation map to [UNK] too."""
    from tokenizers import BertWordPieceTokenizer, Tokenizer, processors

    trained = BertWordPieceTokenizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    trained.train_from_iterator([CORPUS[: len(CORPUS) // 2]], vocab_size=400, min_frequency=1, show_progress=False)
    tokenizer = Tokenizer.from_str(trained._tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return bert_tokenizer()


@pytest.fixture(scope="module")
def fast(tokenizer: Any) -> BertTokens:
    found = BertTokens.of(tokenizer, MAX_LENGTH)
    assert found is not None
    return found


def reference(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts)]


# characters from every kind the path treats differently: table characters (ideographs, punctuation, full-width
# marks), runs (ASCII, accents, combining marks, whitespace, controls), and those it must leave to the
# tokenizer (compatibility ideographs, characters newer than Unicode 3.2, astral ones, surrogates excluded)
CHARACTERS = st.one_of(
    st.sampled_from(sorted(set(CORPUS))),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
    st.characters(min_codepoint=0x3000, max_codepoint=0x303F),
    st.characters(min_codepoint=0xFF00, max_codepoint=0xFFEF),
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.characters(min_codepoint=0xA0, max_codepoint=0x36F),
    st.characters(min_codepoint=0x0, max_codepoint=0x20),
    st.characters(min_codepoint=0x2000, max_codepoint=0x2BFF),
    st.characters(min_codepoint=0xF900, max_codepoint=0xFAFF),
    st.characters(min_codepoint=0x0590, max_codepoint=0x0EFF),
    st.characters(min_codepoint=0x10000, max_codepoint=0x2FFFF),
    st.sampled_from(["\u200b", "\ufeff", "\ufffd", "\u00ad", "\u2028", "\x85", "\u1680", "\ue000", "\uffff"]),
)
TEXTS = st.lists(
    st.lists(st.one_of(CHARACTERS, st.sampled_from(["[SEP]", "[cls]", "[UNK]", "[MASK]", "Zhiku", "1500"]))).map(
        "".join
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=TEXTS)
def test_the_ids_are_the_tokenizers_for_any_text(tokenizer: Any, fast: BertTokens, texts: list[str]) -> None:
    assert [ids.tolist() for ids in fast(texts)] == reference(tokenizer, texts)


def test_long_chinese_texts_are_truncated_as_the_tokenizer_does(tokenizer: Any, fast: BertTokens) -> None:
    texts = [CORPUS, CORPUS[::-1], CORPUS.upper(), "", "。" * 100, "abc " * 50]
    got = fast(texts)
    assert [ids.tolist() for ids in got] == reference(tokenizer, texts)
    assert {len(ids) for ids in got[:3]} == {MAX_LENGTH}
    assert got[3].tolist() == tokenizer.encode("").ids and len(got[3]) == 2  # [CLS] [SEP]
    assert all(ids.dtype == np.int64 for ids in got)


def test_the_probe_texts_decline_a_table_that_disagrees_with_the_tokenizer(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A character the table would get wrong (here: Latin letters, which WordPiece joins into words) is
    caught on the probe texts, and the tokenizer's own path stays."""
    real = bert_tokens._simple

    def with_letters(cp: int, cjk: bool) -> bool:
        return real(cp, cjk) or (chr(cp).isascii() and chr(cp).isalpha())

    monkeypatch.setattr(bert_tokens, "_simple", with_letters)
    assert any(any(c.isascii() and c.isalpha() for c in p) for p in PROBES)
    assert BertTokens.of(tokenizer, MAX_LENGTH) is None


def test_other_tokenizers_are_left_to_their_own_path() -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert BertTokens.of(byte_level, MAX_LENGTH) is None
    # a BERT tokenizer that does not split ideographs apart: its words span them
    joined = bert_tokenizer()
    joined.normalizer = normalizers.BertNormalizer(handle_chinese_chars=False)
    assert BertTokens.of(joined, MAX_LENGTH) is None


def test_a_tokenizer_that_keeps_case_gets_the_same_ids_too() -> None:
    tokenizer = bert_tokenizer(lowercase=False)
    fast = BertTokens.of(tokenizer, MAX_LENGTH)
    assert fast is not None
    texts = [CORPUS[i : i + 40] for i in range(0, len(CORPUS), 40)] + ["Zhiku ZHIKU zhiku Ⅻ ǅ"]
    assert [ids.tolist() for ids in fast(texts)] == reference(tokenizer, texts)


def test_runs_that_do_not_split_apart_as_joined_take_the_tokenizers_path(tokenizer: Any) -> None:
    """Should a run ever give the id that separates runs, the batch is the tokenizer's own, not misaligned."""
    fast = BertTokens.of(tokenizer, MAX_LENGTH)
    assert fast is not None
    texts = ["Zhiku 长江 1500 黄河 zhiku river", "天生三桥"]
    fast._sentinel_id = tokenizer.encode("zhiku", add_special_tokens=False).ids[0]  # as if runs gave it
    assert [ids.tolist() for ids in fast(texts)] == reference(tokenizer, texts)
