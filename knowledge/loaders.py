"""Turn files into raw (uncleaned) LangChain Documents: text files of any common Chinese encoding and PDFs.

Every problem with one file becomes a LoadError whose message is one line naming the file, so a bulk
ingest can report it and go on with the next file.
"""

from __future__ import annotations

import codecs
import itertools
import logging
import re
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import chardet
import pdfplumber
from langchain_core.documents import Document
from pdfminer.pdfdocument import PDFEncryptionError, PDFPasswordIncorrect
from pdfminer.pdfexceptions import PDFException
from pdfminer.pdfparser import PDFSyntaxError
from pdfminer.pdftypes import LITERALS_FLATE_DECODE, PDFStream, resolve1
from pdfminer.psexceptions import PSEOF, PSException
from pdfplumber.page import Page
from pdfplumber.utils.exceptions import MalformedPDFException, PdfminerException

__all__ = [
    "LoadError",
    "Loader",
    "LoaderRegistry",
    "builtin_loaders",
    "decode_bytes",
    "load_file",
    "load_pdf",
    "load_text",
]


class LoadError(Exception):
    """One bad file. str(err) is ONE line that names the file, says what is wrong and how to fix it,
    e.g. "encrypted.pdf: the PDF is password-protected; remove the password (e.g. qpdf --decrypt) and
    ingest again"."""

    def __init__(self, path: Path, reason: str, fix: str = "") -> None:
        # args carry the constructor arguments so the error pickles across process pools.
        super().__init__(path, reason, fix)
        self.path = Path(path)
        self.reason = _one_line(reason)
        self.fix = _one_line(fix)

    def __str__(self) -> str:
        message = f"{self.path.name}: {self.reason}"
        return f"{message}; {self.fix}" if self.fix else message


Loader = Callable[[Path], list[Document]]  # a loader returns RAW (uncleaned) pages


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_MAX_DETAIL = 160  # a parser's message can quote a whole damaged object: keep the reason readable


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------
# Text decoding

_BOMS: tuple[tuple[bytes, str], ...] = (
    # UTF-32 first: its little-endian BOM starts with the UTF-16 one.
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

# chardet names -> codec to decode with; later entries are supersets tried when the first fails.
_SUPERSETS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "gb2312": ("gb18030",),
        "gbk": ("gb18030",),
        "gb18030": ("gb18030",),
        "big5": ("big5", "cp950", "big5hkscs"),
        "cp950": ("cp950", "big5hkscs"),
        "big5hkscs": ("big5hkscs",),
        "shift_jis": ("shift_jis", "cp932"),
        "euc_kr": ("euc_kr", "cp949"),
    }
)
_EAST_ASIAN_CODECS = frozenset(
    {"gbk", "gb18030", "big5", "cp950", "big5hkscs", "shift_jis", "cp932", "euc_jp", "euc_kr", "cp949"}
)
# Chinese users' files that chardet misreads (short, or with a damaged byte) are nearly always these.
_CJK_FALLBACKS = ("gb18030", "big5", "cp950", "big5hkscs")
_MAX_REPLACED_RATIO = 0.01  # a stray bad byte is replaced with U+FFFD; more damage than 1 % is an error
# Damage is counted with the narrowest codec of a family: the wide ones (gb18030 above all) read many
# damaged byte pairs as rare characters instead of errors.
_NARROWEST: Mapping[str, str] = MappingProxyType(
    {"gb18030": "gbk", "cp950": "big5", "big5hkscs": "big5", "cp949": "euc_kr"}
)
_MIN_CJK_SHARE = 0.05  # a fallback Chinese decode must give some Chinese, not a few stray symbols
_MAX_CONTROL_RATIO = 0.01  # more control characters than this is binary data, not text
_ALLOWED_CONTROLS = frozenset("\t\n\r\f\v\x1b")


def _canonical(name: str) -> str:
    try:
        return codecs.lookup(name).name
    except LookupError:
        return name.lower()


def _strict(data: bytes, codec: str) -> str | None:
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return None


