"""Step time on real-size photos: kubetune's loader with `keep_in_memory` + kubetune's step vs
a bare diffusers-example loop (images decoded once and kept, the example's per-draw
Resize / CenterCrop / RandomFlip / ToTensor / Normalize, then its step), interleaved epochs
after one warm-up epoch each; ratios from one run. `--rss` instead prints the peak RSS of one
epoch over a folder with and without `keep_in_memory` (fresh processes); `--overlap` compares
`dataloader_num_workers` 0 and 2 without `keep_in_memory` (every draw fetches and decodes);
`--shared` prints fetches and seconds per epoch with `keep_in_memory` and 2 workers (data
only, no step).

    python benchmarks/make_photos.py /var/tmp/kubetune-photos-mixed --count 200 --mixed \\
        --max-side 1000
    .venv/bin/python benchmarks/data_step_time.py /var/tmp/kubetune-photos-mixed --images 48
    .venv/bin/python benchmarks/data_step_time.py /var/tmp/kubetune-photos --rss --images 10000 \\
        --container-gib 4
    .venv/bin/python benchmarks/data_step_time.py /var/tmp/kubetune-photos-mixed --overlap
    .venv/bin/python benchmarks/data_step_time.py /var/tmp/kubetune-photos-mixed --shared
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

Batch = dict[str, Any]


def subset(photos: Path, n: int, out: Path) -> Path:
    """A caption-dir dataset of the first `n` photos (symlinks + .txt captions)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(r) for r in (photos / "data.jsonl").read_text().splitlines()[:n]]
    for row in rows:
        (out / row["image"]).symlink_to(photos / row["image"])
        (out / row["image"]).with_suffix(".txt").write_text(row["text"])
    return out


def loader_config(data: Path, side: int, keep: bool, workers: int = 0) -> Any:
    from kubetune.config import SdLoraConfig

    return SdLoraConfig.model_validate(
        {
            "base_output_dir": "/tmp/kubetune-bench",
            "max_train_steps": 1,
            "save_every_n_steps": 1,
            "data_loader": {
                "dataset": {
                    "type": "IMAGE_CAPTION_DIR_DATASET",
                    "dataset_dir": str(data),
                    "keep_in_memory": keep,
                },
                "resolution": side,
                "center_crop": True,
                "random_flip": True,
                "dataloader_num_workers": workers,
            },
        }
    )


def kubetune_batches(
    data: Path, side: int, batch: int, keep: bool = True, workers: int = 0
) -> Callable[[], Iterator[Batch]]:
    from runner.data import build_train_dataloader

    cfg = loader_config(data, side, keep=keep, workers=workers)
    loader = build_train_dataloader(cfg, seed=0, batch_size=batch, device_is_cuda=False)
    return lambda: iter(loader)


def bare_batches(
    data: Path, side: int, batch: int, tokenizer: Any
) -> Callable[[], Iterator[Batch]]:
    """The diffusers example's data path, images decoded once up front."""
    names = sorted(p for p in data.iterdir() if p.suffix in (".png", ".jpg"))
    images = [Image.open(p).convert("RGB") for p in names]
    captions = [p.with_suffix(".txt").read_text() for p in names]
    rng = random.Random(0)

    def transform(img: Image.Image) -> torch.Tensor:
        w, h = img.size
        scale = side / min(w, h)
        img = img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BILINEAR)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return array.float().div(255).sub(0.5).div(0.5)

    def epoch() -> Iterator[Batch]:
        order = list(range(len(images)))
        rng.shuffle(order)
        for start in range(0, len(order), batch):
            picked = order[start : start + batch]
            caps = [captions[i] for i in picked]
            ids = tokenizer(caps, padding="max_length", max_length=77, truncation=True)
            yield {
                "pixel_values": torch.stack([transform(images[i]) for i in picked]),
                "caption": caps,
                "input_ids": torch.tensor(ids.input_ids),
                "original_size_hw": torch.tensor([[side, side]] * len(picked)),
                "crop_top_left_yx": torch.zeros(len(picked), 2, dtype=torch.long),
                "id": [str(i) for i in picked],
            }

    return epoch


CLOCK: Callable[[], float] = time.perf_counter
"""Wall time; ``--cpu-time`` switches to the process's CPU time (all its threads), which a
noisy neighbour on a shared machine stretches far less than wall time."""


def timed_epoch(batches: Callable[[], Iterator[Batch]], step: Callable[[Batch], Any]) -> float:
    """Median seconds per step (data + step) over one epoch, on ``CLOCK``."""
    times, it = [], batches()
    while True:
        start = CLOCK()
        try:
            batch = next(it)
        except StopIteration:
            return statistics.median(times)
        step(batch)
        times.append(CLOCK() - start)


def step_time(args: argparse.Namespace) -> None:
    from train_step import parse_args
    from train_step_loops import bare_step, kubetune_step, tiny_components
    from transformers import CLIPTokenizer

    from runner.models.tiny import TOKENIZER_DIR, build_tiny_sd

    device = torch.device("cpu")
    opts = parse_args(["--side", str(args.side), "--batch", str(args.batch)])
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(args.photos, args.images, Path(tmp) / "data")
        model = build_tiny_sd(Path(tmp) / "tiny-sd")
        loops = {
            "kubetune": (
                kubetune_batches(data, args.side, args.batch),
                kubetune_step(tiny_components(model, torch.float32, device), opts, device),
            ),
            "bare": (
                bare_batches(data, args.side, args.batch, tokenizer),
                bare_step(tiny_components(model, torch.float32, device), opts, device),
            ),
        }
        for batches, step in loops.values():  # warm-up: kubetune fills its memory here
            timed_epoch(batches, step)
        ratios = []
        for r in range(args.rounds):
            got = {name: timed_epoch(*loop) for name, loop in loops.items()}
            ratios.append(got["kubetune"] / got["bare"])
            print(
                f"round {r}: kubetune {got['kubetune'] * 1e3:.0f} ms/step, bare "
                f"{got['bare'] * 1e3:.0f} ms/step, ratio {ratios[-1]:.3f}"
            )
    median = statistics.median(ratios)
    clock = "CPU time" if CLOCK is time.process_time else "wall time"
    print(
        f"{args.images} photos, {args.side}px batch {args.batch}, tiny SD1.5 on CPU: "
        f"kubetune / bare = {median:.3f} (median of {args.rounds}, {clock}; load average "
        f"{os.getloadavg()[0]:.1f})"
    )


