"""Concept text hygiene: validation, cleaning and plural merging, with no downloaded data.

``without_controls`` removes control, zero-width and bidi characters (ANSI escapes, overrides, NUL)
that an LLM or a file can put in a phrase. ``cbm.untrusted`` re-exports it: this package imports
nothing from ``cbm``, so the one definition lives here.

``clean_concept`` removes those characters, lowercases, trims punctuation and collapses whitespace,
and removes ONE leading article ("a", "an", "the") only when it is a whole word at the start:
"a pizza box" becomes "pizza box" and "pizza box" stays "pizza box" (a substring replace would give
"pizzbox").

``singular`` turns an English plural noun into its singular with a handful of suffix rules and an
exception list; ``merge_plurals`` uses it only to group phrases whose last words differ by
number ("red stripes" and "red stripe"), so words that merely end in "s" ("glass", "bus") are
never rewritten unless their singular form is also present.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

ARTICLES = ("a", "an", "the")
#: C0/C1 controls, zero-width characters, bidi embeddings/overrides/isolates and the byte-order mark.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
#: Whole terminal escape sequences (CSI such as colours ``ESC[31m``, OSC such as hyperlinks ``ESC]8;;URL ESC\\``,
#: two-character escapes), so that removing them leaves no ``[31m`` behind.
ANSI_SEQUENCES = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI
                            r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC, to BEL or ST
                            r"|\x1b[@-Z\\-_]")  # two-character escapes

# Irregular plurals and words whose final "s" is not a plural marker.
IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth",
    "geese": "goose", "mice": "mouse", "lice": "louse", "oxen": "ox", "people": "person",
    "dice": "die", "leaves": "leaf", "wolves": "wolf", "knives": "knife", "wives": "wife",
    "lives": "life", "halves": "half", "shelves": "shelf", "calves": "calf", "hooves": "hoof",
    "loaves": "loaf", "thieves": "thief", "scarves": "scarf", "elves": "elf",
    "cacti": "cactus", "fungi": "fungus", "nuclei": "nucleus", "antennae": "antenna",
    "larvae": "larva", "vertebrae": "vertebra", "criteria": "criterion", "phenomena": "phenomenon",
    "indices": "index", "matrices": "matrix", "vertices": "vertex", "axes": "axis",
    "analyses": "analysis", "crises": "crisis", "theses": "thesis", "oases": "oasis",
    "buses": "bus", "gases": "gas", "lenses": "lens", "quizzes": "quiz",
    "potatoes": "potato", "tomatoes": "tomato", "heroes": "hero", "echoes": "echo",
    "volcanoes": "volcano", "mosquitoes": "mosquito", "torpedoes": "torpedo",
    "movies": "movie", "cookies": "cookie", "pies": "pie", "ties": "tie", "lies": "lie",
}
INVARIANT = {
    "sheep", "fish", "deer", "series", "species", "aircraft", "moose", "salmon", "trout", "bison",
    "news", "glasses", "scissors", "pants", "trousers", "shorts", "jeans", "binoculars", "pliers",
    "tongs", "clothes", "stairs", "goods", "headquarters", "means", "physics", "mathematics",
    "chess", "christmas", "texas", "grass", "glass", "gas", "bus", "lens", "cross", "dress", "moss", "boss", "class",
    "mass", "brass", "bass", "iris", "cactus", "octopus", "platypus", "hippopotamus", "virus",
    "bonus", "campus", "canvas", "atlas", "walrus", "lotus", "asparagus", "always", "this", "its",
    "his", "hers", "yes", "is", "was", "has", "does", "plus", "thus", "us", "famous", "various",
    "nervous", "gorgeous", "fabulous", "dangerous", "luminous", "previous", "obvious", "curious",
    "glorious", "tremendous", "numerous", "venomous", "poisonous", "carnivorous", "herbivorous",
    "enormous", "precious", "delicious", "spacious", "furious", "anxious", "generous",
}
_EDGE_PUNCTUATION = " \t\r\n.,;:!?\"'`()[]{}*_-•·–—"


def validate_concept(value: object) -> str:
    """Return ``value`` if it is a non-blank string, else raise a one-sentence error."""
    if not isinstance(value, str):
        raise TypeError(f"a concept must be a string, got {type(value).__name__} {value!r}.")
    if not value.strip():
        raise ValueError("a concept must not be blank.")
    return value


def without_controls(text: str) -> str:
    """``text`` with every terminal escape sequence and every control, zero-width and bidi character
    removed (for names that are kept)."""
    return CONTROL_CHARACTERS.sub("", ANSI_SEQUENCES.sub("", text))


def strip_article(text: str) -> str:
    """Remove one leading article when it is a whole word ("a pizza box" -> "pizza box")."""
    head, _, tail = text.partition(" ")
    if head in ARTICLES and tail.strip():
        return tail.strip()
    return text


def clean_concept(text: str) -> str:
    """Lowercase, normalise unicode and whitespace, remove control characters, trim edge punctuation and
    drop a leading article (the result is empty when nothing else is left)."""
    validate_concept(text)
    text = unicodedata.normalize("NFKC", text).lower()
    text = without_controls(re.sub(r"\s+", " ", text)).strip(_EDGE_PUNCTUATION)
    text = re.sub(r"\s+", " ", text)
    return strip_article(text)


def singular(word: str) -> str:
    """The singular of an English noun by simple rules and ``IRREGULAR_PLURALS`` (lowercase in)."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word in INVARIANT or len(word) <= 3 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zzes", "sses")):
        return word[:-2]
    return word[:-1]


def phrase_key(phrase: str) -> str:
    """Cleaned phrase with its last word singularised: phrases with equal keys differ only in number."""
    words = clean_concept(phrase).split(" ")
    words[-1] = singular(words[-1])
    return " ".join(words)


def merge_plurals(phrases: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Group phrases that differ only by the number of their last word.

    Returns the kept phrases (first-seen order; within a group the singular form when present,
    else the first seen) and a map ``merged phrase -> phrase kept in its place``.
    """
    groups: dict[str, list[str]] = {}
    for phrase in phrases:
        members = groups.setdefault(phrase_key(phrase), [])
        if phrase not in members:
            members.append(phrase)
    kept, merged = [], {}
    for key, members in groups.items():
        keeper = key if key in members else members[0]
        kept.append(keeper)
        merged.update({member: keeper for member in members if member != keeper})
    return kept, merged
