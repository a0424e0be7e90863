"""The cleaning recipe, rule by rule, and on real PDF text."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from knowledge.cleaning import clean_pages
from knowledge.loaders import load_pdf

DATA = Path(__file__).resolve().parent / "data"


def clean(text: str) -> str:
    [page] = clean_pages([text])
    return page


def wrap(text: str, width: int) -> list[str]:
    """Break text into lines of `width` columns (a CJK character takes 2), anywhere, mid-sentence, the
    way a PDF lays out CJK text."""
    lines = [""]
    for ch in text:
        if sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in lines[-1] + ch) > width:
            lines.append("")
        lines[-1] += ch
    # The tests are about lines broken mid-sentence: none may end a sentence by chance.
    assert not any(line[-1] in "。！？；：，" for line in lines[:-1]), lines
    return lines


# Two paragraphs of one article; each longer than a line of 30 characters.
PARA_1 = (
    "成公英，表字不详，金城人，东汉末群雄韩遂的信任将领。韩遂在潼关之战失败后，逃到湟中，部众四散，"
    "唯独成公英跟随。后来韩遂逝世，而成为曹魏的将领。"
)
PARA_2 = (
    "当时韩遂女婿阎行意图杀死韩遂投降，于是乘夜攻击韩遂，但失败。韩遂极为失意，向成公英表示自己打算"
    "逃到蜀地，投靠刘备。但成公英反对，认为不应放弃韩遂建立多年的基地而投靠他人。"
)
PARA_3 = (
    "雷公藤（学名：Tripterygium wilfordii），别名黄藤、黄藤草、黄藤根，是卫矛科雷公藤属植物。雷公藤主要"
    "分布于东亚地区，包括日本、朝鲜以及中国大陆的江苏、广西、湖北等地，生长于海拔200米至2,400米的地区。"
)


# --- whitespace and blank lines --------------------------------------------------------------------


def test_runs_of_blank_lines_become_one() -> None:
    assert clean("\n\n第一段。\n\n\n\n第二段。\n \n\t\n第三段。\n\n") == "第一段。\n\n第二段。\n\n第三段。"


def test_whitespace_is_normalised() -> None:
    raw = "Hello\u00a0world\t and\u3000more   text  \r\nzero\u200bwidth\ufeff here\u2060.\r\nend  "
    assert clean(raw) == "Hello world and more text\nzerowidth here.\nend"


def test_indentation_is_kept_but_not_runs_inside_a_line() -> None:
    assert clean("- item\n    - nested  item") == "- item\n    - nested item"


def test_spaces_between_cjk_characters_are_removed() -> None:
    assert clean("使得炸 药单耗降低17%，（王 晶饰）") == "使得炸药单耗降低17%，（王晶饰）"
    # Spaces next to Latin words and figures are real.
    assert clean("使用 Python 开发，共 12 个模块") == "使用 Python 开发，共 12 个模块"


def test_every_page_is_returned_even_when_it_cleans_to_nothing() -> None:
    assert clean_pages(["正文。", " \n\u200b\n", "", "- 3 -"]) == ["正文。", "", "", ""]
    assert clean_pages([]) == []


# --- joining lines broken mid-sentence -------------------------------------------------------------


def test_cjk_lines_broken_mid_sentence_are_joined() -> None:
    lines = wrap(PARA_1, 56) + wrap(PARA_2, 56)
    assert clean("\n".join(lines)) == f"{PARA_1}\n{PARA_2}"


def test_a_line_ending_in_a_closing_bracket_mid_sentence_is_joined() -> None:
    # "（徐水区）" closes a bracket but not the sentence; "。」" closes both.
    first = "正德五年（1510年）十月，刘六、刘七在霸州起义。并在安肃县（现在的河北保定市徐水区）"
    raw = f"{first}\n劫狱，救出齐彦名。成公英说：「不欺明公，假使英本主人在，实不来此也。」\n然后痛哭。"
    assert clean(raw) == (f"{first}劫狱，救出齐彦名。成公英说：「不欺明公，假使英本主人在，实不来此也。」\n然后痛哭。")


def test_lines_ending_a_sentence_are_not_joined() -> None:
    lines = ["今天天气很好，我们去公园散步，看见很多人在湖边钓鱼。", "明天我们打算去爬山，听说山顶的风景非常美丽！"]
    assert clean("\n".join(lines)) == "\n".join(lines)


def test_latin_lines_are_joined_with_a_space_and_dehyphenated() -> None:
    raw = (
        "The above-entitled matter came on for oral argument before the\n"
        "Supreme Court of the United States, and the first exam-\n"
        "ple of the day was heard by the nine justices of the court\n"
        "who had read the briefs; operators with FAA-\n"
        "approved lists were allowed to continue."
    )
    assert clean(raw) == (
        "The above-entitled matter came on for oral argument before the Supreme Court of the United "
        "States, and the first example of the day was heard by the nine justices of the court who had "
        "read the briefs; operators with FAA-approved lists were allowed to continue."
    )


def test_short_title_lines_stay_on_their_own_line() -> None:
    lines = [*wrap(PARA_1, 56), "雷公藤", *wrap(PARA_3, 56)]
    assert clean("\n".join(lines)) == f"{PARA_1}\n\n雷公藤\n\n{PARA_3}"


def test_title_after_a_paragraph_without_final_punctuation_stays_apart() -> None:
    tail = "2012年出版《严长寿和公益平台的故事》一书"  # well short of a full line
    lines = [*wrap(PARA_2, 80), tail, "香港技术标准", *wrap(PARA_3, 80)]
    assert clean("\n".join(lines)) == f"{PARA_2}\n{tail}\n\n香港技术标准\n\n{PARA_3}"


def test_a_heading_followed_by_a_blank_line_is_never_joined() -> None:
    raw = f"天生三桥\n\n{PARA_1}\n\n首钢集团\n\n{PARA_2}"
    assert clean(raw) == raw


def test_one_paragraph_per_line_text_is_left_alone() -> None:
    # A TXT file's paragraphs are single long lines; one without final punctuation must stay apart.
    raw = f"{PARA_1 * 3}另见下文\n{PARA_2 * 3}"
    assert clean(raw) == raw


def test_lists_and_short_lines_are_not_joined() -> None:
    raw = (
        "证书\n3com 认证网络大师 2019年05月\n微软公司的 2019年11月\n语言能力\n英语 读写能力 听说能力\n"
        "意大利语 读写能力 听说能力"
    )
    assert clean(raw).split("\n")[:4] == ["证书", "3com 认证网络大师 2019年05月", "微软公司的 2019年11月", "语言能力"]


def test_markdown_blocks_are_not_joined() -> None:
    long_item = "- " + "这是一个很长的列表项目，内容一直写到行尾也没有标点符号" * 2
    raw = f"{long_item}\n- 第二项\n\n```\nfor x in range(3)\n    print(x)\n```"
    assert clean(raw) == raw


# --- tables ----------------------------------------------------------------------------------------

# Rows of pdfplumber's WARN report (US layoff notices) as load_pdf gives them: as wide as the page, without
# final punctuation, cells separated by single spaces. Some have long names and few figures.
WARN_ROWS = [
    "06/22/2015 03/25/2016 07/01/2015 Maxim Integrated Product San Jose 150 Closure Permanent",
    "06/30/2015 08/29/2015 07/01/2015 McGraw-Hill Education Monterey 137 Layoff Unknown at this time",
    "06/30/2015 08/30/2015 07/01/2015 Long Beach Memorial Medical Center Long Beach 90 Layoff Permanent",
    "07/01/2015 09/02/2015 07/01/2015 Leidos El Segundo 72 Layoff Permanent",
    "07/01/2015 09/30/2016 07/01/2015 Bosch Healthcare Systems, Inc. Palo Alto 55 Closure Permanent",
    "07/27/2015 09/30/2015 07/29/2015 Hank Fisher Properties, Inc. - Chateau at Carmichael 57 Layoff Permanent",
    "07/30/2015 07/30/2015 08/05/2015 Abbott Vascular Temecula 133 Layoff Permanent",
    "08/20/2015 10/22/2015 08/21/2015 XOMA (US) LLC Berkeley 39 Layoff Permanent",
]


def test_latin_table_rows_stay_one_row_per_line() -> None:
    header = "Notice Date Effective Received Company City No. Of Layoff/Closure"
    page = "\n".join(["WARN Report", header, *WARN_ROWS])
    # The title is set off as a heading; the header and every row keep their own line.
    assert clean_pages([page], laid_out=True) == [f"WARN Report\n\n{header}\n" + "\n".join(WARN_ROWS)]


def test_wrapped_prose_full_of_figures_is_still_joined() -> None:
    # A column of the Federal Register: citations put figures on every line, but with punctuation after
    # them ("2018;", "(83"), and a line of bare figures ("14 CFR 21.197 and 21.199") stands alone.
    amends = (
        "The FAA amends 14 CFR 39.13 by removing Airworthiness Directive (AD) 2018–23–51, Amendment 39–19512 "
        "(83 FR 62697, December 6, 2018; corrected December 11, 2018 (83 FR 63561)), and adding the following "
        "new AD."
    )
    permits = (
        "Special flight permits may be issued in accordance with 14 CFR 21.197 and 21.199 to operate the "
        "airplane to a location where the actions of this AD can be performed."
    )
    lines = [
        "The FAA amends 14 CFR 39.13 by removing",
        "Airworthiness Directive (AD) 2018–23–51,",
        "Amendment 39–19512 (83 FR 62697,",
        "December 6, 2018; corrected December 11,",
        "2018 (83 FR 63561)), and adding the",
        "following new AD.",
        "Special flight permits may be issued in",
        "accordance with 14 CFR 21.197 and 21.199",
        "to operate the airplane to a location where",
        "the actions of this AD can be performed.",
    ]
    assert clean_pages(["\n".join(lines)], laid_out=True) == [f"{amends}\n{permits}"]


def test_cjk_table_rows_stay_apart_between_joined_prose() -> None:
    rows = [
        "白细胞计数(WBC) 仪器法 3.9 E+9/L [4.0-10.0] 偏低",
        "中性粒细胞计数(NEU#) 仪器法 2.33 E+9/L [1.8-6.3]",
        "淋巴细胞计数(LYM#) 仪器法 1.16 E+9/L [1.1-3.2]",
    ]
    lines = [*wrap(PARA_1, 50), *rows, *wrap(PARA_2, 50)]
    assert clean_pages(["\n".join(lines)], laid_out=True) == [f"{PARA_1}\n" + "\n".join(rows) + f"\n{PARA_2}"]


# --- running heads, footers and page numbers -------------------------------------------------------


def _report_pages(count: int) -> list[str]:
    return [f"某某科技股份有限公司 2023 年年度报告\n{PARA_1}\n第 {n} 页 共 {count} 页\n" for n in range(1, count + 1)]


def test_running_heads_and_footers_are_dropped_over_three_pages() -> None:
    cleaned = clean_pages(_report_pages(3))
    assert cleaned == [PARA_1] * 3


def test_running_lines_with_changing_page_numbers_are_one_running_head() -> None:
    head = "Federal Register/Vol. 85, No. 152/Thursday, August 6, 2020"
    pages = [
        # The page number moves from the left (even pages) to the right (odd pages) of the running head.
        f"{head} {4000 + n}\n{PARA_2}\nVerDate 16:21 Frm 000{n}"
        if n % 2
        else f"{4000 + n} {head}\n{PARA_2}\nVerDate 16:21 Frm 000{n}"
        for n in range(1, 5)
    ]
    assert clean_pages(pages) == [PARA_2] * 4


def test_a_repeated_first_line_is_kept_with_fewer_than_three_pages() -> None:
    pages = ["公司简介\n第一页的内容。", "公司简介\n第二页的内容。"]
    assert clean_pages(pages) == pages


def test_a_line_on_fewer_than_half_the_pages_is_kept() -> None:
    pages = [f"第{n}章\n{PARA_1}" for n in "一二三四"]
    pages[0] = "内部资料\n" + pages[0]
    assert clean_pages(pages)[0].startswith("内部资料")


@pytest.mark.parametrize("number", ["3", "- 3 -", "— 3 —", "第 3 页", "第3页 共10页", "Page 3 of 10", "p. 3", "3/10"])
def test_page_number_lines_are_dropped(number: str) -> None:
    assert clean(f"{number}\n{PARA_1}\n{number}") == PARA_1


def test_numbers_inside_the_text_are_kept() -> None:
    raw = f"{PARA_1}\n血小板计数\n149\n{PARA_2}"
    assert "\n149\n" in clean(raw)


def test_margin_line_numbers_are_stripped() -> None:
    lines = [f"{n} line {n} of the transcript." for n in range(1, 13)] + ["13", "14", "1"]
    cleaned = clean("\n".join(lines))
    assert cleaned.split("\n") == [f"line {n} of the transcript." for n in range(1, 13)]


def test_a_short_numbered_list_keeps_its_numbers() -> None:
    raw = "1 准备材料。\n2 混合均匀。\n3 放入烤箱。"
    assert clean(raw) == raw


# --- glyphs drawn twice ----------------------------------------------------------------------------


def test_a_line_with_every_glyph_doubled_is_undoubled() -> None:
    raw = (
        "安安徽徽安安利利合合成成革革股股份份有有限限公公司司\nAANNHHUUII AANNLLII AARRTTIIFFIICCIIAALL LLEEAATTHHEERR"
    )
    assert clean(raw) == "安徽安利合成革股份有限公司\nANHUI ANLI ARTIFICIAL LEATHER"


@pytest.mark.parametrize(
    "line", ["谢谢", "哈哈哈哈", "哈哈哈哈哈哈哈哈", "谢谢你们谢谢", "嘻嘻哈哈", "我们谢谢谢谢大家"]
)
def test_real_doubled_words_are_kept(line: str) -> None:
    assert clean(line) == line


# --- real PDFs -------------------------------------------------------------------------------------


def test_real_pdf_with_doubled_glyphs_cleans_up() -> None:
    pages = clean_pages([d.page_content for d in load_pdf(DATA / "issue-71-duplicate-chars.pdf")])
    assert len(pages) == 2
    text = "\n".join(pages)
    assert "项项目目" not in text
    # In the PDF the sentence is broken after "开挖进" and has a space in "炸 药".
    sentence = "使得炸药单耗降低17%，开挖进尺提高92%，成功解决了工程难题。"
    assert text.count(sentence) == 3
    assert "项目描述：负责四川省甘孜州丹巴磨子电站引水隧洞爆破方案优化设计及爆破震动监测工作。（1）" in text


def test_reportlab_pdf_sentence_broken_across_lines_becomes_one_line(tmp_path: Path) -> None:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfgen import canvas

    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    path = tmp_path / "文章.pdf"
    pdf = canvas.Canvas(str(path), pagesize=A4)
    pdf.setFont("STSong-Light", 11)
    lines = ["成公英", *wrap(PARA_1, 76), "雷公藤", *wrap(PARA_3, 76)]
    for i, line in enumerate(lines):
        pdf.drawString(60, 780 - 16 * i, line)
    pdf.showPage()
    pdf.save()

    [raw] = [d.page_content for d in load_pdf(path)]
    assert raw.split("\n") == lines  # the PDF really breaks the sentences
    assert clean(raw) == f"成公英\n\n{PARA_1}\n\n雷公藤\n\n{PARA_3}"


def test_text_files_keep_the_spaces_their_author_typed() -> None:
    text = "专辑《格斗天王 电视原声带》于2005年发行。\n剧目有《打金枝》 《明公断》。"
    assert clean_pages([text], laid_out=False) == [text]
    assert clean_pages([text], laid_out=True)[0].startswith("专辑《格斗天王电视原声带》")
