"""The run's metric history: one JSON line per progress log line (step, epoch, loss, lr,
images/s, time), published whole as ``history.jsonl`` beside ``progress.json``. It is what the
run report plots; it needs no TensorBoard. A resumed run keeps the lines up to its checkpoint.
Torch-free."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from kubetune.layout import HISTORY_KEY, read_history
from kubetune.storage import ObjectStore

log = logging.getLogger(__name__)
FIELDS = ("step", "epoch", "loss", "lr", "images_per_second", "time")


class History:
    """Records in step order; ``publish`` rewrites the object (all-or-nothing put)."""

    def __init__(self, store: ObjectStore | None, *, start_step: int = 0) -> None:
        self.store = store
        self.records: list[dict[str, Any]] = []
        if store is not None and start_step > 0:
            self.records = [r for r in read_history(store) if r.get("step", 0) <= start_step]

    def append(self, **fields: Any) -> None:
        """Add one line (unknown fields are dropped, floats rounded to keep the file small)."""
        record = {k: fields[k] for k in FIELDS if fields.get(k) is not None}
        record.setdefault("time", time.time())
        for key, value in record.items():
            if isinstance(value, float):
                record[key] = float(f"{value:.6g}") if key != "time" else round(value, 1)
        self.records.append(record)

    def to_bytes(self) -> bytes:
        return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self.records).encode()

    def publish(self, data: bytes | None = None) -> None:
        """Put the history (``data``: a snapshot taken earlier by ``to_bytes``)."""
        if self.store is not None:
            self.store.put_bytes(HISTORY_KEY, self.to_bytes() if data is None else data)
