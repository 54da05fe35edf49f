"""Listings longer than one page on gs:// and az://: the store's listing, datasets, checkpoint
listing (resume), pruning and pull, against the real emulators (fake-gcs-server, Azurite) in
pages of ``PAGE`` objects.

obstore asks for no page size, so each cloud's own decides: 1,000 keys on GCS's XML API and
S3 (SeaweedFS pages at 1,000 too: tests/test_kubetune/test_storage.py), 5,000 on Azure and
Azurite. Here the emulators page at ``PAGE`` through the translators of tests/list_pages.py
(fake layers: fake-gcs-server's XML listing never pages, so GCS's pages come from its JSON
API; Azurite is asked for ``maxresults``, so clients reach it with a SAS token): a few hundred
objects cross two page boundaries. Objects are put in place, and checked, with each
emulator's own client, independent of obstore."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from azurite import Azurite
from gcs_xml_proxy import GcsXmlProxy, Translator
from list_pages import AzureListPages, GcsListPages

from kubetune.checkpoint.publish import CheckpointManager
from kubetune.config.data import ImageCaptionJsonlDatasetConfig
from kubetune.dataset.folder_dataset import folder_source
from kubetune.dataset.jsonl_dataset import jsonl_source
from kubetune.storage import open_store
from launcher.outputs import pull

pytestmark = pytest.mark.timeout(120)

PAGE = 25
"""Objects per listing page asked of the emulators."""


@dataclass
class Paged:
    """A fresh store root on an emulator that lists in pages of ``PAGE``."""

    uri: str
    translator: Translator
    put: Callable[[str, bytes], None]
    """Put an object (key relative to ``uri``) with the emulator's own client."""
    names: Callable[[], list[str]]
    """Every key under ``uri`` (relative), listed by the emulator's own client."""

    def fill(self, objects: dict[str, bytes]) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: self.put(*item), objects.items()))

    def pages(self) -> int:
        """Listing pages asked of the emulator so far."""
        return self.translator.counts["list"]


def _gcs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paged]:
    gcs = request.getfixturevalue("gcs_env")
    bucket, root = gcs.create_bucket("pages"), f"t-{uuid.uuid4().hex[:8]}"
    translator = GcsListPages(gcs.endpoint, PAGE)

    def names() -> list[str]:
        query = urllib.parse.urlencode({"prefix": f"{root}/"})
        listed = json.loads(gcs._call("GET", f"/storage/v1/b/{bucket}/o?{query}"))
        return [item["name"][len(root) + 1 :] for item in listed.get("items", [])]

    with GcsXmlProxy(gcs.endpoint, translator) as proxy:
        monkeypatch.setenv("GOOGLE_BASE_URL", proxy.endpoint)
        yield Paged(f"gs://{bucket}/{root}", translator,
                    lambda key, data: gcs.upload(bucket, f"{root}/{key}", data), names)  # fmt: skip


def _azure(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paged]:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas
    from azurite import ACCOUNT, ACCOUNT_KEY

    azurite = request.getfixturevalue("azurite")
    container, root = request.getfixturevalue("az_container"), f"t-{uuid.uuid4().hex[:8]}"
    client = azurite.service().get_container_client(container)
    translator = AzureListPages(azurite.endpoint, PAGE)
    allowed = ContainerSasPermissions(read=True, write=True, delete=True, list=True, add=True)
    expiry = datetime.now(timezone.utc) + timedelta(hours=1)
    sas = generate_container_sas(ACCOUNT, container, ACCOUNT_KEY, permission=allowed, expiry=expiry)

    def names() -> list[str]:
        return [b.name[len(root) + 1 :] for b in client.list_blobs(name_starts_with=f"{root}/")]

    with GcsXmlProxy(azurite.endpoint, translator) as proxy:
        monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_KEY", raising=False)
        monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
        monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", sas)
        monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", f"{proxy.endpoint}/{ACCOUNT}")
        yield Paged(f"az://{container}/{root}", translator,
                    lambda key, data: client.upload_blob(f"{root}/{key}", data), names)  # fmt: skip


@pytest.fixture(params=["gs", "az"])
def paged(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paged]:
    yield from (_gcs if request.param == "gs" else _azure)(request, monkeypatch)


