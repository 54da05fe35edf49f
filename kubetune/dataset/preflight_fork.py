"""The run's preflight in a forked process (`forked`): its replies come back through a pipe,
the sizes it streams in small messages, the orders the run wants through a second pipe; the
child runs niced once training has its listed report and dies with the run."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from kubetune.dataset.buckets import scan_order
from kubetune.dataset.preflight import PreflightReport, run_preflight
from kubetune.dataset.preflight_replies import ReadOnDemand, Replies
from kubetune.dataset.size_feed import ReadQueue, Size, SizeItem, SizeStream
from kubetune.errors import KubetuneError

CHECKS_NICENESS = 10
"""How much the forked preflight lowers its CPU priority once training has its listed
report: the header checks beside training must not slow the steps down."""


def forked(cfg: Any) -> Future[PreflightReport]:
    """`run_preflight` in a forked daemon process whose replies (the listed report when the
    checks are deferred, then the report or exception) come back through a pipe. The first
    is read by the thread that asks for the result (`ReadOnDemand`), so unpickling 100,000
    records does not take the interpreter lock from the imports and model loading it
    overlaps; the child waits to hand it over. Not a `ProcessPoolExecutor`: a worker that
    dies surfaces there as `BrokenProcessPool` (a traceback, not one line), and its exit hook
    writes to the manager thread's wake-up pipe without the lock under which that thread
    closes it (Python 3.11); nothing of it is needed here."""
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    orders_in, orders = ctx.Pipe(duplex=False)  # (seed, epoch) of a wanted order, to the child
    child = ctx.Process(
        target=_preflight_child,
        args=(cfg, writer, os.getpid(), orders_in),
        name="kubetune-preflight",
        daemon=True,
    )
    child.start()  # before any thread of ours exists: the fork copies no held lock
    writer.close()
    orders_in.close()

    sending = threading.Lock()  # a want (sampler's thread) never meets the close (reply's)

    def want(seed: int, epoch: int) -> None:
        with sending, contextlib.suppress(OSError, ValueError):  # ended: nothing to reorder
            if not orders.closed:
                orders.send((seed, epoch))

    def final(replies: Replies, kind: str, value: Any) -> None:
        reader.close()
        with sending:
            orders.close()
        child.join()
        replies.final(kind, value)

    def rest(replies: Replies) -> None:
        while (reply := _receive(reader, child))[0] == "sizes":
            replies.sizes(reply[1])
        final(replies, *reply)

    def read_first(replies: Replies, timeout: float | None) -> None:
        if not reader.poll(timeout):
            raise TimeoutError("the data preflight has not replied yet")
        kind, value = _receive(reader, child)
        if kind != "listed":
            return final(replies, kind, value)
        replies.listed(value)
        threading.Thread(  # the checks beside training: their reply comes when it comes
            target=rest, args=(replies,), name="kubetune-preflight-reply", daemon=True
        ).start()

    return ReadOnDemand(read_first, want)


def _receive(reader: Connection, child: Any) -> tuple[str, Any]:
    """The child's next reply; an error if it died first or sent what does not unpickle."""
    try:
        kind, value = reader.recv()
        return kind, value
    except Exception as err:  # noqa: BLE001 - no reply (killed, out of memory): the caller
        # must not wait forever
        child.join()
        return "error", KubetuneError(
            f"the data preflight process gave no result (exit code {child.exitcode}: "
            f"{type(err).__name__})"
        )


def _preflight_child(cfg: Any, writer: Connection, parent: int, orders: Connection) -> None:
    """The forked process: send ("listed", report) when the checks are deferred, then
    ("sizes", [(example, h, w), ...]) as they are read if they are streamed, then
    ("ok", report) (without its records, sent already) or ("error", exception); exit."""
    _die_with_parent(parent)
    sent: list[bool] = []

    def listed(report: PreflightReport) -> SizeStream | None:
        writer.send(("listed", report))
        sent.append(True)
        with contextlib.suppress(OSError):  # the checks now run beside training: yield to it
            os.nice(CHECKS_NICENESS)
        return _piped_stream(report.num_examples, writer, orders) if report.streamed else None

    try:
        report = run_preflight(cfg, listed)
        reply: tuple[str, Any] = ("ok", replace(report, source=None) if sent else report)
    except BaseException as err:  # noqa: BLE001 - handed to the parent
        reply = ("error", err)
    try:
        writer.send(reply)
    except Exception as err:  # noqa: BLE001 - an exception that does not pickle
        writer.send(("error", KubetuneError(f"data preflight failed: {reply[1]!r} ({err})")))
    writer.close()


def _die_with_parent(parent: int) -> None:
    """Linux: this process is killed when the thread that forked it (the run's main thread)
    dies, SIGKILL included, instead of reading headers for nobody (checks beside training
    outlive step 1); exit at once if that already happened. It also leaves the run's process
    group: torchrun stops a worker (SIGTERM, preemption) by signalling its whole group, and
    checks killed by it had no result to settle before the stop checkpoint ('the data
    preflight process gave no result') instead of still running."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


SIZES_PER_MESSAGE = 512
"""Streamed sizes sent to the run at once (or fewer, after `SIZES_EVERY_S`)."""
SIZES_EVERY_S = 0.05


def _piped_stream(n: int, writer: Connection, orders: Connection) -> SizeStream:
    """The forked checks' stream: sizes sent to the run in small messages; the orders the
    run wants (seed, epoch) reorder the reads, received by a thread of this process."""
    queue, lock = ReadQueue(range(n)), threading.Lock()
    batch: list[SizeItem] = []
    last = [time.monotonic()]

    def send() -> None:
        if batch:
            writer.send(("sizes", list(batch)))
            batch.clear()
        last[0] = time.monotonic()

    def on_size(i: int, hw: Size) -> None:
        with lock:
            batch.append((i, *hw))
            if len(batch) >= SIZES_PER_MESSAGE or time.monotonic() - last[0] > SIZES_EVERY_S:
                send()

    def flush() -> None:
        with lock:
            send()

    def listen() -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                seed, epoch = orders.recv()
                queue.reorder(scan_order(n, seed, epoch))

    threading.Thread(target=listen, name="kubetune-preflight-orders", daemon=True).start()
    return SizeStream(queue, on_size, flush)
