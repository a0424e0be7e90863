"""Text files: decode the bytes of any encoding Chinese users have (UTF-8/16/32, GB18030/GBK, Big5, and the
Western code pages of English files) and load them as one Document."""

from __future__ import annotations

import codecs
import itertools
import logging
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import chardet
from langchain_core.documents import Document

from common.text import is_cjk
from knowledge.load_errors import LoadError, open_regular, os_error

__all__ = ["decode_bytes", "load_text"]

_log = logging.getLogger(__name__)

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
_MAX_STRAY_NUL_RATIO = 0.5  # NULs among text are dropped; a file that is mostly NULs is binary data

# Typographic punctuation that GBK and Big5 encode as double-byte characters: in a decode of Chinese text
# it is Chinese punctuation, though common.text (rightly, for PDFs and token counts) leaves it out.
_CHINESE_TYPOGRAPHY = frozenset("“”‘’…—·")


class _Decoded(NamedTuple):
    text: str
    encoding: str
    replaced: int  # invalid byte sequences put in as U+FFFD
    nuls: int  # NUL characters dropped from the text


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
    """What Chinese, Japanese or Korean text decodes to: common.text's CJK scripts plus the typographic
    punctuation and the enclosed/squared forms (㈠, ㎡) that the East Asian code pages encode."""
    return is_cjk(ch) or ch in _CHINESE_TYPOGRAPHY or "\u3200" <= ch <= "\u33ff"


def _is_common_han(ch: str) -> bool:
    # The URO only, not common.text's extensions: random byte pairs read as rare extension-A or
    # compatibility ideographs far more often than real text uses them.
    return "\u4e00" <= ch <= "\u9fff"


def _chinese_text_char(ch: str) -> bool:
    """What Chinese text in UTF-16 is made of: common ideographs, CJK and full-width punctuation, printable
    ASCII. Narrower than is_cjk on purpose: binary data read as UTF-16 gives characters from all over."""
    return (
        _is_common_han(ch)
        or "\u3000" <= ch <= "\u303f"
        or "\uff00" <= ch <= "\uffef"
        or " " < ch <= "~"
        or ch in _CHINESE_TYPOGRAPHY
    )


def _cjk_share(text: str) -> float:
    """Share of the visible characters that are East Asian."""
    visible = [ch for ch in text if not ch.isspace()]
    if not visible:
        return 0.0
    return sum(1 for ch in visible if _is_east_asian(ch)) / len(visible)


# Bytes of ASCII text, and NUL: ASCII with stray NULs read as UTF-16 gives code units of two of these.
_TEXT_BYTES = frozenset(range(0x20, 0x7F)) | {0x00, 0x09, 0x0A, 0x0D}


def _ascii_pair(ch: str) -> bool:
    """Whether a UTF-16 code unit is two bytes of ASCII text or NUL, in either order: "ab" read as U+6261
    扡, "c" and a NUL read big-endian as U+6300 挀."""
    code = ord(ch)
    return code <= 0xFFFF and code >> 8 in _TEXT_BYTES and code & 0xFF in _TEXT_BYTES


_MIN_MISREAD_UNITS = 4  # of pairs of ASCII bytes: real Chinese has a few such ideographs in a row (有: "g\t")
_MIN_MISREAD_SHARE = 0.95  # of the characters: ASCII text misread as UTF-16 is (nearly) nothing else
_MIN_MISREAD_VISIBLE = 0.2  # of the visible characters: a few … or • in English UTF-16 are just that


def _misread_ascii(text: str) -> bool:
    """True when a UTF-16 reading is ASCII text taken two bytes at a time (ASCII with stray NULs looks like
    UTF-16 to a NUL count). Then nearly every code unit is two ASCII bytes (or one and a NUL), and those
    that are not Latin are a good part of the text. Real Chinese fails that: about two thirds of its
    ideographs have a byte outside ASCII."""
    if not text:
        return False
    units = sum(1 for ch in text if _ascii_pair(ch))
    made = sum(1 for ch in text if ord(ch) > 0xFF and _ascii_pair(ch))
    visible = sum(1 for ch in text if not ch.isspace())
    return (
        made >= _MIN_MISREAD_UNITS
        and units >= _MIN_MISREAD_SHARE * len(text)
        and made >= _MIN_MISREAD_VISIBLE * visible
    )


def _plausible(text: str, codec: str) -> bool:
    """False for what a wrong codec makes of the bytes: controls, symbol soup, rAnDoM case."""
    if text and sum(
        1 for ch in text if ch not in _ALLOWED_CONTROLS and unicodedata.category(ch) == "Cc"
    ) > _MAX_CONTROL_RATIO * len(text):
        return False
    if codec.startswith("utf-16"):
        return not _misread_ascii(text)
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
        return sum(1 for ch in text if _is_common_han(ch) or "\u3000" <= ch <= "\u303f" or " " <= ch <= "~")

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


