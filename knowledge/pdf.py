"""PDFs: one raw Document per page with text, read in column order, with guards against hostile files
(decompression bombs, page floods, damaged object trees) that turn every problem into one LoadError."""

from __future__ import annotations

import bisect
import itertools
import re
import zlib
from collections.abc import Iterable
from io import BufferedReader
from operator import itemgetter
from pathlib import Path
from typing import Any

import pdfplumber
from langchain_core.documents import Document
from pdfminer.pdfdocument import PDFEncryptionError, PDFPasswordIncorrect
from pdfminer.pdfexceptions import PDFException
from pdfminer.pdfparser import PDFSyntaxError
from pdfminer.pdftypes import LITERALS_FLATE_DECODE, PDFStream, resolve1
from pdfminer.psexceptions import PSEOF, PSException
from pdfplumber.page import Page
from pdfplumber.utils import chars_to_textmap, cluster_objects, extract_words
from pdfplumber.utils.exceptions import MalformedPDFException, PdfminerException

from common.text import is_cjk
from knowledge.load_errors import LoadError, one_line, open_regular, os_error
from knowledge.textfile import decode_bytes

__all__ = ["MAX_PAGES", "MAX_PAGE_STREAM_MB", "load_pdf"]

_MAX_DETAIL = 160  # a parser's message can quote a whole damaged object: keep the reason readable


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Word gap tolerance relative to the font size: large spaced-out CJK headings get no spaces between
# characters, while 0.25 em still separates most Latin words set without explicit space characters.
_X_TOLERANCE_RATIO = 0.25
_Y_TOLERANCE = 3
# Latin words set without space characters in tightly justified lines are only 0.17-0.25 em apart (pdfplumber
# issue 316), while the letters of a word touch (a glyph's box is its advance width; kerning moves it by a
# few hundredths of an em). On lines that have no space character at all, a gap this much (in em) wider
# than the usual one between the line's letters is a word break between two non-CJK glyphs. Lines with
# space characters keep them as the only word breaks: there a narrow gap is a thin space around "/" or a
# glyph that did not extract (a missing "ff" ligature).
_MIN_LATIN_WORD_GAP = 0.15
# A space glyph drawn over another glyph (a second text layer of blanks laid over the digits of a date in
# the WARN report: "0 3 / 2 5 / 2 0 16") is not a gap between words: dropped when glyphs cover more than
# half of it.
_MAX_SPACE_OVERLAP = 0.5
_SCANNED_MIN_CHARS_PER_PAGE = 20  # less text than this on pages covered by an image: a scan
_MAX_ROTATED_SHARE = 0.3  # rotated text under this share of a page is margin stamps and sidebars
_OCR_FIX = "run OCR on it first (e.g. ocrmypdf in.pdf out.pdf) and ingest the result"
# pdfminer writes a glyph it cannot map to Unicode as "(cid:123)": never text worth storing. Encrypted PDFs
# with CID fonts come out like this (pdfminer does not decrypt the strings that name the font's encoding).
_UNMAPPED_GLYPH = re.compile(r"\(cid:\d+\)")


def _pdf_header_error(path: Path, fh: BufferedReader) -> LoadError | None:
    try:
        head = fh.read(1024)
    except OSError as err:
        return os_error(path, err)
    if not head:
        return LoadError(path, "the file is empty (0 bytes)", "remove it or replace it with a complete copy")
    if b"%PDF-" not in head:
        kind = "text" if _looks_like_text(head) else "binary data"
        return LoadError(
            path,
            f"not a PDF: there is no %PDF- header (the content looks like {kind})",
            "give the file its real extension, or export it to PDF again",
        )
    return None


def _looks_like_text(head: bytes) -> bool:
    try:
        text, _ = decode_bytes(head)
    except ValueError:
        return False
    return bool(text.strip())


