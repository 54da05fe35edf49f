"""The batch format of docs/architecture.md: examples of one bucket stacked (`collate`), each
told where it sits in its global batch (`place`)."""

from __future__ import annotations

from typing import Any

import torch

from runner.data.buckets import Slots

Batch = dict[str, Any]


def collate(items: list[Batch]) -> Batch:
    """Stack examples of one bucket into the batch format of docs/architecture.md (plus
    ``"skipped"``: messages naming the bad examples left out of this batch, if any)."""
    batch = {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "caption": [it["caption"] for it in items],
        "original_size_hw": torch.tensor(
            [it["original_size_hw"] for it in items], dtype=torch.long
        ),
        "crop_top_left_yx": torch.tensor(
            [it["crop_top_left_yx"] for it in items], dtype=torch.long
        ),
        "id": [it["id"] for it in items],
        "flipped": [bool(it.get("flipped", False)) for it in items],
        "index": [it.get("index", -1) for it in items],
    }
    if "mask" in items[0]:
        batch["mask"] = torch.stack([it["mask"] for it in items])
    if "loss_weight" in items[0]:
        batch["loss_weight"] = torch.tensor(
            [it["loss_weight"] for it in items], dtype=torch.float32
        )
    skipped = [message for it in items for message in it.get("skipped", [])]
    if skipped:
        batch["skipped"] = skipped
    return batch


def place(batch: Batch, slots: Slots) -> None:
    """Tell the batch where its examples sit in their global batch (``Batch`` keys
    ``rows``, ``global_size``, ``share``: see ``Slots``). An example that replaced an
    unreadable one takes the first free row."""
    free = dict(zip(slots.indices, zip(slots.rows, slots.shares(), strict=True), strict=True))
    rows, shares = [], []
    for index in batch["index"]:
        row, share = free.pop(index) if index in free else free.pop(next(iter(free)))
        rows.append(row)
        shares.append(share)
    batch["rows"] = rows
    batch["global_size"] = slots.size
    batch["share"] = shares  # host floats: deciding on them needs no device sync