def _is_east_asian(ch: str) -> bool:
    return (
        "\u3000" <= ch <= "\u9fff"
        or "\uac00" <= ch <= "\ud7af"
        or "\uf900" <= ch <= "\ufaff"
        or "\uff00" <= ch <= "\uffef"
        or ch >= "\U00020000"
        or ch in "“”‘’…—·"
    )


def _cjk_share(text: str) -> float:
    """Share of the visible characters that are East Asian."""
    visible = [ch for ch in text if not ch.isspace()]
    if not visible:
        return 0.0
    return sum(1 for ch in visible if _is_east_asian(ch)) / len(visible)


def _plausible(text: str, codec: str) -> bool:
    """False for what a wrong codec makes of the bytes: controls, symbol soup, rAnDoM case."""
    if text and sum(
        1 for ch in text if ch not in _ALLOWED_CONTROLS and unicodedata.category(ch) == "Cc"
    ) > _MAX_CONTROL_RATIO * len(text):
        return False
    non_ascii = [ch for ch in text if ord(ch) > 0x7F and ch != "\ufffd"]
    if not non_ascii:
        return True
    if codec in _EAST_ASIAN_CODECS:
        return sum(1 for ch in non_ascii if _is_east_asian(ch)) >= 0.8 * len(non_ascii)
    if codec.startswith("utf"):
        return True
    # Single-byte code pages: real text is letters and punctuation, not symbols (box drawing, maths),
    # and its capitals rarely follow small letters.
    wordy = sum(1 for ch in non_ascii if unicodedata.category(ch)[0] in "LPZ")
    flips = sum(1 for a, b in itertools.pairwise(text) if a.islower() and b.isupper() and ord(b) > 0x7F)
    return wordy >= 0.7 * len(non_ascii) and flips <= 0.05 * len(non_ascii)


def _utf16_order(data: bytes, guessed: str) -> list[str]:
    """chardet tells UTF-16 from other encodings well but mixes up LE and BE: try the likelier first."""
    if not guessed.startswith("utf-16"):
        return [guessed]

    def score(codec: str) -> int:
        text = _strict(data, codec)
        if text is None:
            return -1
        # Common ideographs, CJK punctuation and printable ASCII are what real text is made of.
        return sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff" or "\u3000" <= ch <= "\u303f" or " " <= ch <= "~")

    return sorted(["utf-16-le", "utf-16-be"], key=score, reverse=True)


def _utf16_by_nuls(data: bytes) -> str | None:
    """UTF-16 without a BOM: mostly-ASCII text has NUL in every other byte, on one side only."""
    if len(data) < 4 or len(data) % 2:
        return None
    half = len(data) // 2
    even_nuls = data[0::2].count(0) / half
    odd_nuls = data[1::2].count(0) / half
    if odd_nuls >= 0.3 and even_nuls <= 0.05:
        return "utf-16-le"
    if even_nuls >= 0.3 and odd_nuls <= 0.05:
        return "utf-16-be"
    return None


_MIN_UTF16_TEXT_SHARE = 0.95  # of the visible characters: ideographs, CJK punctuation, full-width forms, ASCII
_MIN_UTF16_HAN_SHARE = 0.6  # of the visible characters: common ideographs (U+4E00-U+9FFF)
_MIN_UTF16_CHARS = 16  # shorter random data reads as a few ideographs too often


def _chinese_text_char(ch: str) -> bool:
    return (
        "\u4e00" <= ch <= "\u9fff"
        or "\u3000" <= ch <= "\u303f"
        or "\uff00" <= ch <= "\uffef"
        or " " < ch <= "~"
        or ch in "“”‘’…—·"
    )


def _utf16_chinese(data: bytes) -> tuple[str, str, int] | None:
    """(text, codec, 0) when the data is Chinese text in UTF-16 without a BOM, else None."""
    if len(data) < 2 * _MIN_UTF16_CHARS or len(data) % 2:
        return None
    for codec in _utf16_order(data, "utf-16-le"):
        text = _strict(data, codec)
        if text is None or not _plausible(text, codec):
            continue
        visible = [ch for ch in text if not ch.isspace()]
        han = sum(1 for ch in visible if "\u4e00" <= ch <= "\u9fff")
        texty = sum(1 for ch in visible if _chinese_text_char(ch))
        if visible and texty >= _MIN_UTF16_TEXT_SHARE * len(visible) and han >= _MIN_UTF16_HAN_SHARE * len(visible):
            return text, codec, 0
    return None


