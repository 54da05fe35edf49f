"""What sharing a streaming order's image sizes costs (`runner.data.size_relay`: global rank 0
publishes its header checks' sizes to the run's c10d store, the other ranks poll it): N
sizes put into rank 0's feed as the forked preflight sends them (messages of 512, one every
`--every-ms`), `--followers` ranks following them through their own clients of a real
`torch.distributed.TCPStore` on 127.0.0.1 (in this process, one thread each, as in a run).
Reported per round: how long after the last put every follower had every size (the lag the
relay adds at the end), the messages published, their pickled bytes, and the store requests
per follower per second. Each of `--rounds` rounds uses a fresh store.

    .venv/bin/python benchmarks/size_relay.py --examples 100000 --followers 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


class Counted:
    """A store client that counts its requests and the bytes it publishes."""

    def __init__(self, store: object) -> None:
        self.store, self.requests, self.bytes, self.keys = store, 0, 0, 0
        self.lock = threading.Lock()

    def set(self, key: str, value: bytes) -> None:
        with self.lock:
            self.requests, self.keys = self.requests + 1, self.keys + 1
            self.bytes += len(value)
        self.store.set(key, value)  # type: ignore[attr-defined]

    def get(self, key: str) -> bytes:
        with self.lock:
            self.requests += 1
        return self.store.get(key)  # type: ignore[attr-defined, no-any-return]

    def check(self, keys: list[str]) -> bool:
        with self.lock:
            self.requests += 1
        return self.store.check(keys)  # type: ignore[attr-defined, no-any-return]


def one_round(n: int, followers: int, every_s: float) -> dict[str, float]:
    import torch.distributed as dist
    from dp_support import free_port

    from kubetune.dataset.size_feed import SizeFeed
    from runner.data.size_relay import follow_sizes, publish_sizes

    port, timeout = free_port(), timedelta(seconds=60)
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=timeout)  # fmt: skip
    out = Counted(server)
    clients = [Counted(dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout))
               for _ in range(followers)]  # fmt: skip
    source = SizeFeed(n)
    mirror = publish_sizes(source, out)
    feeds = [follow_sizes(n, c) for c in clients]
    started = time.perf_counter()
    for start in range(0, n, 512):
        time.sleep(every_s)
        source.put([(i, 512 + i % 7, 768) for i in range(start, min(n, start + 512))])
    last_put = time.perf_counter()
    for feed in [mirror, *feeds]:
        while not feed.complete:
            time.sleep(0.0005)
    lag = time.perf_counter() - last_put
    span = time.perf_counter() - started
    assert all(f.arrived() == source.arrived() for f in feeds)
    return {
        "lag_ms": lag * 1000,
        "messages": out.keys,
        "kib": out.bytes / 1024,
        "requests_per_s": statistics.mean(c.requests for c in clients) / span,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--followers", type=int, default=7)
    parser.add_argument("--every-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    for r in range(args.rounds):
        result = one_round(args.examples, args.followers, args.every_ms / 1000)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
