"""Untrusted strings made safe for each place that shows them.

Class names, concept names, sample ids, edit reasons and data names come from files and LLMs. Each
renderer has its own hazard: terminals obey control characters (ANSI escapes, bidi overrides), spreadsheets
run cells that start with ``=``, matplotlib typesets ``$...$`` as math, Streamlit renders markdown, math, HTML-like
tags and ``:red[...]`` directives, and names decoded from file names
(``os.fsdecode``) may hold undecodable bytes that no UTF-8 file, page or font can take. One function per
renderer, here, so every caller escapes the same way.
"""

from __future__ import annotations

import logging
import re
from typing import Any

# One definition of the control characters, in the package at the bottom of the dependency order (concepts
# imports nothing from cbm): ``without_controls`` removes them and whole ANSI sequences, for names that are kept.
from concepts.text import CONTROL_CHARACTERS, without_controls

__all__ = ["CONTROL_CHARACTERS", "FORMULA_STARTS", "TerminalLogFormatter", "for_csv", "for_markdown",
           "for_matplotlib", "for_terminal", "for_utf8", "without_controls"]

#: Spreadsheet applications evaluate a cell that starts with one of these as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

_SURROGATES = re.compile("[\ud800-\udfff]")


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


class TerminalLogFormatter(logging.Formatter):
    """Log records for a terminal: each line escaped as by :func:`for_terminal` (log messages quote file
    names and concept names); line breaks, as in tracebacks, are kept."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(map(for_terminal, super().format(record).split("\n")))


def for_csv(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: strings starting with a formula character get a
    leading apostrophe; other values pass unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def for_matplotlib(text: Any) -> str:
    """``text`` as matplotlib draws it literally: dollar signs escaped so no mathtext is parsed; control
    characters and undecodable bytes shown as escapes as in :func:`for_terminal` (no font draws them)."""
    return for_terminal(text).replace("$", r"\$")


#: What Streamlit's markdown (and its widget labels) could read as syntax: CommonMark's punctuation, ``$`` math,
#: ``:colour[...]``/``:emoji:`` directives, ``~`` strike-through, ``|`` tables and ``<...>`` tags or autolinks.
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&])")


def for_markdown(text: Any) -> str:
    """``text`` as Streamlit markdown (``st.markdown``, captions, widget labels) shows it literally: every
    markdown punctuation character backslash-escaped (so no emphasis, link, heading, quote, list, math, tag or
    colour directive forms, wherever it stands); control characters and line breaks shown as escapes as in
    :func:`for_terminal`, so the text stays on one line; leading spaces become no-break spaces (four spaces
    would start a code block)."""
    escaped = _MARKDOWN_PUNCTUATION.sub(r"\\\1", for_terminal(text))
    body = escaped.lstrip(" ")
    return "\u00a0" * (len(escaped) - len(body)) + body
