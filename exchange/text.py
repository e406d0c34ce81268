"""Which text carbonx takes in: one rule for the API's request fields and for the exchange's own
checks made before anything changes (an offset validates its beneficiary before it buys).

Refused: control characters (Unicode category Cc: NUL, which PostgreSQL cannot store, tabs, line
breaks, C1 controls), the line and paragraph separators U+2028 and U+2029 (line breaks too, which
a one-line field such as a beneficiary must not hold), and every bidirectional formatting
character (Bidi_Control: the marks U+061C, U+200E and U+200F, the embeddings and overrides, the
isolates), which make text display in another order than it is stored (a certificate's
beneficiary could read as someone else's).
"""

from __future__ import annotations

import re
import unicodedata

UNSAFE_RANGES = (r"\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069")  # regex class
UNSAFE_DESCRIPTION = ("control characters (such as NUL, a tab or a line break), line or paragraph separators "
                      "(U+2028, U+2029) or bidirectional formatting characters (U+061C, U+200E, U+200F, "
                      "U+202A-U+202E, U+2066-U+2069)")
UNSAFE_TEXT = re.compile(f"[{UNSAFE_RANGES}]")


def unsafe(text: str) -> str | None:
    """Why `text` breaks the rule ("must not contain ...: U+202E at position 3"), or None."""
    m = UNSAFE_TEXT.search(text)
    if m is None:
        return None
    return f"must not contain {UNSAFE_DESCRIPTION}: U+{ord(m[0]):04X} at position {m.start()}"


# Unicode's Default_Ignorable_Code_Point characters that are not format characters (Cf): Hangul
# fillers, variation selectors, the combining grapheme joiner, ... (DerivedCoreProperties.txt),
# and the braille blank, which shows as a space. Each alone shows nothing (review30).
_INVISIBLE = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\ufe00-\ufe0f\uffa0"
                        "\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")


def blank(text: str) -> bool:
    """Whether `text` shows nothing: only whitespace, invisible format characters (Unicode Cf: a
    zero-width space, a bidi mark), which str.strip() keeps, and the other characters Unicode
    says to show as nothing (a Hangul filler, a variation selector) or that show as a space (the
    braille blank): a certificate's beneficiary of one of them printed as blank."""
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" or _INVISIBLE.match(ch) for ch in text)


def fits(text: str | None, most: int) -> bool:
    """Whether `text` shows something and, without the whitespace around it, is at most `most`
    characters: the rule for a beneficiary (200) and a purpose (500), wherever it is checked."""
    return text is not None and not blank(text) and len(text.strip()) <= most
