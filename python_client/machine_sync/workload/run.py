"""The concurrent workload: writers with faults, a reader sampling drift."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import psycopg

from machine_sync.errors import MachineSyncError

from .db import ProcessIds, connect, drift, machine_drifts, schema_of
from .events import (
    Conn,
    Event,
    Refused,
    Schema,
    WritePath,
    error_name,
)
from .faults import Fault, FaultInjector


@dataclass
class EventStats:
    """What happened to one kind of event during a run."""

    attempted: int = 0
    applied: int = 0
    refused: int = 0  # the path declined (machine busy, not its run)
    failed: int = 0  # an error reached the caller (faults, timeouts, deadlocks)
    faulted: int = 0  # a planned fault hit this event's second write
    left_drift: int = 0  # the tables disagreed right after the event (refused: not checked)
    left_drift_unfaulted: int = 0  # ... although no fault hit it

    def add(self, other: EventStats) -> None:
        """Accumulate ``other`` into this."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class WorkloadResult:
    """The outcome of :func:`run_workload`."""

    path: str
    schema: Schema
    writers: int
    machines: int
    seconds: float
    events: dict[str, EventStats]
    faults: Counter[str]
    errors: Counter[str]
    reconnects: int
    double_starts: int
    drift: Counter[str]  # machines drifting at the end, by problem
    peak_reader_drift: int  # most drifting machines a concurrent reader saw at once
    reader_samples: int

    @property
    def drifted_machines(self) -> int:
        """Machines whose two rows disagree at the end of the run."""
        return sum(self.drift.values())

    @property
    def drift_pct(self) -> float:
        """Drifted machines as a share of the workload's machines, in percent."""
        return 100.0 * self.drifted_machines / self.machines if self.machines else 0.0

    @property
    def total(self) -> EventStats:
        """All event kinds together."""
        total = EventStats()
        for stats in self.events.values():
            total.add(stats)
        return total

    def to_json(self) -> dict[str, Any]:
        """A plain-data summary."""
        total = self.total
        return {
            "path": self.path,
            "schema": self.schema,
            "writers": self.writers,
            "machines": self.machines,
            "seconds": round(self.seconds, 3),
            "events": total.attempted,
            "state_changes": total.applied,
            "refused": total.refused,
            "failed": total.failed,
            "events_left_drift": total.left_drift,
            "events_left_drift_unfaulted": total.left_drift_unfaulted,
            "faults": dict(self.faults),
            "errors": dict(self.errors),
            "reconnects": self.reconnects,
            "double_starts": self.double_starts,
            "drifted_machines": self.drifted_machines,
            "drift_pct": round(self.drift_pct, 1),
            "drift_by_problem": dict(self.drift),
            "peak_reader_drift": self.peak_reader_drift,
            "reader_samples": self.reader_samples,
            "peak_reader_drift_pct": round(100.0 * self.peak_reader_drift / self.machines, 1)
            if self.machines
            else 0.0,
            "by_event": {kind: vars(stats) for kind, stats in self.events.items()},
        }


@dataclass
class WorkloadConfig:
    """Knobs of :func:`run_workload`."""

    seconds: float = 5.0
    writers: int = 4
    fault_every: int = 8  # every n-th event of a writer has its second write faulted
    statement_timeout_ms: int = 50
    recipe_ms: float = 2.0  # how long a run lasts between start and finish, at most
    seed: int = 1
    faults: tuple[Fault, ...] = (Fault.KILLED, Fault.TIMEOUT)
    # Each writer runs at least this many events, however short ``seconds``:
    # with the defaults that plans two faults of each kind per writer.
    min_events: int = 32


@dataclass
class _SharedByWriters:
    """State every writer of one run shares."""

    conninfo: str
    schema: Schema
    path: WritePath
    machines: list[uuid.UUID]
    processes: ProcessIds
    config: WorkloadConfig
    deadline: float
    stop: threading.Event  # set when the run must end now
    runs: _RunOwners


