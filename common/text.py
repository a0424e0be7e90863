"""Text facts both knowledge/ and llms/ need: which characters are CJK, and token estimates."""

from __future__ import annotations

import re

# Scripts written without spaces between words: CJK ideographs (with extensions and compatibility forms),
# radicals, kana, bopomofo, CJK punctuation and full-width forms. A space between two of these in a PDF is
# an extraction artefact.
UNSPACED_RANGES = (
    "\u2e80-\u2eff\u2f00-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff"
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003134f"
)
# CJK for counting: the above plus Hangul (spaced, but still about one token per syllable).
CJK_RANGES = UNSPACED_RANGES + "\uac00-\ud7af"
# Han ideographs only: what makes a question Chinese (kana or Hangul alone do not).
HAN_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"

_CJK = re.compile(f"[{CJK_RANGES}]")
_HAN = re.compile(f"[{HAN_RANGES}]")


def is_cjk(ch: str) -> bool:
    """Whether one character belongs to a CJK script, punctuation or full-width form."""
    return bool(_CJK.match(ch))


def has_han(text: str) -> bool:
    """Whether the text holds any Han character (the question's language picks the prompt by this)."""
    return bool(_HAN.search(text))


def count_cjk(text: str) -> int:
    return len(_CJK.findall(text))


def estimate_tokens(text: str) -> int:
    """Tokens without a model's tokenizer: about one per CJK character, four characters per token
    otherwise; rounded up, so a budget in tokens is not overrun."""
    cjk = count_cjk(text)
    return cjk + (len(text) - cjk + 3) // 4
