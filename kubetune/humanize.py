"""Numbers as people read them: a count with its noun (``1 file``, ``2 files``). The
launcher and the runner both print through it, so no message reads ``1 files``."""

from __future__ import annotations

_VOWELS = "aeiou"


def plural(noun: str) -> str:
    """``file`` -> ``files``, ``process`` -> ``processes``, ``entry`` -> ``entries``."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and len(noun) > 1 and noun[-2] not in _VOWELS:
        return noun[:-1] + "ies"
    return noun + "s"


def count(n: int, noun: str, plural_form: str | None = None) -> str:
    """``1 file`` / ``0 files`` / ``2 files``; ``plural_form`` for an irregular noun."""
    return f"{n} {noun if n == 1 else plural_form or plural(noun)}"
