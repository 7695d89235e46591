"""Answer normalisation and tokenisation of the `strict` profile (docs/metrics.md).

Normalisation: Unicode NFKC, lower case, thousands separators dropped ("1,000" -> "1000"),
every other punctuation mark a space (a decimal point between digits is kept), the
articles a/an/the dropped, number words zero..twenty written as digits, spaces collapsed.
Tokens: whitespace-separated words, except that each CJK character is a token of its own
(Chinese answers carry no spaces).
"""

from __future__ import annotations

import re
import unicodedata

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_CJK = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af])")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = _THOUSANDS.sub("", text)
    text = _DECIMAL.sub("\x00", text)  # protect decimal points from the punctuation pass
    text = "".join(
        " " if unicodedata.category(c).startswith(("P", "S")) else c for c in text
    ).replace("\x00", ".")
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def tokens(normalized: str) -> list[str]:
    """Words of an already normalised text; CJK characters are single tokens."""
    return _CJK.sub(r" \1 ", normalized).split()
