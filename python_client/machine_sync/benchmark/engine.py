"""The one throughput engine: writers on connections of their own, started together.

Every rate the benchmark and the demo report comes from :func:`run_writers`:
one thread per connection, all released at once by a barrier, each calling
``step(writer, number, tally)`` until its time is up (or it has taken
``max_steps``). A step returns how many state changes it made; the rate is
their sum over the time from the first writer's start to the last one's end.
What a step counts besides (refusals, retries, errors) goes into its tally.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from .scratch import BenchError

#: ``step(writer, number, tally)`` -> state changes made; ``number`` counts from 1.
Step = Callable[[int, int, Counter[str]], int]


@dataclass(frozen=True)
class Timed:
    """What the writers did together."""

    changes: int  # state changes, all writers
    seconds: float  # first start to last end
    tally: Counter[str]  # what the steps counted besides, all writers

    @property
    def per_second(self) -> float:
        """State changes per second."""
        return self.changes / self.seconds if self.seconds > 0 else 0.0


def run_writers(
    conns: Sequence[psycopg.Connection[Any]],
    seconds: float,
    step: Step,
    *,
    what: str,
    max_steps: int | None = None,
    min_steps: int = 1,
    at_start: Callable[[], None] | None = None,
    at_end: Callable[[], None] | None = None,
    after: Callable[[psycopg.Connection[Any]], object] | None = None,
) -> Timed:
    """Run ``step`` on every connection at once for ``seconds``.

    Each writer takes at least ``min_steps`` steps however long they take,
    and at most ``max_steps``.

    ``at_start`` runs once when all writers are ready, ``at_end`` once when
    all have stopped (both before the clock of any writer starts or after it
    stops for all), ``after`` on each writer's connection after that. A
    writer's exception stops the others and is raised as :class:`BenchError`
    naming ``what``; Ctrl-C stops every writer after its current step.
    """
    n = len(conns)
    begin = threading.Barrier(n, action=at_start)
    end = threading.Barrier(n, action=at_end)
    stopping = threading.Event()
    results: list[tuple[int, float, float, Counter[str]] | BaseException] = [
        BenchError("not run")
    ] * n

    def writer(index: int) -> None:
        tally: Counter[str] = Counter()
        try:
            begin.wait()
            started = time.perf_counter()
            deadline = started + seconds
            changes = number = 0
            while not stopping.is_set():
                number += 1
                changes += step(index, number, tally)
                if number == max_steps or (number >= min_steps and time.perf_counter() >= deadline):
                    break
            finished = time.perf_counter()
            end.wait()
            if after is not None:
                after(conns[index])
            results[index] = (changes, started, finished, tally)
        except BaseException as err:  # reported by the main thread
            stopping.set()
            begin.abort()
            end.abort()
            results[index] = err

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(timeout=0.05)  # short joins: Ctrl-C reaches this thread
    finally:
        stopping.set()
        for thread in threads:
            thread.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        raise BenchError(f"{what} failed: {real[0] if real else errors[0]}")
    done = [r for r in results if not isinstance(r, BaseException)]
    tally: Counter[str] = Counter()
    for r in done:
        tally.update(r[3])
    elapsed = max(r[2] for r in done) - min(r[1] for r in done)
    return Timed(sum(r[0] for r in done), elapsed, tally)
