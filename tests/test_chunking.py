"""Chinese-aware chunking: sizes, sentence boundaries, offsets, headings, metadata."""

from __future__ import annotations

import itertools

from langchain_core.documents import Document

from knowledge.chunking import ChineseTextSplitter, is_heading, sections

SENTENCES = [f"第{i}句话讲的是一件不同的事情，内容各不相同。" for i in range(40)]


def doc(text: str, page: int | None = None) -> Document:
    return Document(page_content=text, metadata={"source": "/docs/a.txt", "page": page})


def test_chunks_respect_size_and_end_on_sentence_boundaries() -> None:
    text = "".join(SENTENCES)
    chunks = ChineseTextSplitter(100, 20).split([doc(text)])
    assert len(chunks) > 5
    assert all(len(c.text) <= 100 for c in chunks)
    # no sentence is cut: every chunk ends with a sentence end
    assert all(c.text.endswith("。") for c in chunks)
    # overlap: consecutive chunks share text
    assert any(a.text[-15:] in b.text for a, b in itertools.pairwise(chunks))


def test_offsets_point_into_the_page_and_metadata_is_kept() -> None:
    text = "\n\n".join("".join(SENTENCES[i : i + 4]) for i in range(0, 40, 4))
    chunks = ChineseTextSplitter(120, 0).split([doc(text, page=3)])
    for c in chunks:
        assert text[c.offset : c.offset + len(c.text)] == c.text
        assert (c.source, c.page) == ("/docs/a.txt", 3)


def test_long_sentence_falls_back_to_clauses() -> None:
    clause = "这是一个相当长的分句"
    text = "，".join([clause] * 30) + "。"
    chunks = ChineseTextSplitter(60, 0).split([doc(text)])
    assert all(len(c.text) <= 60 for c in chunks)
    assert all(c.text.endswith(("，", "。")) for c in chunks)


def test_ascii_sentences_split_too() -> None:
    text = " ".join(f"Sentence number {i} talks about something else." for i in range(30))
    chunks = ChineseTextSplitter(80, 0).split([doc(text)])
    assert all(c.text.endswith(".") for c in chunks)


def test_heading_joins_its_paragraph_and_labels_later_chunks() -> None:
    body = "".join(SENTENCES[:12])
    text = f"天生三桥\n\n{body}\n\n胜利广场 (巴黎)\n\n胜利广场是巴黎的一个圆形广场。"
    chunks = ChineseTextSplitter(120, 0).split([doc(text)])
    assert len(chunks) == 4
    assert chunks[0].text.startswith("天生三桥\n第0句")  # no chunk is just the heading
    assert {c.heading for c in chunks[:-1]} == {"天生三桥"}
    assert chunks[-1].heading == "胜利广场 (巴黎)"
    later = chunks[2]
    assert later.embed_text == f"天生三桥\n{later.text}"
    assert chunks[0].embed_text == chunks[0].text  # the heading is not repeated


def test_heading_detection() -> None:
    assert is_heading("马克·茨柏克沃斯基")
    assert is_heading("Chapter 2 (draft)")
    assert not is_heading("这是一句完整的话。")
    assert not is_heading("x" * 80)
    assert [h for h, *_ in sections("前言。\n\n甲\n\n正文。\n\n乙\n\n丙\n\n正文二。")] == ["", "甲", "乙 丙"]
