"""Numbers as people read them, one owner each: a count with its noun (``1 file``,
``2 files``) and a duration (``4s``, ``1m35s``, ``1h05m``). The launcher and the runner both
print through these, so no message reads ``1 files`` and an ETA reads the same in
``launcher status``, the UI, the run's log and its report."""

from __future__ import annotations

_VOWELS = "aeiou"
_HARD_CH = ("epoch", "stomach", "monarch")
"""Nouns whose `ch` sounds k: a plain `s` plural."""


def plural(noun: str) -> str:
    """``file`` -> ``files``, ``process`` -> ``processes``, ``entry`` -> ``entries``,
    ``batch`` -> ``batches`` but ``epoch`` -> ``epochs`` (a hard ch)."""
    if noun.endswith(_HARD_CH):
        return noun + "s"
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and len(noun) > 1 and noun[-2] not in _VOWELS:
        return noun[:-1] + "ies"
    return noun + "s"


def count(n: int, noun: str, plural_form: str | None = None) -> str:
    """``1 file`` / ``0 files`` / ``2 files``; ``plural_form`` for an irregular noun."""
    return f"{n} {noun if n == 1 else plural_form or plural(noun)}"


def duration(seconds: float) -> str:
    """``4s`` / ``1m35s`` / ``1h05m`` (whole seconds, rounded down; never negative)."""
    hours, rest = divmod(max(int(seconds), 0), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