def _chardet_guess(data: bytes) -> list[str]:
    """Codecs for chardet's guess, the guess first, then its supersets (GB2312/GBK -> gb18030)."""
    # No confidence cut-off: chardet is often unsure but right about short GBK/Big5 text.
    encoding = chardet.detect(data).get("encoding")
    if not encoding:
        return []
    name = _canonical(encoding)
    if name.startswith("utf-16"):
        return _utf16_order(data, name)
    return list(_SUPERSETS.get(name, (name,)))


def _decode(data: bytes) -> tuple[str, str, int]:
    """decode_bytes plus the number of U+FFFD put in for invalid bytes."""
    if not data:
        return "", "utf-8", 0
    for bom, codec in _BOMS:
        if data.startswith(bom):
            text = _strict(data[len(bom) :], codec)
            if text is not None:
                return text, codec, 0
            break  # a BOM-like start on data that is not that encoding: detect normally
    text = _strict(data, "utf-8")
    if text is not None and _plausible(text, "utf-8"):
        return text, "utf-8", 0
    # Valid UTF-8 full of NULs is UTF-16 without a BOM, or binary: both handled below.
    utf16 = _utf16_by_nuls(data)
    if utf16:
        text = _strict(data, utf16)
        if text is not None and _plausible(text, utf16):
            return text, utf16, 0

    guessed = _chardet_guess(data)
    trusted = bool(guessed) and (guessed[0] in _EAST_ASIAN_CODECS or guessed[0].startswith("utf"))
    fallbacks = [codec for codec in _CJK_FALLBACKS if codec not in guessed]

    # 1. chardet's guess when it names an East Asian or Unicode encoding.
    for codec in guessed if trusted else []:
        text = _strict(data, codec)
        if text is not None and _plausible(text, codec):
            return text, codec, 0
    # 2. chardet reads short or damaged Chinese as a single-byte code page, which decodes anything;
    # gb18030/big5 reject most non-Chinese bytes, so a clean decode into Chinese comes first.
    for codec in fallbacks:
        text = _strict(data, codec)
        if text is not None and _plausible(text, codec) and _cjk_share(text) >= _MIN_CJK_SHARE:
            return text, codec, 0
    # 3. A few invalid bytes in otherwise good text: keep the text, mark the damage with U+FFFD.
    damaged: tuple[float, str, int, int] | None = None  # (ratio, codec, replaced, characters)
    lenient = ["utf-8", *(guessed if trusted else []), *fallbacks]
    # The narrow codec first: after a bad byte it gets back in step sooner (gb18030 accepts more byte
    # pairs, so it can read a long stretch of text shifted by one byte as valid nonsense).
    lenient = list(dict.fromkeys(c for codec in lenient for c in (_NARROWEST.get(codec, codec), codec)))
    for codec in lenient:
        text = data.decode(codec, errors="replace")
        replaced = text.count("\ufffd")
        if codec in _NARROWEST:
            replaced = max(replaced, data.decode(_NARROWEST[codec], errors="replace").count("\ufffd"))
        ratio = replaced / max(len(text), 1)
        if _plausible(text, codec) and (codec == "utf-8" or trusted or _cjk_share(text) >= _MIN_CJK_SHARE):
            if ratio < _MAX_REPLACED_RATIO:
                return text, codec, text.count("\ufffd")
            damaged = min(damaged or (ratio, codec, replaced, len(text)), (ratio, codec, replaced, len(text)))
    # 4. chardet's single-byte guess (Latin-1, Cyrillic, ...).
    for codec in [] if trusted else guessed:
        text = _strict(data, codec)
        if text is not None and _plausible(text, codec):
            return text, codec, 0
    # 5. Chinese in UTF-16 without a BOM: few NULs (CJK code units have no zero byte), and chardet often
    # gives up on it. Only a strict decode that reads as Chinese text counts: what is left here, binary
    # data, fails it (lone surrogates, symbols from all over the BMP).
    chinese = _utf16_chinese(data)
    if chinese is not None:
        return chinese

    if _control_bytes(data) > _MAX_CONTROL_RATIO * len(data):
        raise ValueError(_binary_reason(data))
    if damaged is not None and damaged[0] < 0.2:
        _, codec, replaced, length = damaged
        raise ValueError(
            f"looks like {codec} text but has {replaced} invalid byte sequence(s) in {length} characters "
            "(a damaged file?)"
        )
    raise ValueError(
        f"cannot tell the text encoding (chardet guessed {guessed[0] if guessed else 'nothing'}; "
        "it is not valid UTF-8, GB18030 or Big5 either)"
    )


