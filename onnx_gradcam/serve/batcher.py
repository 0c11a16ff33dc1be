"""Dynamic batching: requests that arrive within `max_delay` go into one session.run of at most
`max_batch` samples, each sample with its own inputs (its own `gradcam_class`).

Every row of a prepared model's outputs depends only on that row's inputs, so splitting a batched
run gives each request what a run of its own would give (the tests check this bit for bit).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


@dataclass
class _Job:
    feeds: Feeds
    n: int
    key: tuple[object, ...]
    future: asyncio.Future[Outputs] = field(repr=False)


def _key(feeds: Feeds) -> tuple[object, ...]:
    """Jobs with equal keys can be stacked: same inputs, dtypes and per-sample shapes."""
    return tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in feeds.items()))


class Batcher:
    """One queue and one worker thread per model; `submit` awaits the rows of one request.

    `run` is the blocking session call (feeds -> outputs, every output [N, ...]); it runs in the
    batcher's own thread, one batch at a time, so requests arriving meanwhile form the next batch.
    """

    def __init__(self, run: Callable[[Feeds], Outputs], max_batch: int = 8, max_delay_ms: float = 5.0) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.batches_run = 0  # for tests and logs: how many session runs served how many jobs
        self.jobs_run = 0
        self.samples_run = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._held: _Job | None = None  # a job that did not fit the batch being formed
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-gradcam-batch")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    async def submit(self, feeds: Feeds) -> Outputs:
        """This request's output rows; cancelling the await (a timeout) drops the job if not yet run."""
        assert self._queue is not None, "Batcher.start() was not called"
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        n = len(next(iter(feeds.values())))
        await self._queue.put(_Job(feeds, n, _key(feeds), future))
        return await future

    async def _next(self, timeout: float | None) -> _Job | None:
        assert self._queue is not None
        if self._held is not None:
            job, self._held = self._held, None
            return job
        if timeout is None:
            return await self._queue.get()
        # not asyncio.wait_for: on Python < 3.12 it can drop an item that arrives as the timeout fires
        getter = asyncio.ensure_future(self._queue.get())
        await asyncio.wait({getter}, timeout=max(timeout, 0.0))
        if not getter.done():
            getter.cancel()  # Queue.get leaves the item queued when cancelled before it takes it
        try:
            return await getter
        except asyncio.CancelledError:
            return None

    async def _gather(self) -> list[_Job]:
        """The next batch: the first live job, then compatible ones until full or the delay passes."""
        first = await self._next(None)
        while first is None or first.future.done():  # a timed-out job waiting in the queue
            first = await self._next(None)
        batch, total = [first], first.n
        deadline = time.monotonic() + self.max_delay
        while total < self.max_batch:
            job = await self._next(deadline - time.monotonic())
            if job is None:
                break
            if job.future.done():
                continue
            if job.key != first.key or total + job.n > self.max_batch:
                self._held = job
                break
            batch.append(job)
            total += job.n
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            live = [j for j in batch if not j.future.done()]
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._pool, self._run_split, live)
            except Exception as exc:  # noqa: BLE001 - handed to each request, which reports it
                results = [exc] * len(live)
            for job, result in zip(live, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _run_split(self, jobs: list[_Job]) -> list[Outputs | Exception]:
        """One run for all jobs, split back by rows; if it fails, each job alone (one bad request
        must not fail the others)."""
        self.batches_run += 1
        self.jobs_run += len(jobs)
        self.samples_run += sum(j.n for j in jobs)
        if len(jobs) == 1:
            return [self._run_one(jobs[0].feeds)]
        feeds = {k: np.concatenate([j.feeds[k] for j in jobs]) for k in jobs[0].feeds}
        try:
            out = self.run(feeds)
        except Exception:  # noqa: BLE001 - retried one by one below
            return [self._run_one(j.feeds) for j in jobs]
        parts: list[Outputs | Exception] = []
        start = 0
        for j in jobs:
            parts.append({k: v[start : start + j.n] for k, v in out.items()})
            start += j.n
        return parts

    def _run_one(self, feeds: Feeds) -> Outputs | Exception:
        try:
            return self.run(feeds)
        except Exception as exc:  # noqa: BLE001 - returned to the request
            return exc
