"""Generate the tiny sample dataset in ``examples/sample_data/`` (deterministic).

Six 96×96 PNGs of simple coloured shapes, each with a same-named ``.txt`` caption, plus
``metadata.jsonl`` (``image`` / ``text`` columns) — so the README's local demo works both as
a caption directory and as a jsonl dataset. Re-run to regenerate identical files::

    python examples/make_sample_data.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 96
# (file stem, shape, shape colour, background colour, caption)
SAMPLES = [
    ("red_circle", "circle", (220, 40, 40), (40, 70, 160), "a red circle on a blue background"),
    (
        "green_square",
        "square",
        (50, 180, 70),
        (240, 230, 200),
        "a green square on a cream background",
    ),
    (
        "yellow_triangle",
        "triangle",
        (240, 200, 30),
        (30, 30, 30),
        "a yellow triangle on a black background",
    ),
    ("blue_ring", "ring", (40, 110, 230), (250, 250, 250), "a blue ring on a white background"),
    (
        "purple_diamond",
        "diamond",
        (140, 60, 190),
        (150, 220, 180),
        "a purple diamond on a mint background",
    ),
    (
        "orange_stripes",
        "stripes",
        (240, 130, 30),
        (60, 60, 90),
        "orange stripes on a dark grey background",
    ),
]


def _draw(shape: str, fg: tuple[int, int, int], bg: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # a gentle vertical gradient plus a little noise, so images are not flat colour
    ramp = np.linspace(-18, 18, SIZE)[:, None, None]
    base = np.clip(
        np.array(bg, float)[None, None, :] + ramp + rng.normal(0, 4, (SIZE, SIZE, 3)), 0, 255
    )
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    c, r = SIZE // 2, SIZE // 3
    if shape == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=fg)
    elif shape == "square":
        d.rectangle([c - r, c - r, c + r, c + r], fill=fg)
    elif shape == "triangle":
        d.polygon([(c, c - r), (c + r, c + r), (c - r, c + r)], fill=fg)
    elif shape == "ring":
        d.ellipse([c - r, c - r, c + r, c + r], outline=fg, width=8)
    elif shape == "diamond":
        d.polygon([(c, c - r), (c + r, c), (c, c + r), (c - r, c)], fill=fg)
    elif shape == "stripes":
        for x in range(0, SIZE, 16):
            d.rectangle([x, 0, x + 7, SIZE], fill=fg)
    else:
        raise ValueError(shape)
    return img


def make_sample_data(out_dir: str | Path) -> Path:
    """Write the images, captions and ``metadata.jsonl`` into ``out_dir``; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed, (stem, shape, fg, bg, caption) in enumerate(SAMPLES):
        _draw(shape, fg, bg, seed).save(out / f"{stem}.png", optimize=True)
        (out / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        rows.append({"image": f"{stem}.png", "text": caption})
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    (out / "metadata.jsonl").write_text(lines, encoding="utf-8")
    return out


if __name__ == "__main__":
    default = Path(__file__).resolve().parent / "sample_data"
    print(make_sample_data(sys.argv[1] if len(sys.argv) > 1 else default))
