"""A base model folder on gs:// and az:// longer than one listing page downloads whole
(``runner.models.loading.download_prefix`` lists it, then fetches each object), on the
emulators paging at ``PAGE`` objects (the ``paged`` fixture of
tests/test_kubetune/test_storage_pages.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_storage_pages import PAGE, Paged, paged  # noqa: F401 - `paged` is the fixture

from kubetune.storage import open_store

pytestmark = pytest.mark.timeout(120)


def test_a_model_folder_longer_than_a_page_downloads_whole(paged: Paged, tmp_path: Path) -> None:  # noqa: F811
    from runner.models.loading import download_prefix

    files = {f"unet/shard-{i:03d}.bin": bytes([i]) * (i + 1) for i in range(PAGE + 3)}
    files["model_index.json"] = b"{}"
    paged.fill(files)
    dest = download_prefix(open_store(paged.uri), tmp_path / "cache")
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == files
    assert paged.pages() >= 2
