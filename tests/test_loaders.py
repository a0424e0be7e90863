"""Loaders: text decoding in every encoding users have, PDFs page by page, one-line errors for bad files."""

from __future__ import annotations

import codecs
import logging
import os
import pickle
import random
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pdfplumber
import pytest
from langchain_core.documents import Document

from common.errors import ZhikuError
from knowledge import pdf as pdf_loader
from knowledge.loaders import (
    LoaderRegistry,
    LoadError,
    builtin_loaders,
    decode_bytes,
    load_file,
    load_pdf,
    load_text,
)

DATA = Path(__file__).resolve().parent / "data"
BAD = DATA / "bad"
GOOD_NAME = "名字 带 空格的 文件.txt"

# Realistic lengths: a sentence or three, and a longer multi-paragraph text.
SHORT_SIMPLIFIED = [
    "今天天气很好。",
    "北京是中国的首都，也是全国的政治和文化中心。",
    "长江是中国最长的河流，全长约六千三百公里。它流经十一个省份，最终注入东海。",
]
SHORT_TRADITIONAL = [
    "這是一個測試。",
    "台北是臺灣的首都，也是最大的城市。",
    "長江是中國最長的河流，全長約六千三百公里。它流經十一個省份，最終注入東海。",
]
LONG_SIMPLIFIED = (
    "天生三桥\n\n"
    "天生三桥位于重庆武隆县仙女山镇，是重庆直辖市级风景名胜区，重庆武隆岩溶国家地质公园的一部分，"
    "也被评为中国国家5A级旅游景区。2007年6月作为中国南方喀斯特的组成部分被列入联合国世界自然遗产。\n"
    "天生三桥位于乌江支流羊水河畔，核心保护区约22平方公里，包括天龙桥、青龙桥、黑龙桥、青龙天坑、"
    "神鹰天坑、羊水河喀斯特峡谷。从天龙桥上端到黑龙桥下端，直线距离仅有1500米，全世界仅此一例。\n\n"
    "首钢集团\n\n"
    "首钢集团是中国的一家大型钢铁企业，总部位于北京市石景山区。首钢的前身是1919年建立的龙烟铁矿公司"
    "石景山炼厂，2005年起逐步搬迁到河北省唐山市曹妃甸。“首钢”二字（Shougang）家喻户晓。\n"
)
LONG_TRADITIONAL = (
    "桃花源記\n\n"
    "晉太元中，武陵人捕魚為業。緣溪行，忘路之遠近。忽逢桃花林，夾岸數百步，中無雜樹，芳草鮮美，"
    "落英繽紛。漁人甚異之，復前行，欲窮其林。\n"
    "林盡水源，便得一山，山有小口，彷彿若有光。便捨船，從口入。初極狹，纔通人。復行數十步，豁然開朗。"
    "土地平曠，屋舍儼然，有良田美池桑竹之屬。阡陌交通，雞犬相聞。\n"
)
# Characters beyond GBK: only GB18030's four-byte sequences can encode them.
GB18030_ONLY = "𠮷野家的牛肉饭很好吃。欧元符号是€，笑脸是😀。"