def overlap(args: argparse.Namespace) -> None:
    """Step time (data + step) without `keep_in_memory` (every draw fetches and decodes),
    `dataloader_num_workers` 0 vs 2, interleaved epochs after a warm-up epoch each."""
    from train_step import parse_args
    from train_step_loops import kubetune_step, tiny_components

    from runner.models.tiny import build_tiny_sd

    device = torch.device("cpu")
    opts = parse_args(["--side", str(args.side), "--batch", str(args.batch)])
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(args.photos, args.images, Path(tmp) / "data")
        step = kubetune_step(
            tiny_components(build_tiny_sd(Path(tmp) / "tiny-sd"), torch.float32, device),
            opts,
            device,
        )
        loops = {w: kubetune_batches(data, args.side, args.batch, False, w) for w in (0, 2)}
        for batches in loops.values():
            timed_epoch(batches, step)
        ratios = []
        for r in range(args.rounds):
            got = {w: timed_epoch(batches, step) for w, batches in loops.items()}
            ratios.append(got[2] / got[0])
            print(f"round {r}: workers=0 {got[0] * 1e3:.0f} ms/step, workers=2 "
                  f"{got[2] * 1e3:.0f} ms/step, ratio {ratios[-1]:.3f}")  # fmt: skip
    print(f"workers=2 / workers=0 = {statistics.median(ratios):.3f} (median of {args.rounds})")


def shared_epochs(args: argparse.Namespace) -> None:
    """`keep_in_memory` with 2 workers sharing one block: fetches (counted in every process)
    and seconds of `--rounds` epochs, data only; epochs after the first should fetch nothing."""
    import multiprocessing

    from kubetune.dataset.sources import Source
    from runner.data import build_train_dataloader

    fetches = multiprocessing.Value("i", 0)
    fetch = Source.fetch

    def counted(self: Source, index: int) -> Any:
        with fetches.get_lock():
            fetches.value += 1
        return fetch(self, index)

    Source.fetch = counted  # type: ignore[method-assign]  # (forked workers inherit it)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(args.photos, args.images, Path(tmp) / "data")
        cfg = loader_config(data, args.side, keep=True, workers=2)
        loader = build_train_dataloader(cfg, seed=0, batch_size=args.batch, device_is_cuda=False)
        for epoch in range(args.rounds):
            before, start = fetches.value, time.perf_counter()
            for _ in loader:
                pass
            rows.append((fetches.value - before, time.perf_counter() - start))
            print(f"epoch {epoch}: {rows[-1][0]} fetches, {rows[-1][1]:.2f} s")
    later = statistics.median(s for _, s in rows[1:]) / rows[0][1]
    print(f"fetches per epoch {[f for f, _ in rows]}; later / first epoch seconds {later:.3f}")


def rss_epoch(data: str, side: int, keep: bool, container_gib: float = 0.0) -> None:
    """One epoch in this process; prints peak RSS (MiB), seconds and how many decoded images
    `keep_in_memory` held. `container_gib` simulates a container memory limit (the budget is
    half of it) on a machine where a real one cannot be set."""
    from runner.data import build_train_dataloader, memory

    if container_gib:
        memory.memory_limit_bytes = lambda: int(container_gib * 2**30)

    cfg = loader_config(Path(data), side, keep)
    loader = build_train_dataloader(cfg, seed=0, batch_size=8, device_is_cuda=False)
    start = time.perf_counter()
    for _ in loader:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kept = loader.dataset.memory
    held = {"kept": len(kept), "kept_mib": kept.used / 2**20} if kept is not None else {}
    seconds = time.perf_counter() - start
    print(json.dumps({"keep": keep, "peak_rss_mib": peak, "seconds": seconds, **held}))


def rss(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="kubetune-rss-"))
    try:
        data = subset(args.photos, args.images, tmp / "data")
        for keep in (False, True):
            call = f"rss_epoch({str(data)!r}, {args.side}, {keep}, {args.container_gib})"
            code = f"from data_step_time import rss_epoch; {call}"
            out = subprocess.run(
                [sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            held = f", kept {row['kept']} images ({row['kept_mib']:.0f} MiB)" if keep else ""
            print(f"{args.images} photos at {args.side}px, keep_in_memory={keep}: peak RSS "
                  f"{row['peak_rss_mib']:.0f} MiB, epoch {row['seconds']:.0f} s{held}")  # fmt: skip
            print(out.stderr.strip()[-400:] if "budget" in out.stderr else "", end="")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss", action="store_true", help="peak RSS with/without keep_in_memory")
    parser.add_argument(
        "--container-gib", type=float, default=0.0, help="--rss: simulated container limit"
    )
    parser.add_argument("--overlap", action="store_true", help="workers 0 vs 2, no keep")
    parser.add_argument("--shared", action="store_true", help="keep + 2 workers, per epoch")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time steps by process CPU time, not wall time"
    )
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    modes = {"rss": rss, "overlap": overlap, "shared": shared_epochs}
    next((f for name, f in modes.items() if getattr(args, name)), step_time)(args)


if __name__ == "__main__":
    main()
