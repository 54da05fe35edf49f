"""pytest plugin: tiny SD1.5 / SDXL / FLUX diffusers directories and a model cache holding
``builtin:tiny-sd``, built once per session.

Register with ``pytest_plugins = ["tests.fixtures_models"]`` (or ``"fixtures_models"`` when
``tests/`` is on ``sys.path``) in ``tests/conftest.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/transformers read it

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-initialised SD1.5-shaped diffusers directory (seed 0). Do not modify."""
    from runner.models.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-initialised SDXL-shaped diffusers directory (seed 0). Do not modify."""
    from runner.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-initialised FLUX.1-shaped diffusers directory (seed 0). Do not modify."""
    from runner.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sd_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache (``KUBETUNE_MODEL_CACHE``) holding ``builtin:tiny-sd``, built once here,
    not by each run nor by two ranks at once. Do not modify."""
    from runner.models.loading import builtin_model

    cache = tmp_path_factory.mktemp("models")
    builtin_model("tiny-sd", cache)
    return cache