ENCODED: list[tuple[str, str, bytes, set[str]]] = [
    # (name, text, bytes as written, accepted encoding names)
    *[(f"utf-8-{i}", t, t.encode("utf-8"), {"utf-8"}) for i, t in enumerate(SHORT_SIMPLIFIED)],
    ("utf-8-long", LONG_SIMPLIFIED, LONG_SIMPLIFIED.encode("utf-8"), {"utf-8"}),
    *[(f"utf-8-sig-{i}", t, t.encode("utf-8-sig"), {"utf-8-sig"}) for i, t in enumerate(SHORT_SIMPLIFIED)],
    ("utf-8-sig-long", LONG_SIMPLIFIED, LONG_SIMPLIFIED.encode("utf-8-sig"), {"utf-8-sig"}),
    *[
        (f"utf-16-le-{i}", t, codecs.BOM_UTF16_LE + t.encode("utf-16-le"), {"utf-16-le"})
        for i, t in enumerate(SHORT_SIMPLIFIED)
    ],
    ("utf-16-le-long", LONG_SIMPLIFIED, codecs.BOM_UTF16_LE + LONG_SIMPLIFIED.encode("utf-16-le"), {"utf-16-le"}),
    *[
        (f"utf-16-be-{i}", t, codecs.BOM_UTF16_BE + t.encode("utf-16-be"), {"utf-16-be"})
        for i, t in enumerate(SHORT_SIMPLIFIED)
    ],
    ("utf-16-be-long", LONG_SIMPLIFIED, codecs.BOM_UTF16_BE + LONG_SIMPLIFIED.encode("utf-16-be"), {"utf-16-be"}),
    *[(f"gbk-{i}", t, t.encode("gbk"), {"gb18030", "gbk"}) for i, t in enumerate(SHORT_SIMPLIFIED)],
    ("gbk-long", LONG_SIMPLIFIED, LONG_SIMPLIFIED.encode("gbk"), {"gb18030", "gbk"}),
    *[(f"gb18030-{i}", t, t.encode("gb18030"), {"gb18030"}) for i, t in enumerate(SHORT_SIMPLIFIED)],
    ("gb18030-four-byte", GB18030_ONLY, GB18030_ONLY.encode("gb18030"), {"gb18030"}),
    ("gb18030-long", LONG_SIMPLIFIED + GB18030_ONLY, (LONG_SIMPLIFIED + GB18030_ONLY).encode("gb18030"), {"gb18030"}),
    *[(f"big5-{i}", t, t.encode("big5"), {"big5", "cp950", "big5hkscs"}) for i, t in enumerate(SHORT_TRADITIONAL)],
    ("big5-long", LONG_TRADITIONAL, LONG_TRADITIONAL.encode("big5"), {"big5", "cp950", "big5hkscs"}),
]


@pytest.mark.parametrize(("name", "text", "data", "accepted"), ENCODED, ids=[e[0] for e in ENCODED])
def test_decode_bytes_reads_every_encoding_back_exactly(name: str, text: str, data: bytes, accepted: set[str]) -> None:
    decoded, encoding = decode_bytes(data)
    assert decoded == text
    assert encoding in accepted


@pytest.mark.parametrize(("name", "text", "data", "accepted"), ENCODED, ids=[e[0] for e in ENCODED])
def test_load_text_reads_a_file_in_any_encoding(
    tmp_path: Path, name: str, text: str, data: bytes, accepted: set[str]
) -> None:
    path = tmp_path / f"{name}.txt"
    path.write_bytes(data)
    docs = load_text(path)
    assert len(docs) == 1
    assert docs[0].page_content == text
    assert docs[0].metadata["source"] == str(path)
    assert docs[0].metadata["page"] is None
    assert docs[0].metadata["encoding"] in accepted


def test_decode_bytes_big5_superset_characters() -> None:
    text = "碁銹裏墻恒粧嫺是倚天中文的字。"  # Big5-ETEN additions: only cp950/big5hkscs have them
    decoded, encoding = decode_bytes(text.encode("cp950"))
    assert decoded == text
    assert encoding in {"cp950", "big5hkscs"}


def test_decode_bytes_utf16_without_bom() -> None:
    assert decode_bytes("plain ASCII notes\n".encode("utf-16-le")) == ("plain ASCII notes\n", "utf-16-le")
    assert decode_bytes("plain ASCII notes\n".encode("utf-16-be")) == ("plain ASCII notes\n", "utf-16-be")


def test_decode_bytes_single_byte_code_pages_still_work() -> None:
    text = "Café au lait, crème brûlée and a naïve “quote”. " * 3
    assert decode_bytes(text.encode("cp1252"))[0] == text


def test_decode_bytes_rejects_binary_data() -> None:
    rng = random.Random(7)
    noise = bytes(rng.randrange(256) for _ in range(2000))
    with pytest.raises(ValueError, match="binary"):
        decode_bytes(noise)
    with pytest.raises(ValueError, match="binary"):
        decode_bytes(b"\x00\x01\x02\x03" * 50)


def test_decode_bytes_rejects_text_that_decodes_only_into_junk() -> None:
    rng = random.Random(3)
    noise = bytes(rng.randrange(0x80, 0x100) for _ in range(2000))  # high bytes only: no controls
    with pytest.raises(ValueError):
        decode_bytes(noise)