def _control_bytes(data: bytes) -> int:
    # C0 controls and DEL never occur in text of any supported encoding except UTF-16/32.
    return sum(1 for b in data if b < 0x20 and b not in b"\t\n\r\f\v\x1b") + data.count(0x7F)


def _binary_reason(data: bytes) -> str:
    return (
        f"looks like binary data, not text ({_control_bytes(data)} control bytes of {len(data)}, "
        f"{data.count(0)} of them NUL)"
    )


def decode_bytes(data: bytes) -> tuple[str, str]:
    """Return (text, encoding name).

    Order: BOMs (utf-8-sig, utf-16 le/be, utf-32), strict UTF-8, UTF-16 without BOM when the NUL pattern
    says so, then chardet's guess (GB2312/GBK mapped to gb18030, Big5 widened to cp950/big5hkscs when
    needed), with gb18030 and big5 as fallbacks. Stray invalid bytes (< 1 % of the text) are replaced with
    U+FFFD. Raises ValueError with the reason for binary data or text that decodes only into junk.
    """
    text, encoding, _ = _decode(data)
    return text, encoding


def load_text(path: Path) -> list[Document]:
    """TXT/MD: one Document for the file, page_content = decoded text (\\r\\n -> \\n), metadata
    {"source": str(path), "page": None, "encoding": <name>}. Empty or whitespace-only -> LoadError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _os_error(path, err) from err
    try:
        text, encoding, replaced = _decode(data)
    except ValueError as err:
        raise LoadError(path, f"not a readable text file: {err}", "check the file, or save it as UTF-8 text") from err
    if replaced:
        logging.getLogger(__name__).warning(
            "%s: %d invalid byte sequence(s) in %s text replaced with U+FFFD", path.name, replaced, encoding
        )
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        what = "0 bytes" if not data else "only whitespace"
        raise LoadError(path, f"the file is empty ({what})", "remove it or replace it with the real content")
    return [Document(page_content=text, metadata={"source": str(path), "page": None, "encoding": encoding})]


# ---------------------------------------------------------------------------------------------------
# PDF

# Word gap tolerance relative to the font size: large spaced-out CJK headings get no spaces between
# characters, while 0.25 em still separates Latin words set without explicit space characters.
_X_TOLERANCE_RATIO = 0.25
_Y_TOLERANCE = 3
_SCANNED_MIN_CHARS_PER_PAGE = 20  # less text than this on pages covered by an image: a scan
_MAX_ROTATED_SHARE = 0.3  # rotated text under this share of a page is margin stamps and sidebars
_OCR_FIX = "run OCR on it first (e.g. ocrmypdf in.pdf out.pdf) and ingest the result"
# pdfminer writes a glyph it cannot map to Unicode as "(cid:123)": never text worth storing. Encrypted PDFs
# with CID fonts come out like this (pdfminer does not decrypt the strings that name the font's encoding).
_UNMAPPED_GLYPH = re.compile(r"\(cid:\d+\)")


def _pdf_header_error(path: Path) -> LoadError | None:
    try:
        with path.open("rb") as fh:
            head = fh.read(1024)
    except OSError as err:
        return _os_error(path, err)
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
    detail = f"{type(cause).__name__}: {_shorten(_one_line(str(cause)), _MAX_DETAIL)}".rstrip(": ")
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


def _page_text(page: Page) -> str:
    page = _text_area(page)
    if not page.chars:
        return ""
    words = page.extract_words(x_tolerance_ratio=_X_TOLERANCE_RATIO, y_tolerance=_Y_TOLERANCE)
    columns = _columns(words)
    if not columns:
        return str(page.extract_text(x_tolerance_ratio=_X_TOLERANCE_RATIO, y_tolerance=_Y_TOLERANCE))

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
            text = _region_text(page, top, bottom, x0, x1)
            if text.strip():
                parts.append(text)
    return "\n".join(parts)


def _region_text(page: Page, top: float, bottom: float, x0: float, x1: float) -> str:
    def inside(obj: dict[str, Any]) -> bool:
        if obj.get("object_type") != "char":
            return False
        mid_y = (float(obj["top"]) + float(obj["bottom"])) / 2
        mid_x = (float(obj["x0"]) + float(obj["x1"])) / 2
        return top <= mid_y < bottom and x0 <= mid_x < x1

    region = page.filter(inside)
    return str(region.extract_text(x_tolerance_ratio=_X_TOLERANCE_RATIO, y_tolerance=_Y_TOLERANCE))


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
    header_error = _pdf_header_error(path)
    if header_error is not None:
        raise header_error
    try:
        pdf = pdfplumber.open(path)
    except (PdfminerException, MalformedPDFException, PSException) as err:
        raise _pdf_error(path, err) from err
    except OSError as err:
        raise _os_error(path, err) from err
    pages: list[Page] | None = None
    try:
        pages = pdf.pages
        return _pdf_documents(path, pages, max_pages, int(max_page_stream_mb * 2**20))
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
    walk failed (a damaged tree) or was interrupted, it would fail (or loop) again, replace the LoadError
    being reported and leak the file handle. Pages that were never parsed have nothing to close."""
    if pages_parsed:
        pdf.close()
    else:
        pdf.flush_cache()
        if not pdf.stream_is_external:
            pdf.stream.close()


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


