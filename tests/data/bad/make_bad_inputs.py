"""Write the bad-input corpus under ``tests/data/bad/inputs/`` (deterministic; committed).

Each case is a folder with ``case.yaml`` (what to run and what must happen) and, for data
cases, a small ``data/`` dataset. ``tests/reliability/test_bad_inputs.py`` runs every case
through the real entrypoints. Regenerate with ``python tests/data/bad/make_bad_inputs.py``;
the test checks the committed files still match this table.

case.yaml keys: ``entrypoint`` (runner | render | submit | submit-local), ``needs``
(s3 / kube), ``config`` (deep-merged over the base config), ``args``, ``env``, ``exit``,
``message`` (regex the one error line must match). Placeholders filled by the test:
``@CASE@`` (the case's copy in a temp dir), ``@OUT@`` (output root), ``@MODEL@`` (tiny SD
model dir), ``@BUCKET@`` (an existing bucket), ``@ENDPOINT@`` (the S3 server),
``@CLOSED@`` (an endpoint on a closed 127.0.0.1 port), ``@DATA@`` (where a case that
``needs`` ``s3-data`` finds its ``data/`` folder uploaded in ``@BUCKET@``).
"""

from __future__ import annotations

import shutil
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parent / "inputs"


def png(width: int = 16, height: int = 16, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A valid RGB PNG, written by hand (no Pillow needed to regenerate)."""
    row = b"\x00" + bytes(colour) * width
    return _png_chunks(width, height, zlib.compress(row * height, 9))


def bomb_png(side: int = 60000) -> bytes:
    """A 100-byte PNG whose header declares ``side`` x ``side`` pixels (a decompression bomb)."""
    return _png_chunks(side, side, zlib.compress(b"\x00" * 64, 9))


def _png_chunks(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))  # fmt: skip


GOOD = {"a.png": png(), "a.txt": b"a red square", "b.png": png(colour=(40, 40, 200)),
        "b.txt": b"a blue square"}  # fmt: skip
JSONL_GOOD = b'{"image": "a.png", "text": "a red square"}\n{"image": "b.png", "text": "blue"}\n'


def _dir(extra: dict[str, bytes], drop: tuple[str, ...] = ()) -> dict[str, bytes]:
    files = {k: v for k, v in GOOD.items() if k not in drop}
    return {**files, **extra}


def _jsonl(lines: bytes, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    return {"a.png": GOOD["a.png"], "b.png": GOOD["b.png"], "data.jsonl": lines, **(extra or {})}


JSONL = {"data_loader": {"dataset": {"type": "IMAGE_CAPTION_JSONL_DATASET",
                                     "jsonl_path": "@CASE@/data/data.jsonl"}}}  # fmt: skip
TI_DIR = {"type": "SD_TEXTUAL_INVERSION", "placeholder_token": "<kbtn>",
          "initializer_token": "cat",
          "data_loader": {"type": "TEXTUAL_INVERSION_SD_DATA_LOADER", "caption_preset": "object",
                          "dataset": {"type": "IMAGE_DIR_DATASET",
                                      "dataset_dir": "@CASE@/data"}}}  # fmt: skip
S3_STORAGE = {"storage": {"endpoint_url": "@ENDPOINT@", "bucket": "@BUCKET@", "prefix": "bad",
                          "credentials_secret": {"name": "s3-credentials"}}}  # fmt: skip


def case(entrypoint: str, exit_code: int, message: str, *, files: dict[str, bytes] | None = None,
         config: dict[str, Any] | None = None, args: list[str] | None = None,
         env: dict[str, str] | None = None, needs: list[str] | None = None,
         about: str = "", midrun: bool = False) -> dict[str, Any]:  # fmt: skip
    """``midrun``: the problem shows only when the image is decoded, after header-only preflight
    (issue #17): the run stops with exit 2 naming it, having maybe published complete
    checkpoints of what it trained; nothing half-written."""
    spec = {"about": about, "entrypoint": entrypoint, "needs": needs or [], "args": args or [],
            "env": env or {}, "config": config or {}, "exit": exit_code, "message": message,
            "files": GOOD if files is None else files}  # fmt: skip
    if midrun:
        spec["midrun"] = True
    return spec


CASES: dict[str, dict[str, Any]] = {
    # --- datasets (python -m runner) ------------------------------------------------------
    "data-corrupt-image": case(
        "runner",
        2,
        r"b\.png: not a readable image",
        files=_dir({"b.png": b"this is not an image\n"}),
        about="garbage bytes with a .png name",
    ),
    "data-truncated-image": case(
        "runner",
        2,
        r"b\.png: cannot decode image",
        files=_dir({"b.png": png(64, 64)[:60]}),
        about="a PNG cut after its header (decodes only mid-run; validate --data finds it)",
        midrun=True,
    ),
    "data-zero-byte-image": case(
        "runner",
        2,
        r"b\.png: .*(empty|not a readable image)",
        files=_dir({"b.png": b""}),
        about="an empty image file",
    ),
    "data-decompression-bomb": case(
        "runner",
        2,
        r"b\.png: image is (too large|\d+x\d+)",
        files=_dir({"b.png": bomb_png()}),
        about="a 100-byte PNG declaring 60000x60000 pixels",
    ),
    "data-non-utf8-caption": case(
        "runner",
        2,
        r"b\.txt: caption is not valid UTF-8",
        files=_dir({"b.txt": b"caf\xe9 au lait"}),
        about="a Latin-1 caption file",
    ),
    "data-missing-caption": case(
        "runner", 2, r"b\.png: no caption file b\.txt", files=_dir({}, drop=("b.txt",))
    ),
    "data-empty-dataset": case(
        "runner",
        2,
        r"(no images|empty|no examples)",
        files={"README.md": b"no images here\n"},
        about="a dataset folder without images",
    ),
    "data-empty-ti-dataset": case(
        "runner",
        2,
        r"(no images|empty|no examples)",
        files={"notes.txt": b"nothing\n"},
        config=TI_DIR,
    ),
    "data-jsonl-not-json": case(
        "runner",
        2,
        r"data\.jsonl:2: ",
        files=_jsonl(b'{"image": "a.png", "text": "ok"}\nimage=b.png\n'),
        config=JSONL,
        about="line 2 is not JSON",
    ),
    "data-jsonl-missing-column": case(
        "runner",
        2,
        r"data\.jsonl:2: .*text",
        files=_jsonl(b'{"image": "a.png", "text": "ok"}\n{"image": "b.png", "caption": "x"}\n'),
        config=JSONL,
        about="line 2 has no `text` column",
    ),
    "data-jsonl-missing-image": case(
        "runner",
        2,
        r"gone\.png: file not found",
        files=_jsonl(JSONL_GOOD + b'{"image": "gone.png", "text": "x"}\n'),
        config=JSONL,
        about="a JSONL row naming a missing file",
    ),
    "data-jsonl-empty": case(
        "runner", 2, r"data\.jsonl.*(empty|no examples|no rows)", files=_jsonl(b""), config=JSONL
    ),
    "data-jsonl-not-object": case(
        "runner", 2, r"data\.jsonl:1: ", files=_jsonl(b'["a.png", "text"]\n'), config=JSONL
    ),
    "data-missing-dataset-dir": case(
        "runner",
        2,
        r"(dataset_dir|does-not-exist)",
        config={"data_loader": {"dataset": {"dataset_dir": "@CASE@/does-not-exist"}}},
    ),
    # --- storage and environment (python -m runner, SeaweedFS) -----------------------------
    "s3-missing-bucket": case(
        "runner",
        2,
        r"^storage\.bucket: bucket 'no-such-bucket-kt' does not exist .*point storage\.bucket at",
        config={**S3_STORAGE, "storage": {**S3_STORAGE["storage"], "bucket": "no-such-bucket-kt"}},
        needs=["s3"],
    ),
    "s3-wrong-credentials": case(
        "runner",
        2,
        r"access denied .*SignatureDoesNotMatch",
        config=S3_STORAGE,
        env={"AWS_SECRET_ACCESS_KEY": "@WRONG@"},
        needs=["s3"],
    ),
    "s3-read-only-credentials": case(
        "runner",
        2,
        r"access denied",
        config=S3_STORAGE,
        needs=["s3"],
        env={"AWS_ACCESS_KEY_ID": "@RO_KEY@", "AWS_SECRET_ACCESS_KEY": "@RO_SECRET@"},
        about="credentials that may read but not write",
    ),
    "s3-unreachable-endpoint": case(
        "runner",
        1,
        r"cannot reach the storage endpoint",
        config={**S3_STORAGE, "storage": {**S3_STORAGE["storage"], "endpoint_url": "@CLOSED@"}},
        needs=["s3"],
        about="127.0.0.1 on a closed port",
    ),
    "s3-dataset-key-dotdot": case(
        "runner",
        2,
        r"\.\.",
        config={
            **S3_STORAGE,
            "data_loader": {"dataset": {"dataset_dir": "s3://@BUCKET@/data/../../etc"}},
        },
        needs=["s3"],
        about="a dataset URI escaping its prefix",
    ),
    "s3-dataset-missing-bucket": case(
        "runner",
        2,
        r"no-such-data-bucket",
        config={
            **S3_STORAGE,
            "data_loader": {"dataset": {"dataset_dir": "s3://no-such-data-bucket/cats"}},
        },
        needs=["s3"],
    ),
    "s3-data-corrupt-image": case(
        "runner",
        2,
        r"b\.png: not a readable image",
        files=_jsonl(JSONL_GOOD, {"b.png": b"this is not an image\n"}),
        config={
            **S3_STORAGE,
            "data_loader": {
                "dataset": {
                    "type": "IMAGE_CAPTION_JSONL_DATASET",
                    "jsonl_path": "s3://@BUCKET@/@DATA@/data.jsonl",
                }
            },
        },
        needs=["s3", "s3-data"],
        about="a JSONL dataset on S3 with garbage bytes for one image (the run's output on S3)",
    ),
    "s3-no-credentials": case(
        "runner",
        2,
        r"^storage\.bucket: access denied .*no credentials set",
        config=S3_STORAGE,
        needs=["s3"],
        env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""},
    ),
    # --- the launcher (render / submit against the fake API server) ------------------------
    "launch-name-too-long": case(
        "render", 2, r"job\.name", args=["--name", "a" * 60], config=S3_STORAGE
    ),
    "launch-name-not-dns": case(
        "submit", 2, r"job\.name", args=["--name", "!!!___"], config=S3_STORAGE, needs=["kube"]
    ),
    "launch-name-too-long-submit": case(
        "submit", 2, r"job\.name", args=["--name", "x" * 70], config=S3_STORAGE, needs=["kube"]
    ),
    "launch-prefix-dotdot": case(
        "submit",
        2,
        r"storage\.prefix",
        config={**S3_STORAGE, "storage": {**S3_STORAGE["storage"], "prefix": "runs/../../x"}},
        needs=["kube"],
    ),
    "launch-no-storage": case(
        "submit", 2, r"storage", needs=["kube"], about="a cluster run without a storage section"
    ),
    "launch-missing-secret": case(
        "submit",
        2,
        r"Secret 'missing-creds' .*not found",
        config={
            **S3_STORAGE,
            "storage": {**S3_STORAGE["storage"], "credentials_secret": {"name": "missing-creds"}},
        },
        needs=["kube"],
    ),
    "launch-unreachable-api": case(
        "submit",
        1,
        r"cannot reach the Kubernetes API",
        config=S3_STORAGE,
        env={"KUBECONFIG": "@CLOSED_KUBECONFIG@"},
        needs=["kube"],
        about="kubeconfig pointing at a closed port",
    ),
    "launch-bad-override": case(
        "submit-local", 2, r"max_train_steps", args=["--set", "max_train_steps=lots"]
    ),
    "launch-local-literal-secret": case(
        "submit-local",
        2,
        r"storage",
        config={"storage": {"bucket": "kt", "secret_access_key": "@SECRET@"}},
    ),
    # --- submit --local checks the buckets before a run starts (SeaweedFS) -----------------
    "launch-local-missing-bucket": case(
        "submit-local",
        2,
        r"storage\.bucket: bucket 'no-such-bucket-kt' does not exist",
        config={**S3_STORAGE, "storage": {**S3_STORAGE["storage"], "bucket": "no-such-bucket-kt"}},
        needs=["s3"],
        about="submit --local: the output bucket does not exist",
    ),
    "launch-local-dataset-missing-bucket": case(
        "submit-local",
        2,
        r"data_loader\.dataset\.dataset_dir: bucket 'no-such-data-bucket' does not exist",
        config={
            **S3_STORAGE,
            "data_loader": {"dataset": {"dataset_dir": "s3://no-such-data-bucket/cats"}},
        },
        needs=["s3"],
        about="submit --local: the dataset's bucket does not exist",
    ),
    "launch-local-no-credentials": case(
        "submit-local",
        2,
        r"storage\.bucket: access denied .*no credentials set",
        config=S3_STORAGE,
        needs=["s3"],
        env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""},
        about="submit --local: no credentials in the environment",
    ),
}


def write(root: Path = ROOT) -> list[Path]:
    """(Re)write every case folder; returns the case folders."""
    shutil.rmtree(root, ignore_errors=True)
    out = []
    for name, spec in CASES.items():
        folder = root / name
        (folder / "data").mkdir(parents=True)
        meta = {k: v for k, v in spec.items() if k != "files"}
        text = f"# {spec['about'] or name}\n" + yaml.safe_dump(meta, sort_keys=False)
        (folder / "case.yaml").write_text(text)
        for rel, data in spec["files"].items():
            (folder / "data" / rel).write_bytes(data)
        if not spec["files"]:
            (folder / "data" / ".keep").write_bytes(b"")
        out.append(folder)
    return out


def snapshot(root: Path = ROOT) -> dict[str, bytes]:
    """Every file under ``root``: relative path → bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def build(io_root: Path) -> dict[str, bytes]:
    """The corpus this table would write, without touching the committed one."""
    write(io_root)
    return snapshot(io_root)


if __name__ == "__main__":
    folders = write(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    print(f"wrote {len(folders)} cases under {folders[0].parent}", file=sys.stderr)