def test_decode_bytes_replaces_a_stray_bad_byte_in_a_long_gbk_text() -> None:
    good = LONG_SIMPLIFIED * 3
    data = bytearray(good.encode("gbk"))
    data[len(data) // 2] = 0xFF
    text, encoding = decode_bytes(bytes(data))
    assert encoding in {"gbk", "gb18030"}
    assert 1 <= text.count("\ufffd") <= 2
    assert text.startswith(LONG_SIMPLIFIED) and text.endswith(LONG_SIMPLIFIED[-60:])


def test_decode_bytes_rejects_gbk_with_more_than_one_percent_damage() -> None:
    data = bytearray(SHORT_SIMPLIFIED[2].encode("gbk") * 2)
    for i in (4, 30, 60):
        data[i] = 0xFF
    with pytest.raises(ValueError, match="invalid byte"):
        decode_bytes(bytes(data))


def test_load_text_normalises_newlines(tmp_path: Path) -> None:
    path = tmp_path / "crlf.md"
    path.write_bytes("# 标题\r\n\r\n第一段。\r第二段。\r\n".encode("gbk"))
    assert load_text(path)[0].page_content == "# 标题\n\n第一段。\n第二段。\n"


@pytest.mark.parametrize("content", [b"", b"   \n\t\r\n ", "\u3000\n".encode()])
def test_load_text_empty_file_is_an_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "blank.txt"
    path.write_bytes(content)
    with pytest.raises(LoadError, match="empty") as info:
        load_text(path)
    assert str(info.value).startswith("blank.txt: ")


# --- NUL bytes: text with stray NULs is not UTF-16 ------------------------------------------------

ENGLISH = (
    "The committee’s report—published on Monday—was described as “a turning point” by the chair. "
    "“We have waited long enough,” she said… Critics disagreed: the plan’s costs are “unclear” – and its "
    "timeline, ‘optimistic’.\n"
)


@pytest.mark.parametrize(
    "data",
    [
        b"abc\x00" * 80,  # the finding: stored as 80 chunks of 扡c
        b"abc\x00def\x00" * 40,
        b"".join(word.encode() + b"\x00" for word in ("Zhiku reads every file in the folder " * 12).split(" ")),
    ],
    ids=["abc-nul", "abc-nul-def-nul", "nul-between-words"],
)
def test_ascii_with_stray_nuls_is_read_without_them_not_as_utf16(data: bytes) -> None:
    text, encoding = decode_bytes(data)
    assert encoding == "utf-8"
    assert text == data.replace(b"\x00", b"").decode()


def test_nul_removal_is_logged_with_the_file_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(b"abc\x00" * 80)
    with caplog.at_level(logging.WARNING, logger="knowledge.textfile"):
        docs = load_text(path)
    assert docs[0].page_content == "abc" * 80
    assert any("log.txt" in r.getMessage() and "80 NUL" in r.getMessage() for r in caplog.records)


def test_a_stray_nul_in_utf8_text_is_dropped() -> None:
    text = "长江是中国最长的河流。" * 100
    data = (text[:500] + "\x00" + text[500:]).encode()
    assert decode_bytes(data) == (text, "utf-8")


def test_nul_padded_records_fail_in_one_line_naming_the_nuls(tmp_path: Path) -> None:
    path = tmp_path / "records.txt"
    path.write_bytes(b"".join(name.ljust(16, b"\x00") for name in [b"alice", b"bob", b"carol", b"dave"] * 20))
    with pytest.raises(LoadError, match="NUL") as info:
        load_text(path)
    assert "\n" not in str(info.value) and "binary" in str(info.value)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_real_utf16_without_bom_still_decodes(encoding: str) -> None:
    mixed = "Zhiku 知库 notes: 长江 is the longest river, 黄河 the second.\n" * 4
    english = "Wait… really? • yes, the “quotes” stay.\n" * 3
    for text in (mixed, english, SHORT_SIMPLIFIED[2] * 2):
        assert decode_bytes(text.encode(encoding)) == (text, encoding)


# --- Windows-1252: curly quotes and dashes are not damaged UTF-8 ----------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Quarterly update\n\n" + "Revenue grew in every region this quarter. " * 60 + ENGLISH,  # < 1 % replaced
        ENGLISH * 3,
        "Don’t panic.",  # read as GB18030 "Don抰 panic." before
        "It’s a “test”—ok",
        "¿Qué tal? Señor Muñoz está aquí.",
    ],
    ids=["long-report", "paragraphs", "short", "short-quotes", "spanish"],
)
def test_windows_1252_text_decodes_as_cp1252(text: str) -> None:
    assert decode_bytes(text.encode("cp1252")) == (text, "cp1252")


