"""The listing of a folder whose keys are known in advance (a JSONL dataset names every
image), fetched as parallel ranges instead of one page after another.

A paginated listing is sequential: each page's continuation token comes from the previous
page, so 10,000 keys cost ten round trips in a row. When the keys are known, the listing is
split at some of them: range ``i`` starts after key ``cuts[i-1]`` (S3 ``start-after``) and
ends at key ``cuts[i]``, and the ranges are fetched in parallel (bounded) and concatenated.
The result is the sequential listing whatever order the server lists in: a range whose end
key never shows up (a missing object, or a server order unlike the sorted keys, as
SeaweedFS's path-segment order) runs to the end of the folder, and keys seen twice are kept
once, where they were first seen. Should a named key still be absent from the merged ranges
(it is missing, or a server places ``start-after`` unlike its own listing order), the folder
is listed once more, sequentially, so a key is never reported missing by the ranges alone.
No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from kubetune.storage import Capability, ObjectInfo, ObjectStore, supports

LIST_WORKERS = 8
"""Ranges listed at once (at most; fewer when the keys fit in fewer pages)."""


def cut_points(keys: Sequence[str], parts: int) -> list[str]:
    """``parts - 1`` of the sorted distinct ``keys`` that split them into ``parts`` runs of
    near-equal length (fewer when there are fewer keys)."""
    ordered = sorted(set(keys))
    parts = max(1, min(parts, len(ordered)))
    step = len(ordered) / parts
    return [ordered[math.ceil(step * i) - 1] for i in range(1, parts)]


def list_known(
    store: ObjectStore, prefix: str, keys: Sequence[str], workers: int = LIST_WORKERS
) -> list[ObjectInfo]:
    """``list(store.list(prefix))``, in parallel ranges cut at ``keys`` (keys expected under
    ``prefix``) when the store can list ranges and the keys fill more than one page."""
    if not supports(store, Capability.RANGE_LISTING):
        return list(store.list(prefix))
    parts = min(workers, math.ceil(len(keys) / max(1, store.page_size)))
    cuts = cut_points(keys, parts)
    if not cuts:
        return list(store.list(prefix))
    ranges = list(zip([None, *cuts], [*cuts, None], strict=True))
    with ThreadPoolExecutor(len(ranges), thread_name_prefix="kubetune-list") as pool:
        pieces = list(pool.map(lambda r: list(store.list_range(prefix, *r)), ranges))
    seen: set[str] = set()
    merged: list[ObjectInfo] = []
    for piece in pieces:
        for info in piece:
            if info.key not in seen:
                seen.add(info.key)
                merged.append(info)
    if not seen.issuperset(keys):  # the sequential listing decides what is missing
        return list(store.list(prefix))
    return merged
