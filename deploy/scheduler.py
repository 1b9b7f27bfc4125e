"""Continuous batching for one language model (torch-free): a thread owns the ONNX Runtime session
and, step after step, advances every active sequence together.

A request (a ``Job``) is one or more rows (its choices). Between two steps the scheduler ends the
rows of cancelled and timed-out jobs, lets queued rows join (their prompts are prefilled in one call
of their own and merged into the batch cache), then runs one decode step for every row; finished
rows leave at once and free their slot. Events go to each job's ``emit`` callback from the
scheduler thread, one list per step::

    ("piece", index, text)                  text released for choice ``index``
    ("end", index, finish_reason, tokens)   choice ``index`` finished; tokens = its completion tokens
    ("done",)                               every choice has ended
    ("timeout",) | ("error", message)       the job ended early; no more events follow
"""

from __future__ import annotations

import collections
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

    def __init__(self, lm: OnnxLM, max_active: int = 32, max_queued: int = 32, name: str = "lm"):
        if max_active < 1 or max_queued < 0:
            raise ValueError(f"max_active={max_active} must be >= 1 and max_queued={max_queued} >= 0")
        self.lm, self.max_active, self.max_queued = lm, max_active, max_queued
        self.batch = DecodeBatch(lm)
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
            must_wait = bool(self._queue) or len(self.batch.rows) + len(rows) > self.max_active
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
                "active": len(self.batch.rows),
                "queued": len(self._queue),
                "max_active": self.max_active,
                "max_queued": self.max_queued,
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
                joining = self._admit()
            try:
                if joining:
                    self._dispatch(self.batch.join(joining))
                if self.batch.rows:
                    self.peak_active = max(self.peak_active, len(self.batch.rows))
                    self._dispatch(self.batch.step())
            except Exception as e:  # a failed session call: the rows in it cannot continue
                log.exception("decode step failed")
                with self._cv:
                    for job in [j for j in self._live if any(self._in_batch(r) for r in j.rows)] + [
                        self._owner[id(r)][0] for r in joining if id(r) in self._owner
                    ]:
                        if not job.ended:
                            self.counts["failed"] += 1
                            self._end_job(job, ("error", f"generation failed: {type(e).__name__}"))
                    self.batch = DecodeBatch(self.lm)
            with self._cv:
                self.steps += 1
                if not self._live:
                    self._owner.clear()

    def _in_batch(self, row: Row) -> bool:
        return any(r is row for r in self.batch.rows)

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
        self.batch.drop(job.rows)
        if job in self._queue:
            self._queue.remove(job)
        job.ended = True
        self._live.remove(job)
        for row in job.rows:
            self._owner.pop(id(row), None)
        if event is not None:
            job.emit([event])

    def _admit(self) -> list[Row]:
        """Rows of queued jobs, first come first served, while slots are free (under the lock)."""
        room = self.max_active - len(self.batch.rows)
        joining: list[Row] = []
        while room > 0 and self._queue:
            job = self._queue[0]
            take, job.waiting = job.waiting[:room], job.waiting[room:]
            joining += take
            room -= len(take)
            if not job.waiting:
                self._queue.popleft()
        return joining

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
