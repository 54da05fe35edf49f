"""Resize-to-cover, crop and flip; records the SDXL time-id inputs (original size, crop)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from runner.config.data import Resolution


def resolution_hw(resolution: Resolution) -> tuple[int, int]:
    """An int (square) or (h, w) resolution as (h, w)."""
    if isinstance(resolution, int):
        return resolution, resolution
    return int(resolution[0]), int(resolution[1])


@dataclass(frozen=True)
class ImageTransform:
    """How one image becomes a training tensor of a given (h, w)."""

    center_crop: bool = True
    random_flip: bool = False

    def params(self) -> dict[str, object]:
        """Everything that changes the output (part of cache keys)."""
        return {
            "center_crop": self.center_crop,
            "random_flip": self.random_flip,
            "resample": "bilinear",
            "version": 1,
        }

    def __call__(
        self, img: Image.Image, target_hw: tuple[int, int], rng: random.Random
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """Return (pixels [3,H,W] in [-1, 1], original_size_hw, crop_top_left_yx).

        The image is resized so it covers `target_hw` (keeping its aspect ratio), then cropped
        (centre or random) and optionally flipped. `crop_top_left_yx` is the crop's corner in
        the resized image, mirrored when flipped, as SDXL's micro-conditioning expects.
        """
        w, h = img.size
        return self.crop_flip(cover(img, target_hw), (h, w), target_hw, rng)

    def crop_flip(
        self,
        img: Image.Image,
        original_hw: tuple[int, int],
        target_hw: tuple[int, int],
        rng: random.Random,
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """The per-draw half of `__call__` on an image already resized by `cover` (what
        `keep_in_memory` keeps): the same result as `__call__` on the original."""
        th, tw = target_hw
        rw, rh = img.size
        if self.center_crop:
            top, left = (rh - th) // 2, (rw - tw) // 2
        else:
            top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
        img = img.crop((left, top, left + tw, top + th))
        flip = self.random_flip and rng.random() < 0.5
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = rw - left - tw
        return to_tensor(img), original_hw, (top, left)


def cover(img: Image.Image, target_hw: tuple[int, int]) -> Image.Image:
    """`img` resized (bilinear, aspect kept) to the smallest size covering `target_hw`."""
    th, tw = target_hw
    w, h = img.size
    scale = max(th / h, tw / w)
    rh, rw = max(th, math.ceil(h * scale - 1e-6)), max(tw, math.ceil(w * scale - 1e-6))
    return img.resize((rw, rh), Image.Resampling.BILINEAR) if (rw, rh) != (w, h) else img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 [3, H, W] in [-1, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
    return tensor.div_(127.5).sub_(1.0)
