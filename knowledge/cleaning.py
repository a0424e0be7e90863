"""The one cleaning recipe for extracted text: what PDF extraction and old text files get wrong.

clean_pages() works on the pages of one document at a time because running heads and footers are only
visible across pages. Steps, in order: whitespace, glyphs drawn twice, margin line numbers, running
heads/footers, page numbers, re-joining lines that a PDF broke mid-sentence (headings stay on their own
line, set off by blank lines; table rows are never joined), spaces between CJK characters, runs of blank
lines.

Without the page geometry, "broken by the page width" is judged from line widths in display columns (a
CJK character counts 2): a line is continued when the next line's first word would not have fitted on it.
Text with one paragraph per line (most TXT/MD files) has lines far wider than any page and is not joined.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from itertools import groupby

from common.text import UNSPACED_RANGES

__all__ = ["clean_pages"]

# --- character classes ------------------------------------------------------------------------------

# CJK ideographs, kana, CJK punctuation and full-width forms: text written without spaces between words.
_CJK = UNSPACED_RANGES
_CJK_CHAR = re.compile(f"[{_CJK}]")
_CJK_SPACE = re.compile(f"(?<=[{_CJK}]) +(?=[{_CJK}])")

_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_SOFT_HYPHEN_EOL = re.compile("\u00ad[ \t]*\n")
_SPACES = re.compile("[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")  # -> " "
_LINE_BREAKS = re.compile("\r\n|[\r\f\v\u0085\u2028\u2029]")  # -> "\n"
_RUN_OF_SPACES = re.compile(r"(?<=\S) {2,}")

# --- line classes -----------------------------------------------------------------------------------

# Ends a sentence or clause, so a line ending in one of these is not continued on the next line.
_TERMINAL = frozenset("。！？；：….!?;:")
# Closing brackets/quotes: "...。」" ends a sentence, "...（徐水区）" does not; look past them.
_CLOSERS = "」』”’）)】〕》〉]}\"'"
# Punctuation that cannot start a line in CJK typesetting: a line starting with it continues the last.
_CONTINUATION = frozenset("，。、；：？！）」』”’】〕》〉,.;:?!)]}%")
# A line starting like this opens a new block: Markdown heading/list/quote/table/fence, numbered items.
_BLOCK_START = re.compile(
    r"(?:#{1,6}\s|[-*+•·▪●○]\s|>|\||```|~~~"
    r"|\d{1,3}[.)、](?!\d)|[（(]\d{1,3}[)）]|[（(][一二三四五六七八九十]{1,3}[)）]"
    r"|[一二三四五六七八九十百]{1,3}、|第[一二三四五六七八九十百千\d]{1,4}[章节條条部篇卷回])"
)
_FENCE = re.compile(r"\s*(?:```|~~~)")

# A page number alone on a line: 3 | - 3 - | 第 3 页 | 第3页 共10页 | Page 3 of 10 | p. 3 | 3/10
_PAGE_NUMBER = re.compile(
    r"[-–—~·•\s]*\d{1,4}[-–—~·•\s]*"
    r"|第\s*\d{1,4}\s*页(?:\s*[,，/、]?\s*共\s*\d{1,4}\s*页)?"
    r"|共\s*\d{1,4}\s*页\s*[,，/、]?\s*第\s*\d{1,4}\s*页"
    r"|(?:page|p\.|pg\.?)\s*\d{1,4}(?:\s*(?:of|/)\s*\d{1,4})?"
    r"|\d{1,4}\s*/\s*\d{1,4}",
    re.IGNORECASE,
)
_DIGITS = re.compile(r"\d+")
# A figure standing alone as a table cell: a number, date, time, amount or percentage ("7,723,293",
# "06/22/2015", "$3,790", "-4.5%", "(1,234)"). It ends in a digit: prose puts punctuation after its figures
# ("December 6, 2018;", "AD 2018–23–51,"), a table does not.
_FIGURE_CELL = re.compile(r"[-+−]?[$€£¥]?\d(?:[\d.,:/–—-]*\d)?%?|\([$€£¥]?\d(?:[\d.,]*\d)?%?\)")
_MARGIN_NUMBER = re.compile(r"(\d{1,3})(?: +|$)")

# --- tuning -----------------------------------------------------------------------------------------

_EDGE_LINES = 2  # running heads/footers and page numbers are looked for in the first/last 2 lines
_MIN_PAGES_FOR_RUNNING_LINES = 3
_RUNNING_LINE_SHARE = 0.5  # a running head occurs on at least half the pages
_SHORT_LINE = 0.5  # shorter than half the page's line width: a title, or a paragraph's last line
_CJK_SLACK = 6  # a CJK line broken by the width is within 3 characters of the full width
_LATIN_FULL = 0.75  # proportional fonts make Latin widths in characters rough: 25 % slack
_WINDOW = 8  # lines either side that set a line's local layout width
_MIN_LOCAL_WIDTH = 0.9  # ... which is at least this share of the page's
_MIN_WRAP_WIDTH = 36  # display columns (a CJK character is 2): narrower "layouts" are lists and forms
_MAX_WRAP_WIDTH = 200  # lines this wide were not wrapped by a layout (one paragraph per line)
_MIN_ROW_FIGURES = 3  # a table row of Latin text has this many figure cells ...
_MIN_ROW_FIGURE_SHARE = 0.25  # ... making up this share of its cells ...
_MIN_TABLE_ROWS = 3  # ... in a run of this many such lines: one line of figures is prose or a footer
_MIN_DOUBLED_PAIRS = 4
_MIN_MARGIN_NUMBERS = 8


def clean_pages(pages: list[str], *, laid_out: bool = True) -> list[str]:
    """Clean the pages of one document (a TXT file is one page). Returns the same number of pages (a page
    may become "").

    ``laid_out`` is for text extracted from a page layout (PDF): there, glyphs drawn twice, margin line
    numbers and spaces between CJK characters are artefacts of extraction and are removed. In a text
    file the author typed them (e.g. 《格斗天王 电视原声带》), so they stay.
    """
    paged = [_normalise_whitespace(page).split("\n") for page in pages]
    if laid_out:
        paged = [[_undouble(line) for line in lines] for lines in paged]
        paged = [_strip_margin_numbers(lines) for lines in paged]
    paged = _drop_running_lines(paged)
    paged = [_drop_page_numbers(lines) for lines in paged]
    paged = [_join_lines(lines) for lines in paged]
    if laid_out:  # spaces between CJK characters go last: until then they show table cells and form fields
        paged = [[_CJK_SPACE.sub("", line) for line in lines] for lines in paged]
    return ["\n".join(_collapse_blank_lines(lines)) for lines in paged]


# --- whitespace -------------------------------------------------------------------------------------


def _normalise_whitespace(text: str) -> str:
    text = _LINE_BREAKS.sub("\n", text)
    text = _SOFT_HYPHEN_EOL.sub("-\n", text)  # a soft hyphen at a line end is a hyphenation point
    text = _ZERO_WIDTH.sub("", text).replace("\u00ad", "")
    text = _SPACES.sub(" ", text)
    # Indentation is kept (it marks paragraphs and Markdown structure); runs inside a line are not.
    return "\n".join(_RUN_OF_SPACES.sub(" ", line).rstrip() for line in text.split("\n"))


def _collapse_blank_lines(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        if line.strip() or (out and out[-1]):
            out.append(line if line.strip() else "")
    while out and not out[-1]:
        out.pop()
    return out


# --- glyphs drawn twice -----------------------------------------------------------------------------


def _undouble(line: str) -> str:
    """ "安安徽徽 AANNHHUUII" -> "安徽 ANHUI" when EVERY character of the line is doubled.

    pdfplumber's dedupe_chars() removes overlapping duplicates; this catches duplicates drawn with an
    offset. Real doubled words (谢谢, 哈哈哈哈) are left alone: the whole line must be pairs, with at
    least four pairs of at least three different characters.
    """
    words = line.split()
    if not words or any(len(word) % 2 or word[0::2] != word[1::2] for word in words):
        return line
    pairs = "".join(word[0::2] for word in words)
    if len(pairs) < _MIN_DOUBLED_PAIRS or len(set(pairs)) < 3:
        return line
    indent = line[: len(line) - len(line.lstrip())]
    return indent + " ".join(word[0::2] for word in words)


# --- line numbers, running heads, page numbers ------------------------------------------------------


def _strip_margin_numbers(lines: list[str]) -> list[str]:
    """Remove line numbers printed in the margin (transcripts, legal text): 1, 2, 3 ... before most lines.

    Only a run of at least 8 consecutive numbers covering most of the page counts, so a numbered list
    or a table column of figures is kept.
    """
    numbered = [(i, int(m.group(1))) for i, line in enumerate(lines) if (m := _MARGIN_NUMBER.match(line))]
    best: list[int] = []
    run: list[int] = []
    previous = None
    for i, number in numbered:
        run = [*run, i] if previous is not None and number == previous + 1 else [i]
        previous = number
        if len(run) > len(best):
            best = run
    visible = sum(1 for line in lines if line.strip())
    if len(best) < _MIN_MARGIN_NUMBERS or len(best) < 0.5 * visible:
        return lines
    out = list(lines)
    for i in best:
        out[i] = _MARGIN_NUMBER.sub("", out[i], count=1)
    return out


def _edge_indices(lines: list[str], lone: bool = False) -> list[int]:
    visible = [i for i, line in enumerate(lines) if line.strip()]
    if len(visible) < 2 and not lone:
        return []  # a lone line is the page's body, not a running head (though it may be a page number)
    # Short pages: fewer edge lines, so the body between a head and a foot is never an "edge".
    count = min(_EDGE_LINES, (len(visible) - 1) // 2) or 1
    return sorted(set(visible[:count] + visible[-count:]))


def _running_key(line: str) -> str:
    # "47700 Federal Register/Vol. 85" and "Federal Register/Vol. 85 ... 47699" are the same running head.
    key = _DIGITS.sub("#", " ".join(line.split()))
    return key.strip("# ")


def _drop_running_lines(paged: list[list[str]]) -> list[list[str]]:
    """Drop running heads/footers: a line (digits normalised) among the first/last 2 lines of at least
    half the pages, when there are 3 or more. Repeated a few times, since removing one running line can
    uncover the next one (a footer of several lines)."""
    if len(paged) < _MIN_PAGES_FOR_RUNNING_LINES:
        return paged
    needed = max(2, math.ceil(len(paged) * _RUNNING_LINE_SHARE))
    paged = [list(lines) for lines in paged]
    for _ in range(4):
        counts: Counter[str] = Counter()
        for lines in paged:
            counts.update({_running_key(lines[i]) for i in _edge_indices(lines)})
        running = {key for key, count in counts.items() if count >= needed and len(key) >= 2}
        if not running:
            break
        for lines in paged:
            for i in _edge_indices(lines):
                if _running_key(lines[i]) in running:
                    lines[i] = ""
    return paged


def _drop_page_numbers(lines: list[str]) -> list[str]:
    edges = set(_edge_indices(lines, lone=True))
    return ["" if i in edges and _PAGE_NUMBER.fullmatch(line.strip()) else line for i, line in enumerate(lines)]


# --- joining lines ----------------------------------------------------------------------------------


def _width(text: str) -> int:
    return sum(2 if ord(ch) >= 0x1100 and unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _ends_clause(line: str) -> bool:
    stripped = line.rstrip().rstrip(_CLOSERS)
    return not stripped or stripped[-1] in _TERMINAL


def _continuation_start(line: str) -> bool:
    return line[0] in _CONTINUATION or line[0].islower()


def _is_cjk(ch: str) -> bool:
    return bool(_CJK_CHAR.match(ch))


def _join(left: str, right: str) -> str:
    right = right.lstrip()
    a, b = left[-1], right[0]
    if a == "-" and len(left) >= 2 and left[-2].islower() and b.islower():
        return left[:-1] + right  # "exam-" + "ple": a word hyphenated at the line end
    if _is_cjk(a) or _is_cjk(b) or a in "-/—–":
        return left + right
    return f"{left} {right}"


def _join_lines(lines: list[str]) -> list[str]:
    """Re-join lines broken by the page width; set short title-like lines off with blank lines."""
    all_widths = [_width(line.strip()) for line in lines]
    widths = sorted(width for width in all_widths if width)
    if not widths:
        return []
    usual = widths[int(0.9 * (len(widths) - 1))]  # the line width of the page's layout
    # One paragraph per line (TXT/MD) is not wrapped text, and pages of short lines are lists, forms or
    # tables rather than a narrow layout: their lines are left as they are.
    wrapped = _MIN_WRAP_WIDTH <= usual <= _MAX_WRAP_WIDTH

    rows = _table_rows(lines)
    fenced: list[bool] = []
    inside = False
    for line in lines:
        fence = bool(_FENCE.match(line))
        fenced.append(inside or fence)
        inside = inside != fence

    def text(i: int) -> str:
        return lines[i].strip() if 0 <= i < len(lines) else ""

    def short(i: int) -> bool:
        return _width(text(i)) < _SHORT_LINE * usual

    def local_width(i: int) -> int:
        # Body text, footnotes and sidebars of one page have different widths: use the neighbourhood's.
        near = sorted(all_widths[max(0, i - _WINDOW) : i + _WINDOW + 1], reverse=True)
        return max(near[1] if len(near) > 1 else near[0], int(_MIN_LOCAL_WIDTH * usual))

    def full(i: int) -> bool:
        # Broken by the width: the next line's first word would not have fitted on this line.
        here, after = text(i), text(i + 1)
        if not here or not after:
            return False
        width = local_width(i)
        if _is_cjk(here[-1]) or _is_cjk(after[0]):
            # CJK breaks between any two characters, so its broken lines are all but exactly full.
            return _width(here) + _width(after[0]) >= width - _CJK_SLACK
        return _width(here) + 1 + _width(after.split()[0]) > _LATIN_FULL * width

    def heading(i: int) -> bool:
        # Short, open-ended and before prose: "成公英", "美女食神". After an unfinished line it must not
        # look like that line's tail ("，下文" or "the end").
        here, before, after = text(i), text(i - 1), text(i + 1)
        if here and not after and i == len(lines) - 1:
            after, before = "。", before or "。"  # a page's last line: its prose is on the next page
        return (
            wrapped
            and bool(here and after)
            and not fenced[i]
            and short(i)
            and not _ends_clause(here)
            and not _BLOCK_START.match(here)
            and (not before or _ends_clause(before) or not (full(i - 1) or _continuation_start(here)))
            and (not short(i + 1) or _ends_clause(after))
        )

    def continues(i: int) -> bool:
        here, after = text(i), text(i + 1)
        return (
            wrapped
            and bool(here and after)
            and not fenced[i]
            and not fenced[i + 1]
            and not _ends_clause(here)
            and not here.startswith(("#", "|"))
            and not _BLOCK_START.match(after)
            and not lines[i + 1].startswith("  ")  # indented: a new paragraph in Chinese plain text
            and not rows[i]
            and not rows[i + 1]
            and full(i)
            and not heading(i + 1)
        )

    out: list[str] = []
    current: str | None = None
    for i, line in enumerate(lines):
        if not line.strip():
            out.append("")
            continue
        if heading(i):
            out.extend(["", line.strip(), ""])
            continue
        current = line if current is None else _join(current, line)
        if not continues(i):
            out.append(current)
            current = None
    return out


def _table_rows(lines: list[str]) -> list[bool]:
    """Which lines are table rows: their line breaks are the table's and never joined.

    A row is laid out as wide as the page like prose without final punctuation, so it is told by its
    cells: in CJK text by _tabular(); in Latin text by figures (_figure_row), and only in a run of at least
    three such lines, since one line of prose or a footer can be full of figures too.
    """
    rows = [bool(_CJK_CHAR.search(line)) and _tabular(line) for line in lines]
    figured = [not _CJK_CHAR.search(line) and _figure_row(line) for line in lines]
    start = 0
    for is_figured, run in groupby(figured):  # runs of consecutive lines alike
        length = len(list(run))
        if is_figured and length >= _MIN_TABLE_ROWS:
            rows[start : start + length] = [True] * length
        start += length
    return rows


def _tabular(line: str) -> bool:
    """A table row or form line in CJK text ("白细胞计数(WBC) 仪器法 3.9 E+9/L [4.0-10.0]"): several
    space-separated cells, two or more with figures. Chinese prose has few spaces and fewer figures."""
    cells = line.split()
    if len(cells) < 3:
        return False
    return sum(1 for cell in cells if any(ch.isdigit() for ch in cell)) >= 2


def _figure_row(line: str) -> bool:
    """A line of Latin text that may be a table row ("06/22/2015 03/25/2016 07/01/2015 Leidos El Segundo 72
    Layoff Permanent"): several cells that are figures, and a fair share of all its cells. Prose has a few
    figures among many words, and punctuation after them."""
    cells = line.split()
    figures = sum(1 for cell in cells if _FIGURE_CELL.fullmatch(cell))
    return figures >= _MIN_ROW_FIGURES and figures >= _MIN_ROW_FIGURE_SHARE * len(cells)
