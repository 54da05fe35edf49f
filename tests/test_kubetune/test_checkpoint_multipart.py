"""A full fine-tune's checkpoint holds files of several GB (a float16 SDXL UNet is ~5 GB):
publishing one to S3 must stream it from disk in multipart parts, never hold it in memory.
Checked against the real SeaweedFS server with a file 20x the part size, in a fresh process
whose peak RSS growth is measured (the store's parts are read from the file as they go)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from s3server import S3Server

from kubetune.checkpoint.publish import CheckpointManager
from kubetune.storage import MiB, open_store

REPO = Path(__file__).resolve().parents[2]
BIG = 320 * MiB  # 20 parts of the S3 store's 16 MiB (any part size up to 160 MiB: 2+ parts)
PUBLISH = """
import json, resource, sys
from pathlib import Path
from kubetune.checkpoint.publish import CheckpointManager
from kubetune.storage import open_store
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
CheckpointManager(open_store(sys.argv[1]), None).save(7, Path(sys.argv[2]))
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"grown": grown}))
"""


def _folder(root: Path) -> Path:
    folder = root / "step"
    (folder / "unet").mkdir(parents=True)
    with open(folder / "unet" / "diffusion_pytorch_model.safetensors", "wb") as f:
        for i in range(BIG // MiB):  # distinct bytes per MiB: a part mix-up changes the hash
            f.write(bytes([i % 251]) * MiB)
    (folder / "unet" / "config.json").write_text("{}")
    return folder


@pytest.mark.slow
def test_a_file_of_20_parts_publishes_multipart_without_being_held_in_memory(
    s3_env: S3Server, s3_uri: str, tmp_path: Path
) -> None:
    folder = _folder(tmp_path)
    run = subprocess.run(
        [sys.executable, "-c", PUBLISH, s3_uri, str(folder)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    grown = json.loads(run.stdout.splitlines()[-1])["grown"]
    assert grown < BIG / 2, f"peak RSS grew {grown / MiB:.0f} MiB for a {BIG // MiB} MiB file"
    bucket, _, prefix = s3_uri.removeprefix("s3://").partition("/")
    key = f"{prefix}/checkpoints/step-000007/unet/diffusion_pytorch_model.safetensors"
    head = s3_env.client().head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == BIG
    parts = head["ETag"].strip('"').rpartition("-")[2]  # a multipart ETag ends in -<parts>
    assert parts.isdigit() and int(parts) >= 2, head["ETag"]
    manager = CheckpointManager(open_store(s3_uri), None)
    manager.restore(7, tmp_path / "back")  # sizes + sha256 against the manifest
    print(f"FIGURE multipart publish: {BIG // MiB} MiB file, peak RSS +{grown / MiB:.0f} MiB")
