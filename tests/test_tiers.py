"""The fast tier (``pytest -m "not slow"``) leaves out the reliability and cluster tiers
(tests/tiers.py); ``-m reliability`` / ``-m cluster`` select them as before (the hook only adds
the ``slow`` mark)."""

from __future__ import annotations

import pytest

SAMPLE = """
import pytest

pytestmark = pytest.mark.cluster

def test_quick_cluster_file():
    pass
"""
SAMPLE_2 = """
import pytest

def test_quick():
    pass

@pytest.mark.reliability
def test_long_reliability_run():
    pass

@pytest.mark.slow
def test_slow():
    pass
"""


def _selected(pytester: pytest.Pytester, *args: str) -> set[str]:
    pytester.makepyfile(test_cluster_sample=SAMPLE, test_sample=SAMPLE_2)
    args = ("-p", "tiers", "-p", "no:cacheprovider", "--collect-only", "-q", *args)
    result = pytester.runpytest_inprocess(*args)
    return {line.split("::")[-1] for line in result.outlines if "::" in line}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")
def test_not_slow_leaves_out_the_reliability_and_cluster_tiers(pytester: pytest.Pytester) -> None:
    assert _selected(pytester, "-m", "not slow") == {"test_quick"}