class _RunOwners:
    """Which runs believe they own each machine, to count double starts.

    A run lives from its start's commit until any finish or reset of its
    machine commits. Finishes and resets hold the machine's lock across their
    writes, and a start registers only if no finish or reset came between its
    beginning and its registration, so a run is never counted against one
    that had already ended: the client path, which cannot double-start, must
    count zero.
    """

    def __init__(self, machines: Sequence[uuid.UUID]) -> None:
        self._locks = {machine: threading.Lock() for machine in machines}
        self._epoch = dict.fromkeys(machines, 0)
        self._live: dict[uuid.UUID, set[uuid.UUID]] = {machine: set() for machine in machines}
        self.double_starts = 0

    def epoch(self, machine: uuid.UUID) -> int:
        """Call before a start; pass the value to :meth:`started`."""
        with self._locks[machine]:
            return self._epoch[machine]

    def started(self, machine: uuid.UUID, process: uuid.UUID, epoch: int) -> None:
        """A start of ``process`` committed."""
        with self._locks[machine]:
            if epoch != self._epoch[machine]:
                return  # a finish or reset already ended this run
            if self._live[machine]:
                self.double_starts += 1  # two runs believe they own one machine
            self._live[machine].add(process)

    def running(self, machine: uuid.UUID) -> bool:
        """True while a run we know of owns ``machine``."""
        with self._locks[machine]:
            return bool(self._live[machine])

    @contextmanager
    def ending(self, machine: uuid.UUID) -> Iterator[None]:
        """Wrap a finish or reset: whatever it achieved, no run is live after it."""
        with self._locks[machine]:
            try:
                yield
            finally:
                self._live[machine].clear()
                self._epoch[machine] += 1


