"""`python -m runner` keeps the log to its own lines: the advisory UserWarnings of the ML
libraries are filtered, huggingface_hub's included (diffusers passes it a deprecated
argument on every Hub download: "`local_dir_use_symlinks` ... is deprecated" showed in the
log of a newcomer's first run of an invoke-training sample config)."""

from __future__ import annotations

import os
import warnings

import pytest

from runner.__main__ import quiet_libraries


@pytest.mark.parametrize(
    "module", ["huggingface_hub.utils._validators", "diffusers.loaders", "transformers.x"]
)
def test_library_user_warnings_stay_out_of_the_log(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "environ", {**os.environ})  # its setdefaults stay in this test
    os.environ.pop("KUBETUNE_LOG_LEVEL", None)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn_explicit("advisory", UserWarning, "lib.py", 1, module=module)
        warnings.warn_explicit("ours", UserWarning, "run.py", 1, module="runner.session")
    assert [str(w.message) for w in shown] == ["ours"]