def _pdf_error(path: Path, err: BaseException) -> LoadError:
    """Translate what pdfplumber/pdfminer raised (PdfminerException wraps the pdfminer error)."""
    cause = err.args[0] if isinstance(err, PdfminerException) and err.args else err
    detail = f"{type(cause).__name__}: {_shorten(one_line(str(cause)), _MAX_DETAIL)}".rstrip(": ")
    if isinstance(cause, PDFPasswordIncorrect):
        return LoadError(
            path,
            "the PDF is password-protected",
            "remove the password (e.g. qpdf --decrypt --password=... in.pdf out.pdf) and ingest again",
        )
    if isinstance(cause, PDFEncryptionError):
        return LoadError(
            path,
            f"the PDF is encrypted in a way that cannot be read ({detail})",
            "save an unencrypted copy (e.g. qpdf --decrypt in.pdf out.pdf) and ingest again",
        )
    if isinstance(cause, PSEOF):
        return LoadError(
            path,
            f"the PDF is truncated: it ends in the middle ({detail})",
            "get a complete copy (download or export it again)",
        )
    if isinstance(cause, (PDFSyntaxError, PSException, PDFException, MalformedPDFException)):
        return LoadError(
            path,
            f"the PDF is damaged or malformed ({detail})",
            "repair it (e.g. qpdf in.pdf out.pdf) or export it to PDF again",
        )
    return LoadError(
        path,
        f"cannot read the PDF ({detail})",
        "repair it (e.g. qpdf in.pdf out.pdf) or export it to PDF again",
    )


def _covered_by_image(page: Page) -> bool:
    page_area = float(page.width * page.height) or 1.0
    return any(float((img["x1"] - img["x0"]) * (img["bottom"] - img["top"])) >= 0.5 * page_area for img in page.images)


def _doubled_glyphs(chars: list[dict[str, Any]]) -> set[int]:
    """ids of glyphs drawn again at (nearly) the same spot, in the same font and size, as an earlier one.

    The same rule as pdfplumber's ``dedupe_chars`` (tolerance 1 pt), but with a grid hash: pdfplumber's
    version took most of the parse time of a dense 15-page PDF (10 s against 1 s).
    """
    seen: set[tuple[str, str, float, int, int]] = set()
    drop: set[int] = set()
    for ch in chars:
        x, y = round(float(ch["x0"])), round(float(ch["top"]))
        key = (ch["text"], str(ch.get("fontname")), round(float(ch.get("size", 0)), 1))
        if any((*key, x + dx, y + dy) in seen for dx in (-1, 0, 1) for dy in (-1, 0, 1)):
            drop.add(id(ch))
        else:
            seen.add((*key, x, y))
    return drop


def _text_area(page: Page) -> Page:
    """Drop glyphs drawn twice, and rotated margin stamps when most of the page is upright text."""
    drop = _doubled_glyphs(page.chars)
    if drop:
        page = page.filter(lambda obj: id(obj) not in drop)
    chars = page.chars
    rotated = sum(1 for ch in chars if not ch.get("upright", True))
    if 0 < rotated < _MAX_ROTATED_SHARE * len(chars):
        page = page.filter(lambda obj: obj.get("object_type") != "char" or bool(obj.get("upright", True)))
    return page