class _Writer:
    """One writer thread: runs recipes on random machines until the deadline."""

    def __init__(self, shared: _SharedByWriters, index: int) -> None:
        self.shared = shared
        self.index = index
        self.rng = random.Random(shared.config.seed * 1000 + index)
        self.events: dict[str, EventStats] = {kind.value: EventStats() for kind in Event}
        self.faults: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.reconnects = 0
        self.count = 0
        self.pending: Fault | None = None
        self.error: BaseException | None = None
        self.conn: Conn | None = None
        self.probe: Conn | None = None
        self.injector = FaultInjector(shared.conninfo)
        self.thread = threading.Thread(target=self._main, name=f"writer-{index}", daemon=True)

    def _connect(self) -> Conn:
        return connect(
            self.shared.conninfo,
            statement_timeout_ms=self.shared.config.statement_timeout_ms,
            name="machine-sync writer",
        )

    def _main(self) -> None:
        try:
            self.conn = self._connect()
            self.probe = connect(self.shared.conninfo, name="machine-sync probe")
            minimum = self.shared.config.min_events
            while not self.shared.stop.is_set():
                if time.monotonic() >= self.shared.deadline and self.count >= minimum:
                    break
                self._recipe()
        except BaseException as exc:  # reported by run_workload, never swallowed
            self.error = exc
        finally:
            for conn in (self.conn, self.probe):
                if conn is not None:
                    conn.close()
            self.injector.close()

    def _recipe(self) -> None:
        shared, runs = self.shared, self.shared.runs
        machine = self.rng.choice(shared.machines)
        process = shared.processes.take()
        epoch = runs.epoch(machine)
        started = self._event(Event.START, machine, process)
        if started is None:
            # Refused: a run owns the machine, or it is stuck (a stop or a
            # failure left it neither idle nor running anything we know of).
            if not runs.running(machine):
                with runs.ending(machine):
                    self._event(Event.RESET, machine, None)
            return
        if not started:
            return  # the service gives up on this recipe; a stuck machine gets reset later
        runs.started(machine, process, epoch)
        time.sleep(self.rng.uniform(0, shared.config.recipe_ms) / 1000)
        finish = self.rng.choices((Event.COMPLETE, Event.ERROR, Event.STOP), (70, 15, 15))[0]
        with runs.ending(machine):
            self._event(finish, machine, process)
        if finish is Event.ERROR:
            with runs.ending(machine):
                self._event(Event.RESET, machine, None)

    def _event(self, kind: Event, machine: uuid.UUID, process: uuid.UUID | None) -> bool | None:
        """Run one event; True applied, False failed, None refused."""
        stats = self.events[kind.value]
        stats.attempted += 1
        self.count += 1
        config = self.shared.config
        if self.pending is None and (self.count + self.index) % config.fault_every == 0:
            self.pending = config.faults[(self.count // config.fault_every) % len(config.faults)]
        armed: list[Fault] = []

        @contextmanager
        def second(table: str) -> Iterator[None]:
            fault = self.pending
            if fault is None:
                yield
                return
            assert self.conn is not None
            with self.injector.inject(fault, self.conn, machine, table) as held:
                if held:
                    armed.append(fault)
                yield

        path, conn = self.shared.path, self.conn
        assert conn is not None
        outcome: bool | None
        try:
            if kind is Event.RESET:
                path.reset(conn, machine, second)
            else:
                assert process is not None
                getattr(path, kind.value)(conn, machine, process, second)
            outcome = True
            stats.applied += 1
        except Refused:
            outcome = None
            stats.refused += 1
        except (psycopg.Error, MachineSyncError) as exc:
            outcome = False
            stats.failed += 1
            self.errors[error_name(exc)] += 1
            if armed:
                # The planned fault happened (or something worse did): spent.
                stats.faulted += 1
                self.faults[armed[0].value] += 1
                self.pending = None
        if conn.broken or conn.closed:
            self.conn = self._connect()  # the service reconnects and carries on
            self.reconnects += 1
        assert self.probe is not None
        # A refused event wrote nothing: whatever the probe saw was there before.
        if outcome is not None and machine_drifts(self.probe, self.shared.schema, machine):
            stats.left_drift += 1
            stats.left_drift_unfaulted += not armed
        return outcome


class _Reader:
    """A dashboard: keeps counting drifting machines while the writers work."""

    def __init__(self, conninfo: str, schema: Schema, machines: list[uuid.UUID]) -> None:
        self.conninfo, self.schema, self.machines = conninfo, schema, machines
        self.peak = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._main, name="reader", daemon=True)

    def _main(self) -> None:
        with suppress(psycopg.Error), connect(self.conninfo, name="machine-sync reader") as conn:
            while not self.stop.wait(0.02):
                now = sum(drift(conn, self.schema, self.machines).values())
                self.peak = max(self.peak, now)
                self.samples += 1


Progress = Callable[[float, EventStats], None]


def run_workload(
    conninfo: str,
    path: WritePath,
    machines: list[uuid.UUID],
    config: WorkloadConfig,
    *,
    abort: threading.Event | None = None,
    progress: Progress | None = None,
) -> WorkloadResult:
    """Run concurrent writers over ``machines`` with faults; report the drift made.

    Setting ``abort`` (or a KeyboardInterrupt in the calling thread) stops the
    writers within one statement timeout; they are always joined before this
    returns or raises.
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        schema = schema_of(conn)
    stop = threading.Event()  # ours: the caller's ``abort`` is only read
    shared = _SharedByWriters(
        conninfo=conninfo,
        schema=schema,
        path=path,
        machines=list(machines),
        processes=ProcessIds(conninfo),
        config=config,
        deadline=time.monotonic() + config.seconds,
        stop=stop,
        runs=_RunOwners(machines),
    )
    writers = [_Writer(shared, index) for index in range(config.writers)]
    reader = _Reader(conninfo, schema, shared.machines)
    began = time.monotonic()
    try:
        reader.thread.start()
        for writer in writers:
            writer.thread.start()
        while any(writer.thread.is_alive() for writer in writers):
            if abort is not None and abort.is_set():
                raise KeyboardInterrupt
            for writer in writers:
                writer.thread.join(timeout=0.1)
            if progress is not None:
                progress(time.monotonic() - began, _sum(w.events for w in writers))
    finally:
        stop.set()  # a no-op after a normal end; stops the writers after an interrupt
        for writer in writers:
            writer.thread.join()
        reader.stop.set()
        reader.thread.join()
    seconds = time.monotonic() - began
    for writer in writers:
        if writer.error is not None:
            raise writer.error
    events: dict[str, EventStats] = {kind.value: EventStats() for kind in Event}
    faults: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for writer in writers:
        for kind, stats in writer.events.items():
            events[kind].add(stats)
        faults.update(writer.faults)
        errors.update(writer.errors)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        final = drift(conn, schema, shared.machines)
    return WorkloadResult(
        path=path.name,
        schema=schema,
        writers=config.writers,
        machines=len(shared.machines),
        seconds=seconds,
        events=events,
        faults=faults,
        errors=errors,
        reconnects=sum(writer.reconnects for writer in writers),
        double_starts=shared.runs.double_starts,
        drift=final,
        peak_reader_drift=reader.peak,
        reader_samples=reader.samples,
    )


def _sum(groups: Iterator[dict[str, EventStats]]) -> EventStats:
    total = EventStats()
    for group in groups:
        for stats in group.values():
            total.add(stats)
    return total
