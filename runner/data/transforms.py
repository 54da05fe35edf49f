"""Resize-to-cover, crop and flip; records the SDXL time-id inputs (original size, crop)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from kubetune.config.data import Resolution


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
        place = self.plan(img.size, target_hw, rng)
        return to_tensor(place.apply(img)), place.original_hw, place.crop_yx

    def plan(
        self, size_wh: tuple[int, int], target_hw: tuple[int, int], rng: random.Random
    ) -> Placement:
        """Where an image of `size_wh` lands: resized size, crop corner and flip."""
        th, tw = target_hw
        w, h = size_wh
        rh, rw = cover_hw(size_wh, target_hw)
        if self.center_crop:
            top, left = (rh - th) // 2, (rw - tw) // 2
        else:
            top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
        flip = self.random_flip and rng.random() < 0.5
        return Placement((h, w), (rh, rw), (th, tw), top, left, flip)


@dataclass(frozen=True)
class Placement:
    """One draw of the transform, applicable to an image and to its mask alike."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    target_hw: tuple[int, int]
    top: int
    left: int
    flip: bool

    @property
    def crop_yx(self) -> tuple[int, int]:
        """The crop's corner in the resized image (x mirrored when flipped)."""
        left = self.resized_hw[1] - self.left - self.target_hw[1] if self.flip else self.left
        return self.top, left

    def apply(self, img: Image.Image) -> Image.Image:
        (rh, rw), (th, tw) = self.resized_hw, self.target_hw
        if (rw, rh) != img.size:
            img = img.resize((rw, rh), Image.Resampling.BILINEAR)
        img = img.crop((self.left, self.top, self.left + tw, self.top + th))
        if self.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


def cover_hw(size_wh: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an image of `size_wh` resized (aspect kept) to just cover `target_hw`."""
    (th, tw), (w, h) = target_hw, size_wh
    scale = max(th / h, tw / w)
    return max(th, math.ceil(h * scale - 1e-6)), max(tw, math.ceil(w * scale - 1e-6))


def cover(
    img: Image.Image, target_hw: tuple[int, int], size_wh: tuple[int, int] | None = None
) -> Image.Image:
    """`img` resized as `Placement.apply` resizes an image of `size_wh` (default: its own
    size) for `target_hw`, so that `apply` on the result only crops and flips:
    `keep_in_memory` keeps images at this scale."""
    rh, rw = cover_hw(size_wh or img.size, target_hw)
    return img.resize((rw, rh), Image.Resampling.BILINEAR) if img.size != (rw, rh) else img


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """`L` PIL image → float32 [1, H, W] in [0, 1]."""
    array = np.asarray(mask, dtype=np.uint8)
    return torch.from_numpy(array.copy()).unsqueeze(0).float().div_(255.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 [3, H, W] in [-1, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
    return tensor.div_(127.5).sub_(1.0)
