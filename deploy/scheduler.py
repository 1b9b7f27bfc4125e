"""Continuous batching for one language model (torch-free): a thread owns the ONNX Runtime session
and, step after step, advances every active sequence together.

A request (a ``Job``) is one or more rows (its choices). Between two session calls the scheduler
ends the rows of cancelled and timed-out jobs and lets queued rows join (their prompts are
prefilled in one call of their own and merged into a batch cache); then it runs one decode step.
Active rows sit in groups of at most ``batch_rows`` (each a ``DecodeBatch``) that take turns, one
call per group: on a CPU a group of 8 keeps most of the batching gain, and a new prompt waits for
one short call instead of a step over every row. Finished rows leave at once and free their slot.
Events go to each job's ``emit`` callback from the scheduler thread, one list per call::

    ("piece", index, text)                  text released for choice ``index``
    ("end", index, finish_reason, tokens)   choice ``index`` finished; tokens = its completion tokens
    ("done",)                               every choice has ended
    ("timeout",) | ("error", message)       the job ended early; no more events follow
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from deploy.runtime import DecodeBatch, OnnxLM, Row

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full: the server answers 503 with Retry-After."""


class Closed(Exception):
    """This scheduler takes no new work (its model was replaced or the server is stopping)."""


class Job:
    """One request: its rows (choice i is ``rows[i]``), its deadline and where its events go."""

    def __init__(self, rows: list[Row], deadline: float, emit: Callable[[list[tuple]], None]):
        self.rows, self.deadline, self.emit = rows, deadline, emit
        self.waiting = list(rows)  # rows not yet in the batch
        self.remaining = len(rows)  # rows not yet ended
        self.cancelled = False
        self.cancel_step: int | None = None  # scheduler step at which cancel() was called
        self.ended = False


