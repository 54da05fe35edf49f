"""Time to the first training batch and bytes read before it, for a JSONL dataset of real-size
photos on S3 (SeaweedFS on 127.0.0.1) with aspect-ratio buckets: 100 vs N images, cold (no
index stored with the run) and after a restart (the run's index present). Each measurement
is a fresh process, as a restarted pod is; pairs are interleaved; ratios from one run.

Two figures. *Time to first batch* (default): what the runner does with the data before step
1 — preflight (listing + header reads), buckets, the loader and its first batch — without
imports or model loading. *Time to first step* (`--full`): the issue's figure, a real
`python -m runner` process (tiny SD1.5 at 512 px, outputs on the same S3 server) from process
start until its log shows optimizer step 1 done; the process is then killed (a preempted pod),
so the *restart* is the same run started again. `--full` also measures a *later run*: a new
run name over the same data, which finds the index beside the runs.

`--plain` also measures each figure without aspect-ratio buckets (a large dataset then starts
training once listed, its header checks beside it: `DEFERRED_CHECKS_MIN_EXAMPLES`);
`--streaming` with the buckets in the streaming order (`aspect_ratio_buckets.order:
streaming`: a large dataset starts once listed and the first few hundred sizes are read).

`--synthetic N` replaces the photos by N small real JPEGs (64 distinct solid-colour images of
512-1024 px, ~2-4 KB each; only their headers are read before the first batch) to reach
100,000 images; each measurement then also reports the process's peak RSS (the index, the
records and the buckets of N images beside the imports).

    python benchmarks/make_photos.py /var/tmp/kubetune-photos --count 10000
    .venv/bin/python benchmarks/data_first_step.py /var/tmp/kubetune-photos --big 10000
    .venv/bin/python benchmarks/data_first_step.py /var/tmp/kubetune-photos --big 10000 --full
    .venv/bin/python benchmarks/data_first_step.py /var/tmp/kubetune-synth --synthetic 100000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

BUCKETS = {"target_resolution": 512, "start_dim": 256, "end_dim": 1024, "divisible_by": 64}
MODES = {"buckets": BUCKETS, "plain": None, "streaming": {**BUCKETS, "order": "streaming"}}
"""Each measured config's `aspect_ratio_buckets`: invoke-training's order, none (`--plain`),
the streaming order (`--streaming`)."""


def tag(mode: str) -> str:
    """How a mode is named in the figures ("" for invoke-training's bucket order)."""
    return "" if mode == "buckets" else f" {mode}"


def synthetic(folder: Path, n: int, templates: int = 64) -> None:
    """`folder/data.jsonl` naming `n` images, and `templates` small real JPEGs (solid colour,
    512-1024 px a side) in `folder/templates/` that stand in for them (see `image_bytes`)."""
    from PIL import Image

    (folder / "templates").mkdir(parents=True, exist_ok=True)
    for t in range(templates):
        size = (512 + 64 * (t % 9), 512 + 64 * ((t // 9) % 9))
        Image.new("RGB", size, (t * 4 % 256, 90, 160)).save(
            folder / "templates" / f"t-{t}.jpg", quality=40
        )
    rows = [json.dumps({"image": f"img-{i:06d}.jpg", "text": f"a photo number {i}"})
            for i in range(n)]  # fmt: skip
    (folder / "data.jsonl").write_text("\n".join(rows) + "\n")


def image_bytes(folder: Path, name: str) -> bytes:
    """A photo of `folder`, or for a synthetic dataset the template standing in for it."""
    path = folder / name
    if path.exists():
        return path.read_bytes()
    templates = sorted((folder / "templates").glob("t-*.jpg"))
    return templates[int(name[4:10]) % len(templates)].read_bytes()


def upload(server: Any, bucket: str, folder: Path, n: int) -> None:
    """The first `n` images of `folder` and a JSONL naming them, under `ds-<n>/` (through
    kubetune's own store: 100,000 PUTs take minutes through boto3 here)."""
    from kubetune.storage import open_store

    os.environ.update(server.env())
    rows = (folder / "data.jsonl").read_text().splitlines()[:n]
    names = [json.loads(r)["image"] for r in rows]
    store = open_store(f"s3://{bucket}/ds-{n}")
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda name: store.put_bytes(name, image_bytes(folder, name)), names))
    store.put_bytes("data.jsonl", "\n".join(rows).encode())


def sd_lora_config(bucket: str, n: int, mode: str, **fields: Any) -> dict[str, Any]:
    """An SD_LORA config over the `n`-image JSONL on S3 (`ds-<n>`): 512 px, batch 4
    (invoke-training's default), aspect-ratio buckets as `mode` says (`MODES`); `fields` add
    to it."""
    return {
        "type": "SD_LORA",
        "data_loader": {
            "type": "IMAGE_CAPTION_SD_DATA_LOADER",
            "dataset": {
                "type": "IMAGE_CAPTION_JSONL_DATASET",
                "jsonl_path": f"s3://{bucket}/ds-{n}/data.jsonl",
            },
            "resolution": 512,
            "aspect_ratio_buckets": MODES[mode],
        },
        "train_batch_size": 4,
        **fields,
    }


def preflight_config(bucket: str, n: int, run_dir: str, mode: str) -> Any:
    """The config the data-path measurements read (`sd_lora_config`): one step, in
    `run_dir`."""
    from kubetune.config import SdLoraConfig

    fields = {"base_output_dir": run_dir, "max_train_steps": 1, "save_every_n_steps": 1}
    return SdLoraConfig.model_validate(sd_lora_config(bucket, n, mode, **fields))


def measure(bucket: str, n: int, run_dir: str, mode: str = "buckets") -> dict[str, Any]:
    """One measurement, in this (fresh) process: seconds and bytes to the first batch. The
    preflight runs as a run starts it (`start_preflight`, in a thread here so that its reads
    are counted): without buckets a large dataset's header checks go on beside the batch."""
    from kubetune.dataset.index import save_index
    from kubetune.dataset.preflight import start_preflight
    from kubetune.storage import open_store
    from kubetune.storage.cloud import CloudStore
    from runner.data import build_train_dataloader

    read = {"bytes": 0, "gets": 0}
    lock = threading.Lock()
    get_bytes, get_range = CloudStore.get_bytes, CloudStore.get_range

    def count(data: bytes) -> bytes:
        with lock:
            read["bytes"] += len(data)
            read["gets"] += 1
        return data

    CloudStore.get_bytes = lambda s, k: count(get_bytes(s, k))  # type: ignore[method-assign]
    CloudStore.get_range = lambda s, k, a, b: count(get_range(s, k, a, b))  # type: ignore
    get_range_async = CloudStore.get_range_async

    async def counted_async(s: CloudStore, k: str, a: int, b: int) -> bytes:
        return count(await get_range_async(s, k, a, b))

    CloudStore.get_range_async = counted_async  # type: ignore[method-assign]
    cfg = preflight_config(bucket, n, run_dir, mode)
    start = time.perf_counter()
    run_store = open_store(run_dir)
    data = start_preflight(cfg, process=False)
    report = data.result()
    loader = build_train_dataloader(cfg, seed=0, batch_size=4, device_is_cuda=False, data=report)
    next(iter(loader))
    seconds = time.perf_counter() - start
    before = dict(read)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    checked = report.pending.result() if report.pending is not None else report
    save_index(run_store, checked)
    return {"n": n, "seconds": seconds, **before, "reused": checked.reused, "rss_mib": peak_mib}


def index_memory(bucket: str, n: int, run_dir: str, traced: bool) -> dict[str, Any]:
    """Memory of the dataset index alone, in a fresh process without torch: the process's
    RSS growth over the preflight and its peak RSS; ``traced``: Python allocations
    (tracemalloc, whose own books inflate the RSS) at their peak during the preflight
    (listing, records, header reads, index) and still held after it (records, index,
    sizes: what a run keeps)."""
    import tracemalloc

    from kubetune.dataset.index import save_index
    from kubetune.dataset.preflight import preflight
    from kubetune.storage import open_store

    cfg = preflight_config(bucket, n, run_dir, "buckets")
    run_store = open_store(run_dir)
    rss_before = _rss_mib()
    if traced:
        tracemalloc.start()
    report = preflight(cfg, run_store=run_store)
    held, peak = tracemalloc.get_traced_memory() if traced else (0, 0)
    tracemalloc.stop()
    rss_after = _rss_mib()
    save_index(run_store, report)
    mib = {"peak_mib": peak / 2**20, "held_mib": held / 2**20, "rss_peak_mib": _rss_mib("VmHWM")}
    return {"n": n, "reused": report.reused, "rss_growth_mib": rss_after - rss_before, **mib}


def _rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory(a: argparse.Namespace, bucket: str, env: dict[str, str], tmp: str) -> None:
    """`index_memory` cold (no index) then on a restart (the run's index), fresh processes."""
    for traced in (False, True):
        for phase in ("cold", "restart"):
            args = [bucket, a.big, f"{tmp}/mem-{int(traced)}", traced]
            row = in_fresh_process("index_memory", args, env)
            what = (f"Python allocations peak {row['peak_mib']:.0f} MiB, held after "
                    f"{row['held_mib']:.0f} MiB (tracemalloc)" if traced else
                    f"RSS +{row['rss_growth_mib']:.0f} MiB, peak {row['rss_peak_mib']:.0f} MiB "
                    "(no torch)")  # fmt: skip
            print(f"{a.big} {phase}: {what}; reused {row['reused']}", flush=True)


def one(bucket: str, n: int, run_dir: str, env: dict[str, str], mode: str) -> dict[str, Any]:
    """`measure` in a fresh process."""
    return in_fresh_process("measure", [bucket, n, run_dir, mode], env)


def in_fresh_process(function: str, args: list[Any], env: dict[str, str]) -> dict[str, Any]:
    """What `function(*args)` of this module returns, run in a fresh process (as a restarted
    pod starts) with `env` added to the environment."""
    code = (
        "import json, sys; sys.path[:0] = [sys.argv[1]]\n"
        "import data_first_step\n"
        "print(json.dumps(getattr(data_first_step, sys.argv[2])(*json.loads(sys.argv[3]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), function, json.dumps(args)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode:
        raise RuntimeError(f"{function}{tuple(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def runner_config(
    bucket: str, n: int, prefix: str, name: str, endpoint: str, mode: str = "buckets"
) -> dict[str, Any]:
    """A real run over `ds-<n>` (`sd_lora_config`): tiny SD1.5, 2 steps, outputs to
    s3://bucket/prefix."""
    return sd_lora_config(
        bucket,
        n,
        mode,
        seed=0,
        base_output_dir=f"runs/{name}",
        model="builtin:tiny-sd",
        hf_variant=None,
        weight_dtype="float32",
        mixed_precision="no",
        max_train_steps=2,
        save_every_n_steps=1000,
        log_every_n_steps=1,
        report_to=None,
        storage={"endpoint_url": endpoint, "bucket": bucket, "prefix": prefix},
    )


def first_step(cfg: dict[str, Any], env: dict[str, str], tmp: str) -> float:
    """Seconds from starting `python -m runner` to its "step 1/" log line; then SIGKILL."""
    path = Path(tmp) / f"{cfg['base_output_dir'].replace('/', '-')}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(cfg))
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", str(path)],
        cwd=ROOT,
        env={**os.environ, **env, "KUBETUNE_WORK_DIR": tmp + "/work"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    tail: list[str] = []
    try:
        for line in proc.stderr:  # bounded: the process ends, or the watchdog kills it
            tail = (tail + [line])[-40:]
            if "step 1/" in line:
                return time.perf_counter() - start
        raise RuntimeError("the run ended before step 1:\n" + "".join(tail))
    finally:
        proc.kill()
        proc.wait()


def full(a: argparse.Namespace, server: Any, bucket: str, tmp: str) -> None:
    """Time to first step: cold (fresh prefix), restart (same run), later run (new name)."""
    results: dict[str, list[float]] = {}
    stamp = time.strftime("%Y%m%d%H%M%S")
    watchdog = threading.Timer(3600, lambda: os._exit(3))
    watchdog.start()
    try:
        for r in range(a.rounds):
            for n, mode in variants(a):
                for phase, name in (("cold", "a"), ("restart", "a"), ("later run", "b")):
                    prefix = f"full-{stamp}-{n}{tag(mode).strip()}-{r}"  # fresh on a kept server
                    cfg = runner_config(bucket, n, prefix, f"run-{name}", server.endpoint, mode)
                    seconds = first_step(cfg, server.env(), tmp)
                    results.setdefault(f"{n}{tag(mode)} {phase}", []).append(seconds)
                    load = os.getloadavg()[0]
                    print(f"round {r}: {n}{tag(mode)} {phase}: {seconds:.2f} s (load {load:.1f})",
                          flush=True)  # fmt: skip
    finally:
        watchdog.cancel()
    base = statistics.median(results[f"{a.small} cold"])
    print(f"time to first step (python -m runner, median of {a.rounds}); 'plain': no buckets")
    for key, runs in results.items():
        med = statistics.median(runs)
        print(f"{key:>22}: {med:6.2f} s = {med / base:4.2f}x {a.small} cold; "
              f"runs {[round(x, 2) for x in runs]}")  # fmt: skip
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


def variants(a: argparse.Namespace) -> list[tuple[int, str]]:
    """(images, mode) pairs of one round: with buckets, and without them too (`--plain`),
    and in the streaming order too (`--streaming`)."""
    modes = ["buckets"] + ["plain"] * a.plain + ["streaming"] * a.streaming
    return [(n, mode) for mode in modes for n in (a.small, a.big)]


def serve(a: argparse.Namespace) -> tuple[Any, str]:
    """A SeaweedFS server and the benchmark's bucket: a fresh one, or with `--server-dir` the
    one whose data is kept there (uploads done by an earlier invocation are not repeated)."""
    from s3server import S3Server, find_weed, start_server

    if a.server_dir is None:
        server = start_server()
        return server, server.create_bucket("bench")
    a.server_dir.mkdir(parents=True, exist_ok=True)
    server = S3Server(weed=find_weed() or "weed", workdir=a.server_dir).start()
    if not (a.server_dir / "bucket").exists():
        server.client().create_bucket(Bucket="bench")
        (a.server_dir / "bucket").write_text("bench")
    return server, "bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="folder from make_photos.py")
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--big", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="time to first step of a real run")
    parser.add_argument("--server-dir", type=Path, default=None,
                        help="keep the data here; later runs skip uploads")  # fmt: skip
    parser.add_argument("--memory", action="store_true",
                        help="the index's memory for --big images (tracemalloc, RSS)")  # fmt: skip
    parser.add_argument("--plain", action="store_true",
                        help="also measure configs without aspect-ratio buckets")  # fmt: skip
    parser.add_argument("--streaming", action="store_true",
                        help="also measure buckets in the streaming order")  # fmt: skip
    parser.add_argument("--synthetic", type=int, default=0,
                        help="N small real JPEGs instead of the photos (sets --big N)")  # fmt: skip
    a = parser.parse_args()
    if a.synthetic:
        synthetic(a.photos, a.synthetic)
        a.big = a.synthetic
    server, bucket = serve(a)
    try:
        for n in (a.big,) if a.memory else (a.small, a.big):
            if not (a.server_dir and (a.server_dir / f"uploaded-{n}").exists()):
                upload(server, bucket, a.photos, n)
            if a.server_dir:
                (a.server_dir / f"uploaded-{n}").touch()
        results: dict[str, list[dict[str, Any]]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            if a.full:
                return full(a, server, bucket, tmp)
            if a.memory:
                return memory(a, bucket, server.env(), tmp)
            for r in range(a.rounds):  # interleaved: small cold, big cold, small/big restart
                for n, mode in variants(a):
                    run_dir, env = f"{tmp}/run-{n}{tag(mode).strip()}-{r}", server.env()
                    for phase in ("cold", "restart"):
                        row = one(bucket, n, run_dir, env, mode)
                        results.setdefault(f"{n}{tag(mode)} {phase}", []).append(row)
        report(results, a.small, a.big)
    finally:
        server.stop()


def report(results: dict[str, list[dict[str, Any]]], small: int, big: int) -> None:
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    base = med[f"{small} cold"]
    print(f"time to first batch (median of {len(results[f'{small} cold'])}); 'plain': no buckets")
    for key, rows in results.items():
        mib = statistics.median(r["bytes"] for r in rows) / 2**20
        gets = statistics.median(r["gets"] for r in rows)
        rss = statistics.median(r["rss_mib"] for r in rows)
        print(
            f"{key:>20}: {med[key]:6.2f} s = {med[key] / base:4.2f}x {small} cold; "
            f"read {mib:7.1f} MiB in {gets:.0f} GETs; peak RSS {rss:6.0f} MiB; "
            f"runs {[round(r['seconds'], 2) for r in rows]}"
        )
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