def test_damaged_utf8_stays_utf8_not_cp1252() -> None:
    text = "Café — naïve résumé. " * 40
    data = bytearray(text.encode())
    data[301] = 0xFF  # inside an em dash
    decoded, encoding = decode_bytes(bytes(data))
    assert encoding == "utf-8" and decoded.count("\ufffd") in (1, 2)
    assert decoded.startswith(text[:200])


# --- PDF -------------------------------------------------------------------------------------------


def make_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A PDF in reportlab's CID font STSong-Light (needs no font file); one list of lines per page."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfgen import canvas

    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    pdf = canvas.Canvas(str(path), pagesize=A4)
    for lines in pages:
        pdf.setFont("STSong-Light", 12)
        for i, line in enumerate(lines):
            pdf.drawString(60, 780 - 18 * i, line)
        pdf.showPage()
    pdf.save()
    return path


PAGE_1 = ["第一章 长江", "长江是中国最长的河流，全长约6300公里。"]
PAGE_2 = ["第二章 黄河", "黄河是中国第二长河，被称为“母亲河”。"]


def test_load_pdf_gives_one_document_per_page(tmp_path: Path) -> None:
    path = make_pdf(tmp_path / "两页.pdf", [PAGE_1, PAGE_2])
    docs = load_pdf(path)
    assert [d.metadata for d in docs] == [{"source": str(path), "page": 1}, {"source": str(path), "page": 2}]
    assert [d.page_content for d in docs] == ["\n".join(PAGE_1), "\n".join(PAGE_2)]
    assert all(isinstance(d, Document) for d in docs)


def test_load_pdf_skips_pages_without_text(tmp_path: Path) -> None:
    docs = load_pdf(make_pdf(tmp_path / "gap.pdf", [PAGE_1, [], PAGE_2]))
    assert [d.metadata["page"] for d in docs] == [1, 3]


def test_load_pdf_without_any_text_says_it_needs_ocr(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="OCR") as info:
        load_pdf(make_pdf(tmp_path / "scan.pdf", [[], []]))
    assert "scanned" in str(info.value)


def test_load_pdf_removes_glyphs_drawn_twice() -> None:
    path = DATA / "issue-71-duplicate-chars.pdf"
    with pdfplumber.open(path) as pdf:  # the file really is hostile: plain extraction doubles glyphs
        assert "项项目目描描述述" in pdf.pages[0].extract_text()
    docs = load_pdf(path)
    assert [d.metadata["page"] for d in docs] == [1, 2]
    text = "\n".join(d.page_content for d in docs)
    assert "项项目目" not in text and "描描述述" not in text
    assert text.startswith("项目描述：负责四川省甘孜州丹巴磨子电站引水隧洞爆破方案优化设计")
    assert "教育经历" in text and "专业技能" in text


def test_load_pdf_reports_unexpected_parser_errors_as_load_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(page: object) -> str:
        raise KeyError("Font")

    monkeypatch.setattr(pdf_loader, "_page_text", broken)
    with pytest.raises(LoadError, match="KeyError") as info:
        load_pdf(make_pdf(tmp_path / "x.pdf", [PAGE_1]))
    assert "\n" not in str(info.value)