class Scheduler:
    """Owns ``lm``'s session: at most ``max_active`` rows decode together, ``max_queued`` jobs wait."""

    def __init__(
        self, lm: OnnxLM, max_active: int = 32, max_queued: int = 32, name: str = "lm", batch_rows: int = 0
    ):
        if max_active < 1 or max_queued < 0 or batch_rows < 0:
            raise ValueError(
                f"max_active={max_active} must be >= 1, max_queued={max_queued} and batch_rows={batch_rows} >= 0"
            )
        self.lm, self.max_active, self.max_queued = lm, max_active, max_queued
        # Active rows decode in groups of at most batch_rows, one session call per group in turn:
        # a new prompt waits for one short call rather than a step over every row (0 = one group).
        self.batch_rows = min(batch_rows or max_active, max_active)
        self.batches = [DecodeBatch(lm) for _ in range(-(-max_active // self.batch_rows))]
        self._turn = 0
        self._cv = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()  # jobs with rows waiting to join
        self._live: list[Job] = []  # admitted jobs that have not ended
        self._owner: dict[int, tuple[Job, int]] = {}  # id(row) -> (job, choice index)
        self._closing = False
        self._abort = False
        self.steps = 0  # loop iterations that ran the model
        self.counts = dict.fromkeys(
            ("admitted", "rejected", "completed", "cancelled", "timed_out", "failed"), 0
        )
        self.free_lag_max = 0  # most steps between a cancel() and its rows leaving the batch
        self.peak_active = 0  # most rows that decoded together
        self._thread = threading.Thread(target=self._loop, name=f"gptflow-scheduler-{name}", daemon=True)
        self._thread.start()

    # Called from other threads -----------------------------------------------------------------

    def submit(self, rows: list[Row], deadline: float, emit: Callable[[list[tuple]], None]) -> Job:
        """Queue a job; raises Overloaded when ``max_queued`` jobs already wait, Closed after close()."""
        with self._cv:
            if self._closing:
                raise Closed
            must_wait = bool(self._queue) or self.active + len(rows) > self.max_active
            if must_wait and len(self._queue) >= self.max_queued:
                self.counts["rejected"] += 1
                raise Overloaded
            job = Job(rows, deadline, emit)
            for i, row in enumerate(rows):
                self._owner[id(row)] = (job, i)
            self._queue.append(job)
            self._live.append(job)
            self.counts["admitted"] += 1
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: the job's rows leave at the next step boundary."""
        with self._cv:
            if not job.cancelled and not job.ended:
                job.cancelled, job.cancel_step = True, self.steps
                self._cv.notify()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {
                "active": self.active,
                "queued": len(self._queue),
                "max_active": self.max_active,
                "max_queued": self.max_queued,
                "batch_rows": self.batch_rows,
                "steps": self.steps,
                **self.counts,
                "free_lag_steps_max": self.free_lag_max,
                "peak_active": self.peak_active,
            }

    def close(self, wait: float | None = None) -> None:
        """Take no new jobs; the thread ends once the running and queued ones have finished."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if wait is not None:
            self._thread.join(wait)

    def shutdown(self) -> None:
        """Stop now: every unfinished job ends with an error event."""
        with self._cv:
            self._closing = self._abort = True
            self._cv.notify()
        self._thread.join(10)

    @property
    def active(self) -> int:
        return sum(len(b.rows) for b in self.batches)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # The scheduler thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._live and not self._closing:
                    self._cv.wait()
                if self._abort:
                    for job in list(self._live):
                        self._end_job(job, ("error", "the server is shutting down"))
                    return
                if self._closing and not self._live:
                    return
                self._expire()
                joins = self._admit()
                batch = self._next_batch(joins)
            for target, rows in joins:
                self._guarded(target, rows, functools.partial(target.join, rows))
            if batch is not None and batch.rows:
                self.peak_active = max(self.peak_active, self.active)
                self._guarded(batch, list(batch.rows), batch.step)
            with self._cv:
                self.steps += 1
                if not self._live:
                    self._owner.clear()

    def _next_batch(self, joins: list[tuple[DecodeBatch, list[Row]]]) -> DecodeBatch | None:
        """The group to step now: the next one in turn with rows (or rows about to join)."""
        joining = {id(b) for b, _ in joins}
        for _ in range(len(self.batches)):
            batch = self.batches[self._turn]
            self._turn = (self._turn + 1) % len(self.batches)
            if batch.rows or id(batch) in joining:
                return batch
        return None

    def _guarded(self, batch: DecodeBatch, rows: list[Row], call: Callable[[], list]) -> None:
        """Run a session call and dispatch its results; a failed call ends the jobs of its rows."""
        try:
            self._dispatch(call())
        except Exception as e:
            log.exception("decode call failed")
            with self._cv:
                for row in list(rows) + list(batch.rows):
                    owner = self._owner.get(id(row))
                    if owner is not None and not owner[0].ended:
                        self.counts["failed"] += 1
                        self._end_job(owner[0], ("error", f"generation failed: {type(e).__name__}"))
                batch.drop(list(batch.rows))

    def _expire(self) -> None:
        """End cancelled and timed-out jobs (under the lock): their rows leave the batch now."""
        now = time.monotonic()
        for job in list(self._live):
            if job.cancelled:
                self.counts["cancelled"] += 1
                self.free_lag_max = max(self.free_lag_max, self.steps - (job.cancel_step or self.steps))
                self._end_job(job, None)
            elif now > job.deadline:
                self.counts["timed_out"] += 1
                self._end_job(job, ("timeout",))

    def _end_job(self, job: Job, event: tuple | None) -> None:
        for row in job.rows:
            row.end("cancelled" if event is None else event[0])
        for batch in self.batches:
            batch.drop(job.rows)
        if job in self._queue:
            self._queue.remove(job)
        job.ended = True
        self._live.remove(job)
        for row in job.rows:
            self._owner.pop(id(row), None)
        if event is not None:
            job.emit([event])

    def _admit(self) -> list[tuple[DecodeBatch, list[Row]]]:
        """Rows of queued jobs, first come first served, while slots are free, each to the group with
        the fewest rows (under the lock)."""
        sizes = [len(b.rows) for b in self.batches]
        joins: dict[int, list[Row]] = {}
        while self._queue and sum(sizes) < self.max_active:
            job = self._queue[0]
            while job.waiting and sum(sizes) < self.max_active:
                g = min(range(len(sizes)), key=sizes.__getitem__)
                if sizes[g] >= self.batch_rows:
                    break
                joins.setdefault(g, []).append(job.waiting.pop(0))
                sizes[g] += 1
            if job.waiting:
                break
            self._queue.popleft()
        return [(self.batches[g], rows) for g, rows in joins.items()]

    def _dispatch(self, results: list[tuple[Row, str]]) -> None:
        """Turn a step's (row, text) pairs into one event list per job."""
        per_job: dict[int, tuple[Job, list[tuple]]] = {}
        with self._cv:
            for row, piece in results:
                owner = self._owner.get(id(row))
                if owner is None:
                    continue
                job, index = owner
                events = per_job.setdefault(id(job), (job, []))[1]
                if piece:
                    events.append(("piece", index, piece))
                if row.done:
                    events.append(("end", index, row.finish_reason, row.completion_tokens))
                    job.remaining -= 1
                    if job.remaining == 0:
                        events.append(("done",))
                        job.ended = True
                        self._live.remove(job)
                        self.counts["completed"] += 1
                        for r in job.rows:
                            self._owner.pop(id(r), None)
        for job, events in per_job.values():
            job.emit(events)