def _utf16_chinese(data: bytes) -> _Decoded | None:
    """The decode when the data is Chinese text in UTF-16 without a BOM, else None."""
    if len(data) < 2 * _MIN_UTF16_CHARS or len(data) % 2:
        return None
    for codec in _utf16_order(data, "utf-16-le"):
        text = _strict(data, codec)
        if text is None or not _plausible(text, codec):
            continue
        visible = [ch for ch in text if not ch.isspace()]
        han = sum(1 for ch in visible if _is_common_han(ch))
        texty = sum(1 for ch in visible if _chinese_text_char(ch))
        if visible and texty >= _MIN_UTF16_TEXT_SHARE * len(visible) and han >= _MIN_UTF16_HAN_SHARE * len(visible):
            return _Decoded(text, codec, 0, 0)
    return None


# Western text in a Windows code page: curly quotes, dashes and accented letters are single high bytes
# between ASCII ones. UTF-8 needs two to four high bytes in a row, and GBK/Big5 text mostly long runs.
_WESTERN_CODEPAGE = "cp1252"  # what Windows (and, by WHATWG's rule, browsers for "ISO-8859-1") writes
_HIGH_RUNS = re.compile(rb"[\x80-\xff]+")
_MIN_SINGLE_HIGH_SHARE = 0.6  # of the runs of high bytes: German "süß" has a few runs of two
_MAX_HIGH_RUN = 4
_MAX_FOREIGN_LETTER_SHARE = 0.3  # accented letters among the letters: French and German have 2-10 %
_MAX_WORD_LENGTH = 20  # characters per space-separated word, on average


def _western(data: bytes) -> _Decoded | None:
    """The cp1252 decode of English or Western European text, when nothing in the data is UTF-8 (lenient
    UTF-8 would replace every curly quote and dash with U+FFFD), else None."""
    runs = [len(run) for run in _HIGH_RUNS.findall(data)]
    if not runs or max(runs) > _MAX_HIGH_RUN or sum(1 for n in runs if n == 1) < _MIN_SINGLE_HIGH_SHARE * len(runs):
        return None
    if any(ord(ch) > 0x7F and ch != "\ufffd" for ch in data.decode("utf-8", errors="replace")):
        return None  # valid UTF-8 sequences in it: damaged UTF-8, not a code page
    text = _strict(data, _WESTERN_CODEPAGE)
    if text is None or not _plausible(text, _WESTERN_CODEPAGE):
        return None
    letters = [ch for ch in text if ch.isalpha()]
    if sum(1 for ch in letters if ord(ch) > 0x7F) > _MAX_FOREIGN_LETTER_SHARE * len(letters):
        return None
    words = text.split()
    if len(words) < 2 or len(text) > _MAX_WORD_LENGTH * len(words):
        return None  # prose has words between spaces; bytes of Chinese read as cp1252 have none
    return _Decoded(text, _WESTERN_CODEPAGE, 0, 0)


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


def _first_plausible(data: bytes, codecs: list[str]) -> _Decoded | None:
    """The first of ``codecs`` that decodes the data strictly into plausible text."""
    for codec in codecs:
        text = _strict(data, codec)
        if text is not None and _plausible(text, codec):
            return _Decoded(text, codec, 0, 0)
    return None


def _decode(data: bytes) -> _Decoded:
    """decode_bytes with the counts of replaced bytes and dropped NULs. A NUL is never text (it is what
    a crashed write, a padded record or a C string leaves), so NUL characters are dropped from any decode."""
    decoded = _detect(data)
    if "\x00" not in decoded.text:
        return decoded
    text = decoded.text.replace("\x00", "")
    return decoded._replace(text=text, nuls=decoded.nuls + len(decoded.text) - len(text))


