"""The continuous-batching scheduler (deploy/scheduler.py) without HTTP: rows that join a running
batch, leave it early or slide their window give the tokens they would give alone; the bounds hold;
cancelled and timed-out jobs leave at the next step."""

from __future__ import annotations

import threading
import time

import pytest
from lm_fixtures import random_lm_checkpoint

from deploy.runtime import GenerationConfig, load_bundle
from deploy.scheduler import Overloaded, Scheduler
from gpt.export import ExportConfig, export_bundle

PROMPTS = ["The quick brown fox", "Markets", "sea shells by the", "", "news of the day"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched")
    random_lm_checkpoint(root, seed=2, pos_encoding="rope")
    export_bundle(root / "ckpt", root / "bundle", ExportConfig(greedy_tokens=0, parity_decode_steps=4))
    return load_bundle(root / "bundle")


class Collector:
    """A job's events, and an Event set when its last one arrives."""

    def __init__(self):
        self.events, self.finished = [], threading.Event()

    def __call__(self, events):
        self.events += events
        if any(e[0] in ("done", "timeout", "error") for e in events):
            self.finished.set()

    def texts(self, n):
        out = [""] * n
        for e in self.events:
            if e[0] == "piece":
                out[e[1]] += e[2]
        return out

    def ends(self):
        return {e[1]: (e[2], e[3]) for e in self.events if e[0] == "end"}


class Gated:
    """The LM with every session call held until ``gate`` is set (and ``delay`` seconds long)."""

    def __init__(self, lm, delay=0.0):
        self.lm, self.delay, self.gate = lm, delay, threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def _forward(self, *args, **kwargs):
        self.gate.wait(30)
        time.sleep(self.delay)
        return self.lm._forward(*args, **kwargs)


def submit(sched, lm, prompt, cfg, n=1, deadline=60.0):
    out = Collector()
    ids = lm._prompt_ids(prompt)
    rows = [lm.new_row(ids, cfg, choice=i) for i in range(n)]
    return sched.submit(rows, time.monotonic() + deadline, out), out


def wait_until(predicate, timeout=10.0):
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        time.sleep(0.005)


@pytest.mark.parametrize("batch_rows", [0, 2])  # one group; groups of two taking turns
def test_rows_joining_a_running_batch_give_the_tokens_they_give_alone(lm, batch_rows):
    slow = Gated(lm, delay=0.005)
    sched = Scheduler(slow, max_active=8, max_queued=8, batch_rows=batch_rows)
    try:
        long = GenerationConfig(max_new_tokens=40, ignore_eos=True)
        first, a = submit(sched, lm, PROMPTS[0], long)
        wait_until(lambda: sched.stats()["steps"] >= 5)  # the first row is mid-generation
        later = [
            submit(sched, lm, p, GenerationConfig(max_new_tokens=12 + 3 * i))
            for i, p in enumerate(PROMPTS[1:])
        ]
        seeded = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=4)
        _, s = submit(sched, lm, PROMPTS[2], seeded, n=3)
        for out in [a, s] + [o for _, o in later]:
            assert out.finished.wait(30)
        assert a.texts(1)[0] == lm.generate(PROMPTS[0], long)[0].text
        for i, (p, (_, out)) in enumerate(zip(PROMPTS[1:], later, strict=True)):
            alone = lm.generate(p, GenerationConfig(max_new_tokens=12 + 3 * i))[0]
            assert out.texts(1)[0] == alone.text
            assert out.ends()[0] == (alone.finish_reason, alone.completion_tokens)
        want = lm.generate([PROMPTS[2]] * 3, seeded)
        assert s.texts(3) == [g.text for g in want] and len(set(s.texts(3))) == 3
        assert sched.stats()["peak_active"] > 1  # they did decode together
    finally:
        sched.shutdown()


def test_sliding_rows_in_a_batch_give_their_alone_tokens(lm):
    sched = Scheduler(lm, max_active=4, max_queued=4)
    try:
        cfg = GenerationConfig(max_new_tokens=90, context_policy="sliding", ignore_eos=True)
        short = GenerationConfig(max_new_tokens=30, context_policy="sliding", ignore_eos=True)
        jobs = [submit(sched, lm, PROMPTS[0], cfg), submit(sched, lm, PROMPTS[1], short)]
        for _, out in jobs:
            assert out.finished.wait(30)
        assert jobs[0][1].texts(1)[0] == lm.generate(PROMPTS[0], cfg)[0].text  # past the 64-token window
        assert jobs[1][1].texts(1)[0] == lm.generate(PROMPTS[1], short)[0].text
    finally:
        sched.shutdown()


def test_active_rows_and_queued_jobs_stay_within_their_bounds(lm):
    gated = Gated(lm)
    gated.gate.clear()
    sched = Scheduler(gated, max_active=2, max_queued=2)
    try:
        cfg = GenerationConfig(max_new_tokens=6)
        jobs = [submit(sched, lm, PROMPTS[0], cfg)]
        wait_until(lambda: sched.stats()["queued"] == 0)  # its row is joining (held at the gate)
        jobs += [submit(sched, lm, PROMPTS[1], cfg, n=2), submit(sched, lm, PROMPTS[2], cfg)]
        with pytest.raises(Overloaded):
            submit(sched, lm, PROMPTS[3], cfg)
        gated.gate.set()
        for _, out in jobs:
            assert out.finished.wait(30)
        stats = sched.stats()
        assert stats["peak_active"] == 2 and stats["rejected"] == 1 and stats["completed"] == 3
    finally:
        sched.shutdown()


def test_cancelled_and_timed_out_jobs_leave_at_the_next_step(lm):
    slow = Gated(lm, delay=0.01)
    sched = Scheduler(slow, max_active=1, max_queued=4)
    try:
        cfg = GenerationConfig(max_new_tokens=2000, context_policy="sliding", ignore_eos=True)
        running, out = submit(sched, lm, PROMPTS[0], cfg)
        queued, never = submit(sched, lm, PROMPTS[1], cfg, deadline=0.2)  # waits behind the first, times out
        assert never.finished.wait(5) and never.events == [("timeout",)]
        wait_until(lambda: any(e[0] == "piece" for e in out.events))
        sched.cancel(running)
        wait_until(lambda: sched.stats()["cancelled"] == 1)
        stats = sched.stats()
        assert stats["active"] == 0 and stats["free_lag_steps_max"] <= 1 and stats["timed_out"] == 1
        assert not any(e[0] in ("end", "done") for e in out.events)
    finally:
        sched.shutdown()


def test_close_finishes_running_work_then_stops(lm):
    sched = Scheduler(lm, max_active=2, max_queued=2)
    _, out = submit(sched, lm, PROMPTS[0], GenerationConfig(max_new_tokens=20))
    sched.close(wait=10)
    assert out.finished.is_set() and not sched.running
