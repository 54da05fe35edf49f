"""Generate photo-like test images for the data benchmarks (outside the repository).

Smooth gradients + low-frequency waves + fine grain + random shapes, so encoded sizes are
those of real photos (JPEG ~100-150 KB at 512-768 px), not of flat colour. Sizes 512-1000 px,
mixed aspect; `--mixed` also writes PNGs in modes RGB / RGBA / L / P. Deterministic by index;
a bounded process pool; existing files are kept (safe to rerun).

    python benchmarks/make_photos.py /var/tmp/kubetune-photos --count 10000 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MODES = ("RGB", "RGBA", "L", "P")


_GRAIN: list[np.ndarray] = []


def _grain(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Fine film grain: a random window of a per-process 1024² noise bank (cheap per image)."""
    if not _GRAIN:
        bank = np.random.default_rng(12345)
        _GRAIN.append(bank.normal(0, 7, (1024, 1024, 1)).astype(np.float32))
        _GRAIN.append(bank.normal(0, 3, (1024, 1024, 3)).astype(np.float32))
    y, x = int(rng.integers(0, 1025 - h)), int(rng.integers(0, 1025 - w))
    return _GRAIN[0][y : y + h, x : x + w] + _GRAIN[1][y : y + h, x : x + w]


def photo(index: int, min_side: int, max_side: int) -> Image.Image:
    """An RGB photo-like image, deterministic by `index`: smooth structure drawn at a quarter
    of the size and upscaled, plus full-size grain and shapes."""
    rng = np.random.default_rng(index)
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    sh, sw = h // 4 + 1, w // 4 + 1
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32) * 4
    small = rng.uniform(40, 200, 3) + xx[..., None] * rng.uniform(-0.15, 0.15, 3)
    small = small + yy[..., None] * rng.uniform(-0.15, 0.15, 3)
    for _ in range(4):
        fx, fy, phase = rng.uniform(0.005, 0.05), rng.uniform(0.005, 0.05), rng.uniform(0, 6)
        small += rng.uniform(5, 25, 3) * np.sin(xx * fx + yy * fy + phase)[..., None]
    smooth = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8), "RGB").resize((w, h))
    pixels = np.asarray(smooth, dtype=np.float32) + _grain(rng, h, w)
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return out


def write_one(args: tuple[int, str, bool, int, int]) -> tuple[str, int]:
    """Write image `index` (JPEG, or with `mixed` every other one a PNG in one of MODES)."""
    index, folder, mixed, min_side, max_side = args
    img = photo(index, min_side, max_side)
    if mixed and index % 2:
        mode = MODES[(index // 2) % len(MODES)]
        if mode == "P":
            img = img.quantize(256)
        elif mode == "RGBA":
            img = img.convert("RGBA")
            img.putalpha(Image.linear_gradient("L").resize(img.size))
        else:
            img = img.convert(mode)
        name, fmt, kwargs = f"img-{index:06d}.png", "PNG", {}
    else:
        name, fmt, kwargs = f"img-{index:06d}.jpg", "JPEG", {"quality": 90}
    path = Path(folder) / name
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        img.save(tmp, fmt, **kwargs)
        os.replace(tmp, path)
    return name, path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (bounded)")
    parser.add_argument("--mixed", action="store_true", help="mixed PNG/JPEG and modes")
    parser.add_argument("--min-side", type=int, default=512)
    parser.add_argument("--max-side", type=int, default=768)
    a = parser.parse_args()
    a.folder.mkdir(parents=True, exist_ok=True)
    work = [(i, str(a.folder), a.mixed, a.min_side, a.max_side) for i in range(a.count)]
    with ProcessPoolExecutor(max(1, a.jobs)) as pool:
        written = list(pool.map(write_one, work, chunksize=16))
    rows = [json.dumps({"image": name, "text": f"a photo number {i}"}) for i, (name, _) in
            enumerate(written)]  # fmt: skip
    (a.folder / "data.jsonl").write_text("\n".join(rows) + "\n")
    sizes = sorted(size for _, size in written)
    print(
        f"{len(written)} images in {a.folder}: {sum(sizes) / 2**20:.0f} MiB, "
        f"median {sizes[len(sizes) // 2] / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    main()
