"""What a name may be: user ids, sources and the other ids callers choose.

One predicate for every place that takes such a name (a JWT's ``sub`` at the Gate, recipients,
sources and keys at the nodes, the sources of API key scopes in the config), so that a name
accepted in one place is accepted in all; and the syntax of those scopes. It imports nothing of
Pigeon: ``pigeon.auth``, ``pigeon.config`` and ``node.validate`` all use it.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "KEY_ID_PATTERN",
    "MAX_NAME_LENGTH",
    "REFUSED_CATEGORIES",
    "name_problem",
    "parse_source_scope",
]

MAX_NAME_LENGTH = 128
"""Longest user id, source or other caller-chosen id, in characters."""

REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp", "Zs"})
"""Unicode categories no name may contain: controls, format characters (zero-width and
direction marks), lone surrogates, line and paragraph separators, and spaces other than U+0020.

Each of them is invisible or looks like another character, so ``ali\\u200bce`` would be another
user who displays as ``alice``; controls and separators would also forge lines in logs.
"""


def name_problem(value: str) -> str | None:
    """Say what is wrong with the characters of a name, or ``None`` when there is nothing.

    A name may not contain a character of :data:`REFUSED_CATEGORIES` (the plain space U+0020
    excepted) nor start or end with a space. Emptiness and length are the caller's to check.

    Args:
        value: The name.

    Returns:
        A phrase such as ``"contains U+200B (a format character)"``, or ``None``.
    """
    if not value:
        return None
    # str.isprintable() is False for every refused character (and for unassigned and private-use
    # ones, which are allowed): the common case costs one pass in C.
    if not value.isprintable():
        for character in value:
            category = unicodedata.category(character)
            if category in REFUSED_CATEGORIES and character != " ":
                return (
                    f"contains U+{ord(character):04X} ({_KINDS[category]}, Unicode category "
                    f"{category})"
                )
    if value[0] == " " or value[-1] == " ":
        return "starts or ends with a space"
    return None


_KINDS = {
    "Cc": "a control character",
    "Cf": "an invisible format character",
    "Cs": "a lone surrogate",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Zs": "a space other than U+0020",
}


KEY_ID_PATTERN = re.compile(r"key-[0-9a-f]{8}")
"""The id ``pigeon.auth.ApiKeys`` derives from an API key: ``key-`` and 8 hex digits."""


def parse_source_scope(entry: str) -> tuple[str, frozenset[str]]:
    """Read one ``api_key_sources`` entry: ``KEYID=source1|source2``.

    Args:
        entry: The entry, e.g. ``key-1a2b3c4d=shop|billing``.

    Returns:
        The key id and the sources that key may publish as.

    Raises:
        ValueError: The entry is not of that form, or a source is not a valid name; the message
            says which.
    """
    key_id, equals, listed = entry.partition("=")
    key_id = key_id.strip()
    if not equals or not KEY_ID_PATTERN.fullmatch(key_id):
        # Nothing of the entry is repeated: it may be a key pasted in place of its id.
        raise ValueError(
            "an entry is not KEYID=source1|source2 with KEYID an API key's id (key- and 8 hex "
            "digits, as the services log it at start-up; never the key itself)"
        )
    sources = [source.strip() for source in listed.split("|")]
    for source in sources:
        if not source or len(source) > MAX_NAME_LENGTH:
            raise ValueError(
                f"{key_id}: each source must be 1 to {MAX_NAME_LENGTH} characters, got "
                f"{listed[:80]!r}"
            )
        problem = name_problem(source)
        if problem is not None:
            raise ValueError(f"{key_id}: source {source[:80]!r} {problem}")
    return key_id, frozenset(sources)
