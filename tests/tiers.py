"""pytest plugin: the test tiers. ``pytest -m "not slow"`` is the fast tier (a few minutes);
the README's test command runs everything but the reliability and cluster tiers (pyproject's
addopts); ``-m reliability`` and ``-m cluster`` run those.

A command-line ``-m`` replaces the one in addopts, so ``-m "not slow"`` alone would pull the
reliability tier (20 SIGTERM runs, a store down for 30 s, every bad input as a subprocess)
and the cluster tier into the fast tier: they are marked slow here, whatever their file says.
"""

from __future__ import annotations

import pytest

SLOW_TIERS = ("reliability", "cluster")


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of the reliability or cluster tier is also ``slow``."""
    for item in items:
        if any(item.get_closest_marker(name) for name in SLOW_TIERS):
            item.add_marker(pytest.mark.slow)
