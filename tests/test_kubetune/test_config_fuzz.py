"""Fuzz the config loader: whatever the input, the user gets a ConfigError or a config,
never a traceback. CI runs a fast pass; `pytest -m reliability` runs it for 2 minutes."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.config import PipelineConfig, parse_config
from kubetune.errors import ConfigError

SAMPLES = sorted((Path(__file__).parents[1] / "data" / "invoke_samples").glob("*.yaml"))
BASES = [yaml.safe_load(p.read_text()) for p in SAMPLES]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    return out


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict:
    """A real sample config with a few fields replaced, deleted or added at random."""
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths)) if paths else ("type",)
        parent = data
        for key in path[:-1]:
            parent = parent[key] if isinstance(parent, dict) else {}
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            parent.pop(path[-1], None)
        else:
            parent[draw(st.text(min_size=1, max_size=12))] = draw(values)
    return data


def _check(text: str) -> None:
    try:
        cfg = parse_config(text, name="fuzz.yaml")
    except ConfigError as err:
        assert err.problems and all(p.startswith("fuzz.yaml:") for p in err.problems)
        assert all("\n" not in p for p in err.problems)
        return
    assert isinstance(cfg, PipelineConfig)


FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@FAST
@given(mutated_configs())
def test_mutated_configs_never_traceback(data: dict) -> None:
    _check(yaml.safe_dump(data, allow_unicode=True))


@FAST
@given(st.text(max_size=300))
def test_arbitrary_text_never_tracebacks(text: str) -> None:
    _check(text)


@pytest.mark.reliability
def test_fuzz_config_loader_for_two_minutes() -> None:
    """The long run the reliability suite asks for: 2 minutes of mutations and raw text."""
    budget = float(os.environ.get("KUBETUNE_FUZZ_SECONDS", "120"))
    deadline = time.monotonic() + budget
    runs = 0
    long = settings(
        max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    while time.monotonic() < deadline:
        given(mutated_configs())(long(lambda data: _check(yaml.safe_dump(data))))()
        given(st.text(max_size=400))(long(lambda text: _check(text)))()
        runs += 1000
    print(f"config fuzz: {runs} inputs in {budget:.0f} s, 0 tracebacks")