def _detect(data: bytes) -> _Decoded:
    if not data:
        return _Decoded("", "utf-8", 0, 0)
    for bom, codec in _BOMS:
        if data.startswith(bom):
            text = _strict(data[len(bom) :], codec)
            if text is not None:
                return _Decoded(text, codec, 0, 0)
            break  # a BOM-like start on data that is not that encoding: detect normally
    text = _strict(data, "utf-8")
    if text is not None and _plausible(text, "utf-8"):
        return _Decoded(text, "utf-8", 0, 0)
    # Valid UTF-8 full of NULs is UTF-16 without a BOM, or binary, or text with NULs: all handled below.
    utf16 = _utf16_by_nuls(data)
    if utf16:
        text = _strict(data, utf16)
        if text is not None and _plausible(text, utf16):
            return _Decoded(text, utf16, 0, 0)

    guessed = _chardet_guess(data)
    trusted = bool(guessed) and (guessed[0] in _EAST_ASIAN_CODECS or guessed[0].startswith("utf"))
    fallbacks = [codec for codec in _CJK_FALLBACKS if codec not in guessed]

    # 1. chardet's guess when it names an East Asian or Unicode encoding.
    if trusted and (clean := _first_plausible(data, guessed)) is not None:
        return clean
    # 2. English or Western European text from Windows: a clean cp1252 decode, not UTF-8 with every curly
    # quote and dash replaced (under 1 % of a long text, which step 4 would accept as stray damage), nor
    # GB18030 (which reads a curly quote and the letter after it as one ideograph: "Don’t" -> "Don抰").
    western = _western(data)
    if western is not None:
        return western
    # 3. chardet reads short or damaged Chinese as a single-byte code page, which decodes anything;
    # gb18030/big5 reject most non-Chinese bytes, so a clean decode into Chinese comes first.
    for codec in fallbacks:
        text = _strict(data, codec)
        if text is not None and _plausible(text, codec) and _cjk_share(text) >= _MIN_CJK_SHARE:
            return _Decoded(text, codec, 0, 0)
    # 4. A few invalid bytes in otherwise good text: keep the text, mark the damage with U+FFFD.
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
                return _Decoded(text, codec, text.count("\ufffd"), 0)
            damaged = min(damaged or (ratio, codec, replaced, len(text)), (ratio, codec, replaced, len(text)))
    # 5. chardet's single-byte guess (Latin-1, Cyrillic, ...).
    if not trusted and (clean := _first_plausible(data, guessed)) is not None:
        return clean
    # 6. Chinese in UTF-16 without a BOM: few NULs (CJK code units have no zero byte), and chardet often
    # gives up on it. Only a strict decode that reads as Chinese text counts: what is left here, binary
    # data, fails it (lone surrogates, symbols from all over the BMP).
    chinese = _utf16_chinese(data)
    if chinese is not None:
        return chinese
    # 7. Text with stray NULs (every reading as UTF-16 failed above): the rest of the bytes, when it
    # decodes cleanly. The control-byte check first keeps binary data from a second, slow detection.
    nuls = data.count(0)
    if 0 < nuls <= _MAX_STRAY_NUL_RATIO * len(data):
        rest = data.replace(b"\x00", b"")
        if _control_bytes(rest) <= _MAX_CONTROL_RATIO * len(rest):
            try:
                decoded = _detect(rest)
            except ValueError:
                decoded = None
            if decoded is not None and not decoded.replaced:
                return decoded._replace(nuls=nuls)

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
    controls, nuls = _control_bytes(data), data.count(0)
    if controls == nuls:
        return f"looks like binary data, not text ({nuls} of its {len(data)} bytes are NUL)"
    return f"looks like binary data, not text ({controls} control bytes of {len(data)}, {nuls} of them NUL)"


def decode_bytes(data: bytes) -> tuple[str, str]:
    """Return (text, encoding name).

    Order: BOMs (utf-8-sig, utf-16 le/be, utf-32), strict UTF-8, UTF-16 without BOM when the NUL pattern
    says so and the result does not read as ASCII taken two bytes at a time, then chardet's guess
    (GB2312/GBK mapped to gb18030, Big5 widened to cp950/big5hkscs when needed), with gb18030 and big5 as
    fallbacks, then cp1252 for Western text that has no UTF-8 in it. Stray invalid bytes (< 1 % of the text)
    are replaced with U+FFFD. NULs are dropped: text with NULs between its characters is read without them.
    Raises ValueError with the reason for binary data or text that decodes only into junk.
    """
    decoded = _decode(data)
    return decoded.text, decoded.encoding


def load_text(path: Path) -> list[Document]:
    """TXT/MD: one Document for the file, page_content = decoded text (\\r\\n -> \\n), metadata
    {"source": str(path), "page": None, "encoding": <name>}. Empty or whitespace-only -> LoadError."""
    path = Path(path)
    with open_regular(path) as fh:
        try:
            data = fh.read()
        except OSError as err:
            raise os_error(path, err) from err
    try:
        decoded = _decode(data)
    except ValueError as err:
        raise LoadError(path, f"not a readable text file: {err}", "check the file, or save it as UTF-8 text") from err
    if decoded.replaced:
        _log.warning(
            "%s: %d invalid byte sequence(s) in %s text replaced with U+FFFD",
            path.name,
            decoded.replaced,
            decoded.encoding,
        )
    if decoded.nuls:
        _log.warning("%s: %d NUL byte(s) removed from the %s text", path.name, decoded.nuls, decoded.encoding)
    text = decoded.text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        what = "0 bytes" if not data else "only whitespace"
        raise LoadError(path, f"the file is empty ({what})", "remove it or replace it with the real content")
    return [Document(page_content=text, metadata={"source": str(path), "page": None, "encoding": decoded.encoding})]