def _columns(words: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """x-ranges of text columns when the page is set in two or more columns of prose, else [].

    pdfplumber reads a line straight across the page, which interleaves the columns. A gutter is a
    vertical strip that (almost) no word crosses; each column must be wide and hold prose-length lines,
    so tables, whose cells are short, stay in one piece.
    """
    if len(words) < 40:
        return []
    left = min(float(w["x0"]) for w in words)
    right = max(float(w["x1"]) for w in words)
    width = right - left
    if width < 200:
        return []
    cover = [0] * (int(width) + 2)
    for w in words:
        for x in range(int(float(w["x0"]) - left) + 1, int(float(w["x1"]) - left)):
            cover[x] += 1
    line_count = len({round(float(w["top"])) for w in words})
    if line_count < 10:
        return []
    allowed = max(2, int(0.05 * line_count))  # full-width titles, running heads and footers cross gutters
    sizes = sorted(float(w["bottom"]) - float(w["top"]) for w in words)
    min_gap = max(6.0, 0.8 * sizes[len(sizes) // 2])

    gutters: list[float] = []
    start: int | None = None
    for x, count in enumerate(cover):
        if count <= allowed and start is None:
            start = x
        elif count > allowed and start is not None:
            if x - start >= min_gap and start > 0:
                gutters.append(left + (start + x) / 2)
            start = None
    if not gutters:
        return []
    edges = [left, *gutters, right]
    columns = list(itertools.pairwise(edges))
    for x0, x1 in columns:
        if x1 - x0 < 0.2 * width:
            return []
        inside = [w for w in words if float(w["x0"]) >= x0 - 1 and float(w["x1"]) <= x1 + 1]
        lines: dict[int, int] = {}
        for w in inside:
            key = round(float(w["top"]))
            lines[key] = lines.get(key, 0) + len(str(w["text"])) + 1
        lengths = sorted(lines.values())
        if len(lengths) < 5 or lengths[len(lengths) // 2] < 12:
            return []
    return columns


def _blank_on_glyphs(blank: dict[str, Any], glyphs: list[dict[str, Any]], starts: list[float]) -> bool:
    """Whether more than half of a space char is covered by the line's glyphs (sorted by x0)."""
    x0, x1 = float(blank["x0"]), float(blank["x1"])
    if x1 <= x0:
        return False
    # Glyphs are rarely wider than 2 em: only those starting up to that far left of the blank can overlap it.
    first = bisect.bisect_left(starts, x0 - 2 * float(blank.get("size") or 0) - (x1 - x0))
    covered = sum(
        max(0.0, min(x1, float(glyph["x1"])) - max(x0, float(glyph["x0"])))
        for glyph in glyphs[first : bisect.bisect_right(starts, x1)]
    )
    return covered > _MAX_SPACE_OVERLAP * (x1 - x0)


def _word_breaks(glyphs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The neighbouring glyphs (of a line without space characters, sorted by x) with a word break between
    them: a gap ``_MIN_LATIN_WORD_GAP`` em wider than the line's usual one between letters (0, or the
    tracking of letter-spaced text), and neither side CJK."""
    gaps = [
        (float(right["x0"]) - float(left["x1"])) / (float(left.get("size") or 0) or 1.0)
        for left, right in itertools.pairwise(glyphs)
    ]
    if not gaps:
        return []
    usual = max(0.0, sorted(gaps)[len(gaps) // 2])
    return [
        (left, right)
        for (left, right), gap in zip(itertools.pairwise(glyphs), gaps, strict=True)
        # CJK has no spaces between words: spaced-out CJK headings must not gain them
        if gap >= usual + _MIN_LATIN_WORD_GAP
        and not is_cjk(str(left["text"])[:1])
        and not is_cjk(str(right["text"])[:1])
    ]


def _repaired_chars(chars: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The page's chars, in their order, without space glyphs drawn over other glyphs, and with a space
    char added at each word gap of a line that has no space characters (see the constants above)."""
    drop: set[int] = set()
    spaces: dict[int, dict[str, Any]] = {}  # id(glyph) -> the space to put after it
    upright = [ch for ch in chars if ch.get("upright", True)]
    for line in cluster_objects(upright, itemgetter("top"), _Y_TOLERANCE):
        line.sort(key=lambda ch: (float(ch["x0"]), float(ch["x1"])))
        glyphs = [ch for ch in line if not str(ch["text"]).isspace()]
        starts = [float(ch["x0"]) for ch in glyphs]
        blanks = [ch for ch in line if str(ch["text"]).isspace()]
        phantom = [ch for ch in blanks if _blank_on_glyphs(ch, glyphs, starts)]
        drop.update(id(ch) for ch in phantom)
        if len(phantom) < len(blanks):
            continue  # the line has real space characters: they mark its words
        for left, right in _word_breaks(glyphs):
            gap = {"text": " ", "x0": left["x1"], "x1": right["x0"], "width": right["x0"] - left["x1"]}
            spaces[id(left)] = {**left, **gap}
    if not drop and not spaces:
        return chars
    repaired: list[dict[str, Any]] = []
    for ch in chars:
        if id(ch) not in drop:
            repaired.append(ch)
        if id(ch) in spaces:
            repaired.append(spaces[id(ch)])
    return repaired


def _chars_text(chars: list[dict[str, Any]]) -> str:
    """What Page.extract_text gives for these chars."""
    if not chars:
        return ""
    textmap = chars_to_textmap(chars, x_tolerance_ratio=_X_TOLERANCE_RATIO, y_tolerance=_Y_TOLERANCE)
    return str(textmap.as_string)


def _page_text(page: Page) -> str:
    page = _text_area(page)
    if not page.chars:
        return ""
    chars = _repaired_chars(page.chars)
    words = extract_words(chars, x_tolerance_ratio=_X_TOLERANCE_RATIO, y_tolerance=_Y_TOLERANCE)
    columns = _columns(words)
    if not columns:
        return _chars_text(chars)

    # Lines that cross a gutter (titles, running heads) split the page into bands; inside a band each
    # column is read top to bottom before the next one.
    gutters = [x1 for _, x1 in columns[:-1]]
    spans = sorted(
        (float(w["top"]), float(w["bottom"]))
        for w in words
        if any(float(w["x0"]) < g < float(w["x1"]) for g in gutters)
    )
    merged: list[list[float]] = []
    for top, bottom in spans:
        if merged and top <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], bottom)
        else:
            merged.append([top, bottom])
    bands: list[tuple[float, float, bool]] = []  # (top, bottom, spans the full width)
    cursor = float("-inf")
    for top, bottom in merged:
        bands.append((cursor, top, False))
        bands.append((top, bottom, True))
        cursor = bottom
    bands.append((cursor, float("inf"), False))

    parts: list[str] = []
    for top, bottom, full in bands:
        boxes = [(float("-inf"), float("inf"))] if full else columns
        for x0, x1 in boxes:
            text = _region_text(chars, top, bottom, x0, x1)
            if text.strip():
                parts.append(text)
    return "\n".join(parts)


def _region_text(chars: list[dict[str, Any]], top: float, bottom: float, x0: float, x1: float) -> str:
    def inside(ch: dict[str, Any]) -> bool:
        mid_y = (float(ch["top"]) + float(ch["bottom"])) / 2
        mid_x = (float(ch["x0"]) + float(ch["x1"])) / 2
        return top <= mid_y < bottom and x0 <= mid_x < x1

    return _chars_text([ch for ch in chars if inside(ch)])


# Guards against hostile PDFs. A page's content streams (and the form XObjects and fonts it uses) are
# decompressed in memory by pdfminer: a few-KB "PDF bomb" can expand to gigabytes, so the expanded size is
# checked first, with a bounded decompression. The page limit bounds the work on one file. Both are
# keyword arguments of load_pdf; the defaults are far above real documents (a dense page is 10-500 KB).
MAX_PAGES = 20_000
MAX_PAGE_STREAM_MB = 64.0
_MAX_RESOURCE_DEPTH = 8  # form XObjects inside form XObjects ...


def load_pdf(
    path: Path, *, max_pages: int = MAX_PAGES, max_page_stream_mb: float = MAX_PAGE_STREAM_MB
) -> list[Document]:
    """One Document per page that has text, metadata {"source": str(path), "page": 1-based int}.

    Encrypted, damaged, truncated, empty, page-less and text-less (scanned) PDFs raise LoadError, and so
    do PDFs of more than ``max_pages`` pages or with a page whose streams expand to more than
    ``max_page_stream_mb`` MB (a decompression bomb).
    """
    path = Path(path)
    with open_regular(path) as fh:  # a FIFO or a device fails here at once instead of blocking the ingest
        header_error = _pdf_header_error(path, fh)
        if header_error is not None:
            raise header_error
        try:
            fh.seek(0)
        except OSError as err:
            raise os_error(path, err) from err
        return _read_pdf(path, fh, max_pages, int(max_page_stream_mb * 2**20))


def _read_pdf(path: Path, fh: BufferedReader, max_pages: int, max_page_bytes: int) -> list[Document]:
    try:
        pdf = pdfplumber.open(fh)  # the file already checked and opened: no second open by name
    except (PdfminerException, MalformedPDFException, PSException) as err:
        raise _pdf_error(path, err) from err
    except OSError as err:
        raise os_error(path, err) from err
    pages: list[Page] | None = None
    try:
        pages = pdf.pages
        return _pdf_documents(path, pages, max_pages, max_page_bytes)
    except LoadError:
        raise
    except (PdfminerException, MalformedPDFException, PSException) as err:
        raise _pdf_error(path, err) from err
    except RecursionError as err:
        raise LoadError(path, "the PDF is malformed: its objects nest too deeply", "export it to PDF again") from err
    except Exception as err:
        # pdfminer raises plain KeyError/TypeError/ValueError/zlib.error... on damaged files; one bad
        # file must not stop an ingest, so it is reported like any other unreadable PDF.
        raise _pdf_error(path, err) from err
    finally:
        _close_pdf(pdf, pages_parsed=pages is not None)


def _close_pdf(pdf: pdfplumber.PDF, *, pages_parsed: bool) -> None:
    """Close without parsing again. pdfplumber's close() walks the page tree to close the pages: when that
    walk failed (a damaged tree) or was interrupted, it would fail (or loop) again and replace the LoadError
    being reported. Pages that were never parsed have nothing to close; load_pdf closes the file."""
    if pages_parsed:
        pdf.close()
    else:
        pdf.flush_cache()


def _expanded_size(stream: PDFStream, limit: int) -> int:
    """The decoded size of a stream, or more than ``limit`` if it is larger. FlateDecode is expanded in
    1 MB steps and never past the limit; other filters barely expand and count at their encoded size."""
    if stream.data is not None:
        return len(stream.data)
    data = stream.rawdata or b""
    if stream.decipher is not None and stream.objid is not None and stream.genno is not None:
        data = stream.decipher(stream.objid, stream.genno, data, stream.attrs)
    filters = stream.get_filters()
    for n, (name, _params) in enumerate(filters):
        if name not in LITERALS_FLATE_DECODE:
            break
        keep = n + 1 < len(filters)  # the next filter needs this one's output; the last one's is only counted
        inflate, pending, parts, size = zlib.decompressobj(), data, [], 0
        try:
            while pending and size <= limit:
                part = inflate.decompress(pending, 1 << 20)
                size += len(part)
                pending = inflate.unconsumed_tail
                if keep:
                    parts.append(part)
                if not part:
                    break
        except zlib.error:
            return max(size, len(data))  # damaged: pdfminer repairs what it can, no larger than this
        if size > limit or not keep:
            return size
        data = b"".join(parts)
    return len(data)


def _page_streams(page: Page) -> Iterable[PDFStream]:
    """The streams pdfminer decodes to read a page's text: its contents, and the form XObjects and fonts
    (ToUnicode maps, embedded font programs) of its resources, recursively; each object once."""
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> Iterable[PDFStream]:
        obj = resolve1(obj)
        if isinstance(obj, PDFStream):
            if id(obj) in seen:
                return
            seen.add(id(obj))
            subtype = resolve1(obj.attrs.get("Subtype"))
            if getattr(subtype, "name", None) == "Image":
                return  # image data is not decoded to extract text
            yield obj
            if depth < _MAX_RESOURCE_DEPTH:
                yield from walk(obj.attrs.get("Resources"), depth + 1)
        elif isinstance(obj, dict) and depth < _MAX_RESOURCE_DEPTH:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            for key in ("Font", "XObject", "ToUnicode", "FontDescriptor", "FontFile", "FontFile2", "FontFile3"):
                if key in obj:
                    value = resolve1(obj[key])
                    values = value.values() if isinstance(value, dict) and key in ("Font", "XObject") else [value]
                    for item in values:
                        yield from walk(item, depth + 1)
            for key in ("DescendantFonts",):
                for item in resolve1(obj.get(key)) or []:
                    yield from walk(item, depth + 1)
        elif isinstance(obj, list) and depth < _MAX_RESOURCE_DEPTH:
            for item in obj:
                yield from walk(item, depth + 1)

    page_obj = page.page_obj
    yield from walk(page_obj.contents, 0)
    yield from walk(page_obj.resources, 0)


def _check_page_size(path: Path, page: Page, limit: int, sizes: dict[int, tuple[PDFStream, int]]) -> None:
    """LoadError when the streams of a page expand to more than ``limit`` bytes. ``sizes`` remembers the
    streams measured on earlier pages (fonts are shared), so each is decompressed here at most once."""
    total = 0
    for stream in _page_streams(page):
        if id(stream) not in sizes:
            sizes[id(stream)] = (stream, _expanded_size(stream, limit))  # the stream is kept: ids stay unique
        total += sizes[id(stream)][1]
        if total > limit:
            raise LoadError(
                path,
                f"page {page.page_number} expands to more than {limit / 2**20:g} MB of content (a decompression bomb?)",
                "check where the file comes from; if it is genuine, export it to PDF again",
            )


def _encrypted(pages: list[Page]) -> bool:
    return bool(pages) and getattr(pages[0].page_obj.doc, "encryption", None) is not None


def _pdf_documents(path: Path, pages: list[Page], max_pages: int, max_page_bytes: int) -> list[Document]:
    if not pages:
        raise LoadError(path, "the PDF has no pages", "export it to PDF again")
    if len(pages) > max_pages:
        raise LoadError(
            path, f"the PDF has {len(pages)} pages, more than the {max_pages} allowed", "split it into parts"
        )
    documents: list[Document] = []
    chars = 0
    scanned_look = False
    sizes: dict[int, tuple[PDFStream, int]] = {}
    unmapped = 0
    for page in pages:
        _check_page_size(path, page, max_page_bytes, sizes)
        text = _page_text(page)
        if "(cid:" in text:
            text, glyphs = _UNMAPPED_GLYPH.subn("", text)
            unmapped += glyphs
        chars += sum(1 for ch in text if not ch.isspace())
        scanned_look = scanned_look or _covered_by_image(page)
        if text.strip():
            documents.append(Document(page_content=text, metadata={"source": str(path), "page": page.page_number}))
        page.close()  # frees the page's parsed objects; long PDFs otherwise keep them all in memory
    if unmapped > chars:
        raise LoadError(
            path,
            f"{unmapped} of its {unmapped + chars} characters cannot be decoded: its fonts have no Unicode "
            "mapping" + (" (the PDF is encrypted)" if _encrypted(pages) else ""),
            "save an unencrypted copy (e.g. qpdf --decrypt in.pdf out.pdf), print it to a new PDF, or run OCR "
            "(ocrmypdf --force-ocr in.pdf out.pdf)",
        )
    if not documents:
        raise LoadError(
            path, f"no extractable text on any of its {len(pages)} page(s); it is probably scanned", _OCR_FIX
        )
    if scanned_look and chars < _SCANNED_MIN_CHARS_PER_PAGE * len(pages):
        raise LoadError(
            path,
            f"only {chars} characters of text on {len(pages)} page(s) covered by images; it is probably scanned",
            _OCR_FIX,
        )
    return documents
