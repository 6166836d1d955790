"""Untrusted strings made safe for each place that shows them.

Class names, concept names, sample ids, edit reasons and data names come from files and LLMs. Each
renderer has its own hazard: terminals obey control characters (ANSI escapes, bidi overrides), spreadsheets
run cells that start with ``=``, matplotlib typesets ``$...$`` as math, and names decoded from file names
(``os.fsdecode``) may hold undecodable bytes that no UTF-8 file, page or font can take. One function per
renderer, here, so every caller escapes the same way.
"""

from __future__ import annotations

import re
from typing import Any

#: C0/C1 controls, zero-width characters, bidi embeddings/overrides/isolates and the byte-order mark.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")

#: Spreadsheet applications evaluate a cell that starts with one of these as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

_SURROGATES = re.compile("[\ud800-\udfff]")


def without_controls(text: str) -> str:
    """``text`` with every control, zero-width and bidi character removed (for names that are kept)."""
    return CONTROL_CHARACTERS.sub("", text)


def for_utf8(text: Any) -> str:
    """``text`` as a string that encodes as UTF-8: the undecodable bytes of a file name decoded with
    ``surrogateescape`` are shown as ``\\xff`` escapes (other lone surrogates as ``\\udcff``), so a report
    or a terminal shows the name instead of failing to write it."""
    text = str(text)
    if not _SURROGATES.search(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte (e.g. from JSON "\ud800")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def for_terminal(text: Any) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``, ``\\u202e``) so a terminal prints them
    instead of obeying them; undecodable bytes as in :func:`for_utf8`."""
    return CONTROL_CHARACTERS.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"),
                                  for_utf8(text))


def for_csv(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: strings starting with a formula character get a
    leading apostrophe; other values pass unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def for_matplotlib(text: Any) -> str:
    """``text`` as matplotlib draws it literally: dollar signs escaped so no mathtext is parsed, and
    undecodable bytes as in :func:`for_utf8` (a font cannot draw a lone surrogate)."""
    return for_utf8(text).replace("$", r"\$")