def test_a_listing_is_whole_and_fetched_a_page_at_a_time(paged: Paged) -> None:
    """2.5 pages of keys under ``many/``, beside keys before and after it: every key once,
    in order, with its size; a page asked for only when the iterator reaches it."""
    many = {f"many/img-{i:04d}.jpg": b"x" * (i % 7) for i in range(2 * PAGE + PAGE // 2)}
    paged.fill({**many, "a-first.txt": b"a", "many-not/x.jpg": b"n", "z/last.jpg": b"z"})
    store = open_store(paged.uri, page_size=PAGE)
    before = paged.pages()
    listing = store.list("many/")
    first = next(listing)
    assert paged.pages() - before == 1
    listed = [first, *listing]
    assert paged.pages() - before == 3
    assert [(o.key, o.size) for o in listed] == [(k, len(v)) for k, v in many.items()]
    assert len(list(open_store(paged.uri).list())) == len(many) + 3


def test_a_folder_dataset_over_pages_pairs_every_caption(paged: Paged) -> None:
    """An image folder of 1.5 pages of images and their captions: every image listed with its
    caption, the last pairs on the third page."""
    images = [f"img-{i:04d}.png" for i in range(PAGE + PAGE // 2)]
    paged.fill({**{n: b"png" for n in images},
                **{n.replace(".png", ".txt"): n.encode() for n in images}})  # fmt: skip
    source = folder_source(paged.uri, None, False, captions=True)
    assert [r.image_key for r in source.records] == images
    assert [r.caption_key for r in source.records] == [n.replace(".png", ".txt") for n in images]
    assert paged.pages() >= 3


def test_a_jsonl_dataset_finds_images_on_every_page(paged: Paged) -> None:
    """A JSONL naming 2.5 pages of images, the last-listed first: every line's image found in
    the one listing of their folder, with its size (a key past the first page missing from it
    is a DataError)."""
    images = {f"images/img-{i:04d}.jpg": b"j" * (1 + i % 5) for i in range(2 * PAGE + PAGE // 2)}
    names = sorted(images, reverse=True)
    lines = [json.dumps({"image": n, "text": f"caption {n}"}) for n in names]
    paged.fill({**images, "data.jsonl": "\n".join(lines).encode()})
    cfg = ImageCaptionJsonlDatasetConfig(jsonl_path=f"{paged.uri}/data.jsonl")
    source = jsonl_source(cfg, None, need_captions=True, masks=False)
    assert [(r.image_key, r.size) for r in source.records] == [(n, len(images[n])) for n in names]


def _checkpoint(root: Path, step: int) -> Path:
    folder = root / f"local-{step}"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "lora.safetensors").write_bytes(step.to_bytes(4, "big") * 100)
    (folder / "optimizer.pt").write_bytes(b"state")
    return folder


def test_checkpoints_resume_prune_and_pull_across_pages(paged: Paged, tmp_path: Path) -> None:
    """Checkpoints 10 and 30 around an unfinished step 20 of 2.5 pages of objects: step 30's
    manifest is on the fourth page. Resume finds 30, pull fetches it, and pruning to one
    checkpoint deletes 10 and every object of 20, across pages."""
    manager = CheckpointManager(open_store(paged.uri), max_checkpoints=None)
    manager.save(10, _checkpoint(tmp_path, 10))
    paged.fill({f"checkpoints/step-000020/shard-{i:04d}.bin": b"s" for i in range(5 * PAGE // 2)})
    manager.save(30, _checkpoint(tmp_path, 30))
    manager.wait()

    fresh = CheckpointManager(open_store(paged.uri), max_checkpoints=1)
    assert fresh.list_complete() == [10, 30]
    restored = fresh.restore_newest_valid(tmp_path / "resume")
    assert restored is not None and restored.step == 30
    got = pull(open_store(paged.uri), tmp_path / "pulled", step=fresh.latest())
    assert got.step == 30
    assert (tmp_path / "pulled" / "unet" / "lora.safetensors").read_bytes() == (
        (30).to_bytes(4, "big") * 100
    )

    assert fresh.prune() == [10]
    left = paged.names()
    assert left and all(k.startswith("checkpoints/step-000030/") for k in left)
    assert fresh.list_complete() == [30]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_azurites_own_page_of_5000_is_crossed_without_a_proxy(az_env: Azurite) -> None:
    """No fake layer: 5,000 + 7 blobs (put concurrently with obstore itself, 20-50 s here) are
    two of Azurite's own pages (its client sees them), and the store lists every one. In a
    container of its own, deleted afterwards (one request) so later tests list a small one."""
    import asyncio

    import obstore
    from azurite import ACCOUNT, ACCOUNT_KEY

    container = az_env.create_container("pages")
    raw = obstore.store.AzureStore(container, account_name=ACCOUNT, account_key=ACCOUNT_KEY,
                                   endpoint=az_env.endpoint,
                                   client_options={"allow_http": True})  # fmt: skip
    keys = [f"run/img-{i:05d}.jpg" for i in range(5007)]

    async def fill() -> None:
        slots = asyncio.Semaphore(32)

        async def put(key: str) -> None:
            async with slots:
                await obstore.put_async(raw, key, b"j")

        await asyncio.gather(*(put(k) for k in keys))

    try:
        asyncio.run(fill())
        pages = az_env.service().get_container_client(container).list_blobs().by_page()
        assert [len(list(page)) for page in pages] == [5000, 7]
        assert [f"run/{o.key}" for o in open_store(f"az://{container}/run").list()] == keys
    finally:
        az_env.service().delete_container(container)