def draw_lines(path: Path, lines: list[Callable[[Any, float], None]]) -> Path:
    """A one-page PDF; each callable draws one line on the reportlab canvas at the given baseline."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfgen import canvas

    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    pdf = canvas.Canvas(str(path), pagesize=A4)
    for i, draw in enumerate(lines):
        draw(pdf, 780 - 20 * i)
    pdf.showPage()
    pdf.save()
    return path


def words_apart(text: str, gap_em: float, font: str = "Helvetica", size: float = 10) -> Callable[[Any, float], None]:
    """Words placed one by one, ``gap_em`` apart, with no space characters (tightly justified text)."""
    from reportlab.pdfbase.pdfmetrics import stringWidth

    def draw(pdf: Any, y: float) -> None:
        x = 60.0
        pdf.setFont(font, size)
        for word in text.split():
            pdf.drawString(x, y, word)
            x += stringWidth(word, font, size) + gap_em * size

    return draw


def letter_spaced(
    text: str, spacing_em: float, font: str = "Helvetica", size: float = 10
) -> Callable[[Any, float], None]:
    def draw(pdf: Any, y: float) -> None:
        line = pdf.beginText(60, y)
        line.setFont(font, size)
        line.setCharSpace(spacing_em * size)
        line.textOut(text)
        pdf.drawText(line)

    return draw


def test_load_pdf_separates_words_set_without_spaces(tmp_path: Path) -> None:
    """pdfplumber issue 316: justified lines whose words are 0.17-0.25 em apart and have no space chars
    came out as "Thisresearchaimstoinvestigate..."."""
    sentence = "This research aims to investigate the efficacy of family involvement in shift work training"
    path = draw_lines(
        tmp_path / "justified.pdf", [words_apart(sentence, 0.2), words_apart("Keywords Shift work", 0.18)]
    )
    assert load_pdf(path)[0].page_content == sentence + "\nKeywords Shift work"


def test_load_pdf_keeps_letter_spaced_and_cjk_text_together(tmp_path: Path) -> None:
    path = draw_lines(
        tmp_path / "spaced.pdf",
        [
            letter_spaced("WARNING", 0.2),  # tracking is not a word gap
            words_apart("长 江 是 中 国 最 长 的 河 流", 0.2, "STSong-Light", 12),  # no spaces between CJK
            letter_spaced("第一章长江2015年", 0.2, "STSong-Light", 12),
        ],
    )
    assert load_pdf(path)[0].page_content == "WARNING\n长江是中国最长的河流\n第一章长江2015年"


def test_load_pdf_trusts_space_characters_where_a_line_has_them(tmp_path: Path) -> None:
    def missing_ligature(pdf: Any, y: float) -> None:
        from reportlab.pdfbase.pdfmetrics import stringWidth

        pdf.setFont("Helvetica", 10)
        pdf.drawString(60, y, "a dif")  # the "ff" glyph of "different" has no Unicode: a 0.2 em hole
        pdf.drawString(60 + stringWidth("a dif", "Helvetica", 10) + 2, y, "erent result")

    path = draw_lines(tmp_path / "ligature.pdf", [missing_ligature])
    assert load_pdf(path)[0].page_content == "a diferent result"


def test_load_pdf_ignores_space_glyphs_drawn_over_digits(tmp_path: Path) -> None:
    """The WARN report draws a layer of blanks over its dates: "0 3 / 2 5 / 2 0 16" instead of 03/25/2016."""

    def row(pdf: Any, y: float) -> None:
        pdf.setFont("Helvetica", 10)
        pdf.drawString(60, y, "06/22/2015")
        pdf.drawString(130, y, "03/25/2016")
        pdf.drawString(131, y, " " * 20)
        pdf.drawString(200, y, "07/01/2015 Maxim Integrated Product")

    path = draw_lines(tmp_path / "warn.pdf", [row])
    assert load_pdf(path)[0].page_content == "06/22/2015 03/25/2016 07/01/2015 Maxim Integrated Product"


# --- hostile files ---------------------------------------------------------------------------------

EXPECTED_REASON = {
    "binary-renamed.txt": "binary",
    "empty.txt": "empty",
    "encrypted.pdf": "password",
    "gbk-with-invalid-bytes.txt": "invalid byte",
    "malformed.pdf": "scanned",
    "no-pages.pdf": "no pages",
    "text-pretending.pdf": "not a PDF",
    "truncated.pdf": "truncated",
    "zero-bytes.pdf": "empty",
}


def test_every_hostile_file_is_covered() -> None:
    assert {p.name for p in BAD.iterdir()} == {*EXPECTED_REASON, GOOD_NAME}


@pytest.mark.parametrize("name", sorted(EXPECTED_REASON))
def test_bad_file_gives_one_line_load_error(name: str) -> None:
    path = BAD / name
    with pytest.raises(LoadError) as info:
        load_file(path, LoaderRegistry(builtin_loaders()))
    message = str(info.value)
    assert message.startswith(f"{name}: ")
    assert "\n" not in message and len(message) < 300
    assert EXPECTED_REASON[name] in message
    assert info.value.path == path and info.value.reason and info.value.fix


@pytest.mark.parametrize("name", ["encrypted.pdf", "truncated.pdf", "no-pages.pdf", "text-pretending.pdf"])
def test_load_pdf_itself_raises_load_error(name: str) -> None:
    with pytest.raises(LoadError):
        load_pdf(BAD / name)


def test_file_name_with_spaces_and_chinese_loads() -> None:
    path = BAD / GOOD_NAME
    docs = load_file(path, LoaderRegistry(builtin_loaders()))
    assert len(docs) == 1
    assert docs[0].page_content.startswith("文件名里有空格和中文字符")
    assert docs[0].metadata == {"source": str(path), "page": None, "encoding": "utf-8"}


def test_load_error_is_one_line_and_pickles() -> None:
    err = LoadError(Path("/某处/坏 文件.pdf"), "the PDF is\ndamaged", "repair it\r\nand retry")
    assert str(err) == "坏 文件.pdf: the PDF is damaged; repair it and retry"
    assert str(LoadError(Path("a.txt"), "odd")) == "a.txt: odd"
    copy = pickle.loads(pickle.dumps(err))  # noqa: S301 - our own object; ingest workers send errors back
    assert str(copy) == str(err) and copy.path == err.path


def test_a_warning_names_the_file_when_bytes_were_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = bytearray((LONG_SIMPLIFIED * 3).encode("gbk"))
    data[200] = 0xFF
    path = tmp_path / "旧文件.txt"
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="knowledge.textfile"):
        load_text(path)
    assert any("旧文件.txt" in r.getMessage() for r in caplog.records)


# --- registry and dispatch -------------------------------------------------------------------------


def _fake_loader(path: Path) -> list[Document]:
    return [Document(page_content=path.read_text(encoding="utf-8"), metadata={"source": str(path), "page": None})]


def test_builtin_loaders() -> None:
    assert builtin_loaders() == {".txt": load_text, ".md": load_text, ".pdf": load_pdf}


@pytest.mark.parametrize("extension", [".PDF", "pdf", ".pdf", " Pdf "])
def test_registry_normalises_extensions(extension: str) -> None:
    registry = LoaderRegistry()
    registry.register(extension, load_pdf)
    assert registry.extensions == frozenset({".pdf"})
    assert registry.loader_for(Path("报告.PdF")) is load_pdf
    assert registry.loader_for(Path("a/b/report.pdf")) is load_pdf
    assert registry.loader_for(Path("report.txt")) is None
    assert registry.loader_for(Path("README")) is None


def test_registry_plugin_can_add_and_replace_loaders(tmp_path: Path) -> None:
    registry = LoaderRegistry(builtin_loaders())
    registry.register(".csv", _fake_loader)
    registry.register("TXT", _fake_loader)
    assert registry.extensions == frozenset({".txt", ".md", ".pdf", ".csv"})
    assert registry.loader_for(Path("x.txt")) is _fake_loader
    path = tmp_path / "t.csv"
    path.write_text("a,b\n", encoding="utf-8")
    assert load_file(path, registry)[0].page_content == "a,b\n"


@pytest.mark.parametrize("extension", ["", ".", "a/b", "x y"])
def test_registry_rejects_non_extensions(extension: str) -> None:
    with pytest.raises(ValueError):
        LoaderRegistry().register(extension, load_text)


def test_registry_has_no_shared_state() -> None:
    first = LoaderRegistry()
    first.register(".x", load_text)
    assert LoaderRegistry().extensions == frozenset()


@pytest.mark.parametrize("name", ["slides.pptx", "Makefile"])
def test_unknown_extension_lists_the_supported_ones(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("x", encoding="utf-8")
    with pytest.raises(LoadError) as info:
        load_file(path, LoaderRegistry(builtin_loaders()))
    message = str(info.value)
    assert message.startswith(f"{name}: unsupported file type")
    assert ".md, .pdf, .txt" in message and "\n" not in message


def test_load_file_missing_file_or_folder(tmp_path: Path) -> None:
    registry = LoaderRegistry(builtin_loaders())
    with pytest.raises(LoadError, match=r"cannot read|not a regular file"):
        load_file(tmp_path / "gone.txt", registry)
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    with pytest.raises(LoadError, match="not a regular file"):
        load_file(folder, registry)


def test_load_file_turns_os_errors_into_load_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.txt"
    path.write_text("内容", encoding="utf-8")
    real_open = os.open

    def denied(name: str | os.PathLike[str], flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(name) == path:
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)  # root may read anything: a chmod would not do
    with pytest.raises(LoadError, match="Permission denied") as info:
        load_file(path, LoaderRegistry(builtin_loaders()))
    assert str(info.value).startswith("locked.txt: ")


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX-only")


@needs_fifo
@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "loader",
    [load_text, load_pdf, lambda p: load_file(p, LoaderRegistry(builtin_loaders()))],
    ids=["load_text", "load_pdf", "load_file"],
)
@pytest.mark.parametrize("name", ["notes.txt", "report.pdf"])
def test_a_fifo_fails_at_once_and_never_blocks(tmp_path: Path, loader: Callable[[Path], object], name: str) -> None:
    path = tmp_path / name
    os.mkfifo(path)  # no writer ever comes: opening it for reading would block for good
    with pytest.raises(LoadError, match=r"not a regular file \(a FIFO") as info:
        loader(path)
    assert str(info.value).startswith(f"{name}: ")


@needs_fifo
@pytest.mark.timeout(20)
def test_a_fifo_swapped_in_after_the_check_does_not_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "swapped.txt"
    os.mkfifo(path)
    (tmp_path / "real.txt").write_text("内容", encoding="utf-8")
    regular = (tmp_path / "real.txt").stat()
    real_stat = Path.stat

    def stale(self: Path, *args: Any, **kwargs: Any) -> os.stat_result:
        return regular if self == path else real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stale)  # the check saw a file; the open meets the FIFO
    with pytest.raises(LoadError, match="not a regular file"):
        load_file(path, LoaderRegistry(builtin_loaders()))


@pytest.mark.timeout(20)
@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_a_device_named_like_a_text_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.symlink_to("/dev/null")  # read as an empty file before: "the file is empty"
    for load in (load_text, lambda p: load_file(p, LoaderRegistry(builtin_loaders()))):
        with pytest.raises(LoadError, match=r"not a regular file \(a character device\)"):
            load(path)


# --- LoadError ---------------------------------------------------------------------------------------


def _fail_in_worker(name: str) -> None:
    raise LoadError(Path("/data") / name, "the PDF is\ndamaged", "repair it")


def test_load_error_is_a_zhiku_error_and_crosses_process_pools() -> None:
    err = LoadError(Path("/某处/a  b.pdf"), "bad", "fix it")
    assert isinstance(err, ZhikuError) and err.exit_code == 2
    assert str(err) == "a  b.pdf: bad; fix it"  # the file name exactly, double space and all
    assert (err.message, err.fix) == ("a  b.pdf: bad", "fix it")
    # How ingest's workers send errors back: pickled in the worker, rebuilt here.
    with ProcessPoolExecutor(max_workers=1) as pool, pytest.raises(LoadError) as info:
        pool.submit(_fail_in_worker, "坏 文件.pdf").result()
    assert str(info.value) == "坏 文件.pdf: the PDF is damaged; repair it"
    assert (info.value.path, info.value.reason, info.value.fix) == (
        Path("/data/坏 文件.pdf"),
        "the PDF is damaged",
        "repair it",
    )


def test_loaders_module_still_exports_the_loaders() -> None:
    from knowledge import loaders, textfile

    assert set(loaders.__all__) == {
        "LoadError",
        "Loader",
        "LoaderRegistry",
        "builtin_loaders",
        "decode_bytes",
        "load_file",
        "load_pdf",
        "load_text",
    }
    assert loaders.load_text is textfile.load_text and loaders.decode_bytes is textfile.decode_bytes
    assert loaders.load_pdf is pdf_loader.load_pdf
