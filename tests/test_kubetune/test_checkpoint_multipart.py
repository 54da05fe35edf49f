"""A full fine-tune's checkpoint holds files of several GB (a float16 SDXL UNet is ~5 GB):
publishing one to S3 must stream it from disk in multipart parts, never hold it in memory.
Checked against the real SeaweedFS server: in fresh processes, the peak RSS growth of
publishing a 160 MiB and a 480 MiB file is the same bounded amount (the parts in flight),
not proportional to the file; the object is multipart and restores with its sha256."""

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
SMALL, BIG = 160 * MiB, 480 * MiB  # 10 and 30 parts of the S3 store's 16 MiB
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
PUBLISH = """
import json, resource, sys
from pathlib import Path
from kubetune.checkpoint.publish import CheckpointManager
from kubetune.storage import open_store
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
CheckpointManager(open_store(sys.argv[1]), None).save(int(sys.argv[3]), Path(sys.argv[2]))
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"grown": grown}))
"""


def _folder(root: Path, size: int) -> Path:
    folder = root / f"step-{size}"
    (folder / "unet").mkdir(parents=True)
    with open(folder / WEIGHTS, "wb") as f:
        for i in range(size // MiB):  # distinct bytes per MiB: a part mix-up changes the hash
            f.write(bytes([i % 251]) * MiB)
    (folder / "unet" / "config.json").write_text("{}")
    return folder


def _publish(uri: str, folder: Path, step: int) -> int:
    """Peak RSS growth (bytes) of publishing ``folder`` as checkpoint ``step``."""
    run = subprocess.run(
        [sys.executable, "-c", PUBLISH, uri, str(folder), str(step)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return int(json.loads(run.stdout.splitlines()[-1])["grown"])


@pytest.mark.slow
def test_large_checkpoint_files_publish_multipart_without_being_held_in_memory(
    s3_env: S3Server, s3_uri: str, tmp_path: Path
) -> None:
    grown = {}
    for step, size in ((1, SMALL), (2, BIG)):
        folder = _folder(tmp_path, size)
        grown[size] = _publish(s3_uri, folder, step)
        (folder / WEIGHTS).unlink()  # disk: only one big file at a time
    assert grown[BIG] < BIG / 2, grown
    assert grown[BIG] - grown[SMALL] < 48 * MiB, grown  # 320 MiB more file, ~no more memory
    bucket, _, prefix = s3_uri.removeprefix("s3://").partition("/")
    key = f"{prefix}/checkpoints/step-000002/{WEIGHTS}"
    head = s3_env.client().head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == BIG
    parts = head["ETag"].strip('"').rpartition("-")[2]  # a multipart ETag ends in -<parts>
    assert parts.isdigit() and int(parts) >= 2, head["ETag"]
    CheckpointManager(open_store(s3_uri), None).restore(2, tmp_path / "back")  # sha256 checked
    print(f"FIGURE multipart publish: peak RSS +{grown[SMALL] / MiB:.0f} MiB for "
          f"{SMALL // MiB} MiB, +{grown[BIG] / MiB:.0f} MiB for {BIG // MiB} MiB")  # fmt: skip
