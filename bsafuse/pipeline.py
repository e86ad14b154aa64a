"""A streaming read -> compute -> write pipeline with bounded queues, for folder runs.

The network runs in the calling thread (torch already uses every core it was given); reading the
next pairs and writing the finished ones run meanwhile in a small thread pool. Decoding and
encoding images (Pillow, zlib, pydicom, nibabel, numpy) release the GIL for most of their time,
so a folder runs close to the network's own speed. At most `prefetch` jobs are read ahead and at
most `write_behind` finished jobs wait to be written, so memory stays flat however long the folder.

Jobs come out in the order they went in, one `Done` each: with the error a stage raised if it
was one of the `recoverable` types (the next job runs), while any other exception stops the
pipeline (queued work is cancelled; reads and writes already running finish first, and writes are
atomic) and propagates.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

J = TypeVar("J")  # a job
R = TypeVar("R")  # what reading a job gives
C = TypeVar("C")  # what computing gives

PREFETCH = 2  # jobs read ahead of the one computing
WRITE_BEHIND = 2  # computed jobs that may still be writing
IO_THREADS = 2


@dataclass
class Done(Generic[J]):
    """One finished job: `error` is None on success; `seconds` sums its three stages' times."""

    job: J
    error: BaseException | None
    seconds: float


def _timed(fn: Callable[..., R], *args: object) -> tuple[R, float]:
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def stream(
    jobs: Iterable[J],
    *,
    read: Callable[[J], R],
    compute: Callable[[J, R], C],
    write: Callable[[J, C], None],
    recoverable: tuple[type[BaseException], ...],
    prefetch: int = PREFETCH,
    write_behind: int = WRITE_BEHIND,
) -> Generator[Done[J], None, None]:
    """Run every job through read (pool), compute (this thread) and write (pool), in order."""
    pending = iter(jobs)
    reads: deque[tuple[J, Future[tuple[R, float]]]] = deque()
    writes: deque[tuple[J, float, Future[tuple[None, float]]]] = deque()
    pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="bsafuse-io")

    def refill() -> None:
        while len(reads) < max(1, prefetch):
            job = next(pending, _END)
            if job is _END:
                return
            reads.append((job, pool.submit(_timed, read, job)))  # type: ignore[arg-type]

    def finish_write() -> Done[J]:
        job, seconds, future = writes.popleft()
        try:
            _, took = future.result()
        except recoverable as exc:
            return Done(job, exc, seconds)
        return Done(job, None, seconds + took)

    try:
        refill()
        while reads:
            job, future = reads.popleft()
            refill()  # the next reads run while this job computes
            try:
                loaded, read_s = future.result()
                result, compute_s = _timed(compute, job, loaded)
            except recoverable as exc:
                while writes:  # earlier jobs first: outcomes stay in input order
                    yield finish_write()
                yield Done(job, exc, 0.0)
                continue
            writes.append((job, read_s + compute_s, pool.submit(_timed, write, job, result)))
            while len(writes) > max(0, write_behind):
                yield finish_write()
        while writes:
            yield finish_write()
    finally:
        # normal end: nothing is queued; an error or Ctrl-C: drop queued work, let running I/O end
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()