# ---------------------------------------------------------------------------------------------------
# Registry and dispatch


def _normalise_extension(extension: str) -> str:
    ext = extension.strip().lower()
    if not ext.startswith("."):
        ext = "." + ext
    if len(ext) < 2 or "/" in ext or "\\" in ext or any(ch.isspace() for ch in ext):
        raise ValueError(f"not a file extension: {extension!r}")
    return ext


class LoaderRegistry:
    """Map from lower-case file extension (with dot, e.g. ".pdf") to Loader. Plugins extend it; registering
    an extension again replaces its loader."""

    def __init__(self, loaders: Mapping[str, Loader] | None = None) -> None:
        self._loaders: dict[str, Loader] = {}
        for extension, loader in (loaders or {}).items():
            self.register(extension, loader)

    def register(self, extension: str, loader: Loader) -> None:
        """Register loader for extension; ".PDF", "pdf" and ".pdf" all mean ".pdf"."""
        self._loaders[_normalise_extension(extension)] = loader

    def loader_for(self, path: Path) -> Loader | None:
        suffix = Path(path).suffix.lower()
        return self._loaders.get(suffix) if suffix else None

    @property
    def extensions(self) -> frozenset[str]:
        return frozenset(self._loaders)


def builtin_loaders() -> dict[str, Loader]:
    return {".txt": load_text, ".md": load_text, ".pdf": load_pdf}


def _os_error(path: Path, err: OSError) -> LoadError:
    return LoadError(
        path,
        f"cannot read the file ({err.strerror or type(err).__name__})",
        "check that it exists and that you may read it",
    )


def _supported(extensions: Iterable[str]) -> str:
    return ", ".join(sorted(extensions)) or "none registered"


def load_file(path: Path, registry: LoaderRegistry) -> list[Document]:
    """Pick the loader by extension, check the file is non-empty and readable, run it."""
    path = Path(path)
    loader = registry.loader_for(path)
    if loader is None:
        kind = f"'{path.suffix}'" if path.suffix else "(no extension)"
        raise LoadError(
            path, f"unsupported file type {kind}", f"supported extensions: {_supported(registry.extensions)}"
        )
    try:
        if not path.is_file():
            raise LoadError(path, "not a regular file", "pass a file, not a folder or device")
        if path.stat().st_size == 0:
            raise LoadError(path, "the file is empty (0 bytes)", "remove it or replace it with a complete copy")
        with path.open("rb") as fh:
            fh.read(1)
        return loader(path)
    except OSError as err:
        raise _os_error(path, err) from err
