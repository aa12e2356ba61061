"""Interleaved throughput: state changes per second of several targets (an A/B run)."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import psycopg

from machine_sync.benchmark.engine import run_writers
from machine_sync.errors import MachineSyncError

from .db import ProcessIds, connect
from .events import (
    Conn,
    Refused,
    WritePath,
)
from .faults import no_fault
from .wire import SCRIPT, play_script


@dataclass
class Target:
    """One side of an A/B run: a write path on a database, on its own machines."""

    label: str
    conninfo: str
    path: WritePath
    machines: list[uuid.UUID]  # one per writer: no contention, no refusals


@dataclass
class ThroughputResult:
    """State changes per second of each target, measured in alternating slices."""

    rounds: int
    slice_seconds: float
    writers: int
    changes: dict[str, int]
    seconds: dict[str, float]
    errors: dict[str, int]
    per_round: list[dict[str, float]]  # state changes per second, per round and target

    def rate(self, label: str) -> float:
        """State changes per second of ``label`` over all its slices."""
        return self.changes[label] / self.seconds[label] if self.seconds[label] else 0.0

    def ratio(self, label: str, baseline: str) -> float:
        """How many times ``baseline``'s throughput ``label`` reached."""
        base = self.rate(baseline)
        return self.rate(label) / base if base else 0.0

    def round_ratios(self, label: str, baseline: str) -> list[float]:
        """The same ratio, round by round (its spread shows the noise)."""
        return [r[label] / r[baseline] for r in self.per_round if r[baseline]]

    def to_json(self, baseline: str) -> dict[str, Any]:
        """A plain-data summary, ratios against ``baseline``."""
        return {
            "rounds": self.rounds,
            "slice_seconds": round(self.slice_seconds, 3),
            "writers": self.writers,
            "per_second": {label: round(self.rate(label), 1) for label in self.changes},
            "state_changes": dict(self.changes),
            "errors": dict(self.errors),
            "ratio_vs_" + baseline: {
                label: round(self.ratio(label, baseline), 2) for label in self.changes
            },
            "round_ratios_vs_" + baseline: {
                label: [round(r, 2) for r in self.round_ratios(label, baseline)]
                for label in self.changes
            },
        }


def _slice(
    target: Target, conns: list[Conn], processes: ProcessIds, seconds: float
) -> tuple[int, float, int]:
    """Every writer plays the script on its own machine for ``seconds``."""

    def play(index: int, _number: int, tally: Counter[str]) -> int:
        conn, machine = conns[index], target.machines[index]
        try:
            return play_script(conn, target.path, machine, processes, SCRIPT)
        except (psycopg.Error, MachineSyncError, Refused):
            tally["errors"] += 1
            with suppress(psycopg.Error, MachineSyncError):
                target.path.reset(conn, machine, no_fault)
            return 0

    timed = run_writers(conns, seconds, play, what=f"A/B slice of {target.label}")
    return timed.changes, timed.seconds, timed.tally["errors"]


def interleaved_throughput(
    targets: Sequence[Target],
    *,
    rounds: int,
    slice_seconds: float,
    writers: int | None = None,
    abort: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
) -> ThroughputResult:
    """Alternate slices of each target, rotating the order every round.

    ``writers`` threads per target (default: one per machine of the smallest
    target), each on a machine of its own. Each keeps its connection for the
    whole run, so connecting is not measured; slices never overlap.
    """
    writers = min([len(t.machines) for t in targets] + ([writers] if writers else []))
    conns = {
        t.label: [connect(t.conninfo, name="machine-sync ab") for _ in range(writers)]
        for t in targets
    }
    processes = {t.label: ProcessIds(t.conninfo) for t in targets}
    changes = dict.fromkeys(conns, 0)
    seconds = dict.fromkeys(conns, 0.0)
    errors = dict.fromkeys(conns, 0)
    per_round: list[dict[str, float]] = []
    done = 0
    try:
        for number in range(rounds):
            order = list(targets[number % len(targets) :]) + list(targets[: number % len(targets)])
            rates: dict[str, float] = {}
            for target in order:
                if abort is not None and abort.is_set():
                    raise KeyboardInterrupt
                count, took, failed = _slice(
                    target, conns[target.label], processes[target.label], slice_seconds
                )
                changes[target.label] += count
                seconds[target.label] += took
                errors[target.label] += failed
                rates[target.label] = count / took if took else 0.0
                done += 1
                if progress is not None:
                    progress(done)
            per_round.append(rates)
    finally:
        for group in conns.values():
            for conn in group:
                conn.close()
    return ThroughputResult(rounds, slice_seconds, writers, changes, seconds, errors, per_round)
