"""The recipe workload, written the legacy way and the machine-sync way, with faults.

A *write path* turns the five events of a recipe's life (start, complete,
error, stop and an operator's reset) into SQL:

* :class:`LegacyPath` is the production code of ``legacy-system.md``: two
  separate autocommit statements per event, in its order (error writes
  ``machine_state`` first), and a start that reads ``machines.status`` and
  checks it in Python before writing.
* :class:`ClientPath` is the same events through :mod:`machine_sync.client`:
  one ``UPDATE machines ... RETURNING`` each, compare-and-set.

:func:`run_workload` drives either path from concurrent writer threads against
a set of machines and injects *the same faults* into both: every few events a
writer's second write (legacy: the second statement; client: the
``machine_state`` write the mirror trigger makes inside the only statement)
is held up by a row lock another session holds, and then either the writer's
``statement_timeout`` fires or its connection is killed with
``pg_terminate_backend``. What it reports is whether the two tables disagree
afterwards, per event and at the end.

:func:`interleaved_throughput` measures state changes per second of several
targets in alternating slices (an A/B run), and :func:`count_round_trips`
counts statements and round trips per state change from libpq's own protocol
trace. Every SQL statement this module and the demo run is a named constant
below.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Literal, Protocol

import psycopg
from psycopg import sql

from machine_sync.client import Client
from machine_sync.errors import InvalidTransition, MachineSyncError

Conn = psycopg.Connection[Any]
Schema = Literal["legacy", "migrated"]
"""``legacy``: production before machine-sync; ``migrated``: after the migrations."""

# ---------------------------------------------------------------------------
# Queries. Every statement the workload and the demo send, in one place.

# The legacy call sites, exactly as legacy-system.md lists them. The client's
# clock goes into updated_at/state_since, as production's code does.
LEGACY_READ_STATUS: Final = "SELECT status FROM public.machines WHERE id = %(machine)s"
LEGACY_START_MACHINES: Final = """
UPDATE public.machines
SET status = 'processing', current_process_id = %(process)s, updated_at = %(now)s
WHERE id = %(machine)s
"""
LEGACY_START_STATE: Final = """
UPDATE public.machine_state
SET current_state = 'processing', process_id = %(process)s, state_since = %(now)s,
    is_failure_mode = false, failure_component = NULL, failure_description = NULL
WHERE machine_id = %(machine)s
"""
LEGACY_COMPLETE_MACHINES: Final = """
UPDATE public.machines SET status = 'idle', current_process_id = NULL WHERE id = %(machine)s
"""
LEGACY_COMPLETE_STATE: Final = """
UPDATE public.machine_state
SET current_state = 'idle', process_id = NULL, state_since = %(now)s, is_failure_mode = false
WHERE machine_id = %(machine)s
"""
LEGACY_ERROR_STATE: Final = """
UPDATE public.machine_state
SET current_state = 'error', is_failure_mode = true, failure_description = %(description)s
WHERE machine_id = %(machine)s
"""
LEGACY_ERROR_MACHINES: Final = """
UPDATE public.machines SET status = 'error', current_process_id = NULL WHERE id = %(machine)s
"""
LEGACY_STOP_MACHINES: Final = """
UPDATE public.machines SET current_process_id = NULL WHERE id = %(machine)s
"""
LEGACY_STOP_STATE: Final = """
UPDATE public.machine_state
SET current_state = 'idle', process_id = NULL, is_failure_mode = false
WHERE machine_id = %(machine)s
"""

# Setup: machines for the workload, each starting with an agreeing state row.
CREATE_MACHINES: Final = """
INSERT INTO public.machines (
    serial_number, location, lab_name, lab_institution, model, machine_type,
    install_date, last_maintenance_date, status, admin_id
)
SELECT
    %(prefix)s || lpad(n::text, 4, '0'), 'Bay ' || (1 + n %% 3), 'Thin Films Lab',
    'Example Institute', 'Savannah S200', 'ALD', timestamptz '2024-01-01 00:00+00',
    timestamptz '2026-06-01 00:00+00', 'idle', '00000000-0000-4000-b000-000000000001'
FROM generate_series(1, %(count)s) AS n
RETURNING id
"""
# On a migrated database the mirror already made the rows: this inserts none.
CREATE_MISSING_STATE_ROWS: Final = """
INSERT INTO public.machine_state (machine_id, current_state)
SELECT m.id, m.status
FROM public.machines AS m
WHERE m.id = ANY(%(ids)s)
    AND NOT EXISTS (SELECT FROM public.machine_state AS s WHERE s.machine_id = m.id)
"""
HAS_PROCESS_TABLE: Final = "SELECT to_regclass('public.process_executions') IS NOT NULL"
CREATE_PROCESSES: Final = """
INSERT INTO public.process_executions (recipe_name)
SELECT 'machine-sync workload' FROM generate_series(1, %(count)s)
RETURNING id
"""
SET_STATEMENT_TIMEOUT: Final = "SELECT set_config('statement_timeout', %(value)s, false)"
SET_LOCK_TIMEOUT: Final = "SELECT set_config('lock_timeout', %(value)s, false)"
SCHEMA_IS_MIGRATED: Final = "SELECT to_regclass('machine_sync.drift') IS NOT NULL"

# Fault injection: hold the row the second write needs, then kill its writer.
LOCK_STATE_ROW: Final = "SELECT FROM public.machine_state WHERE machine_id = %(machine)s FOR UPDATE"
LOCK_MACHINE_ROW: Final = "SELECT FROM public.machines WHERE id = %(machine)s FOR UPDATE"
IS_BLOCKING: Final = "SELECT pg_backend_pid() = ANY(pg_blocking_pids(%(victim)s))"
TERMINATE: Final = "SELECT pg_terminate_backend(%(victim)s)"

# Drift on a legacy database, where machine_sync.drift does not exist yet:
# the same problems in the same precedence as the view, over the three pairs
# a legacy machines row can express (status, process, failure mode).
LEGACY_DRIFT: Final = """
SELECT
    m.id AS machine_id,
    CASE
        WHEN s.machine_id IS NULL THEN 'missing_state'
        WHEN m.status <> s.current_state AND lower(m.status) = lower(s.current_state)
            THEN 'status_case'
        ELSE 'value_mismatch'
    END AS problem
FROM public.machines AS m
LEFT JOIN public.machine_state AS s ON s.machine_id = m.id
WHERE
    (%(ids)s::uuid[] IS NULL OR m.id = ANY(%(ids)s))
    AND (
        s.machine_id IS NULL
        OR (m.status, m.current_process_id, m.status = 'error')
        IS DISTINCT FROM (s.current_state::text, s.process_id, s.is_failure_mode)
    )
"""
MIGRATED_DRIFT: Final = """
SELECT machine_id, problem FROM machine_sync.drift
WHERE %(ids)s::uuid[] IS NULL OR machine_id = ANY(%(ids)s)
"""
LEGACY_MACHINE_DRIFTS: Final = """
SELECT s.machine_id IS NULL
    OR (m.status, m.current_process_id, m.status = 'error')
    IS DISTINCT FROM (s.current_state::text, s.process_id, s.is_failure_mode)
FROM public.machines AS m
LEFT JOIN public.machine_state AS s ON s.machine_id = m.id
WHERE m.id = %(machine)s
"""
MIGRATED_MACHINE_DRIFTS: Final = (
    "SELECT EXISTS (SELECT FROM machine_sync.drift WHERE machine_id = %(machine)s)"
)

# The audit of legacy-system.md: how many machines, how many state rows, and
# which statuses each table holds.
AUDIT_COUNTS: Final = """
SELECT
    (SELECT count(*) FROM public.machines) AS machines,
    (SELECT count(*) FROM public.machine_state) AS state_rows
"""
AUDIT_STATUSES: Final = """
SELECT 'machines.status' AS source, status AS value, count(*) AS n
FROM public.machines GROUP BY status
UNION ALL
SELECT 'machine_state.current_state', current_state::text, count(*)
FROM public.machine_state GROUP BY current_state
ORDER BY 1 DESC, 2
"""
LEGACY_RPCS_PRESENT: Final = """
SELECT count(*) FROM pg_catalog.pg_proc AS p
JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
WHERE n.nspname = 'public' AND p.proname = ANY(%(names)s)
"""
AGREEING_MACHINES: Final = """
SELECT count(*)
FROM public.machines AS m
JOIN public.machine_state AS s ON s.machine_id = m.id
WHERE
    m.id = ANY(%(ids)s)
    AND NOT EXISTS (SELECT FROM machine_sync.drift AS d WHERE d.machine_id = m.id)
"""
LIST_MACHINE_IDS: Final = "SELECT id FROM public.machines ORDER BY id"
MODE: Final = "SELECT machine_sync.mode()"

# The legacy RPCs, called the way PostgREST calls them: named arguments.
RPC_PROCESSING: Final = """
SELECT public.atomic_processing_machine_state(
    p_machine_id => %(machine)s, p_process_id => %(process)s)
"""
RPC_COMPLETE: Final = "SELECT public.atomic_complete_machine_state(p_machine_id => %(machine)s)"
RPC_ERROR: Final = """
SELECT public.atomic_error_machine_state(
    p_machine_id => %(machine)s, p_error_message => %(message)s)
"""
RPC_UPDATE: Final = """
SELECT public.atomic_update_machine_state(
    p_machine_id => %(machine)s, p_machine_status => %(status)s,
    p_machine_state_current_state => %(status)s)
"""
STATE_ROW: Final = """
SELECT current_state, process_id, is_failure_mode, failure_description
FROM public.machine_state WHERE machine_id = %(machine)s
"""

# Server management for the demo: identifiers are composed, never formatted.
CREATE_DATABASE: Final = sql.SQL("CREATE DATABASE {}")
DROP_DATABASE: Final = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
SERVER_VERSION: Final = "SELECT current_setting('server_version_num')::int / 10000"

# ---------------------------------------------------------------------------
# Events, paths and faults.

LEGACY_RPCS: Final = (
    "atomic_update_machine_state",
    "atomic_complete_machine_state",
    "atomic_error_machine_state",
    "atomic_processing_machine_state",
)
STARTABLE: Final = frozenset({"idle", "offline"})
ERROR_MESSAGE: Final = "chamber pressure out of range"
ERROR_DESCRIPTION: Final = f"Recipe execution error: {ERROR_MESSAGE}"  # the legacy prefix


class Event(StrEnum):
    """One state change of a machine, as the recipe service makes them."""

    START = "start"
    COMPLETE = "complete"
    ERROR = "error"
    STOP = "stop"
    RESET = "reset"  # an operator puts a failed or stuck machine back to idle


class Fault(StrEnum):
    """What happens to a writer while its second write waits for a row lock."""

    KILLED = "connection_killed"  # pg_terminate_backend: a crash or network drop
    TIMEOUT = "statement_timeout"  # the server gives up on the statement


class Refused(Exception):
    """The write path declined the event: the machine is not in a state for it."""


SecondWrite = Callable[[str], AbstractContextManager[object]]
"""Wraps the write that must not be lost; the argument names its target table."""


class WritePath(Protocol):
    """The five events written one way. ``second`` wraps the last write of each."""

    name: str

    def start(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """Start ``process`` on ``machine``; raise :class:`Refused` if it is busy."""

    def complete(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """The run finished: back to idle."""

    def error(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """The run failed: status error with a description."""

    def stop(self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite) -> None:
        """An operator stopped the run."""

    def reset(self, conn: Conn, machine: uuid.UUID, second: SecondWrite) -> None:
        """An operator puts the machine back to idle, whatever it was doing."""


def error_name(exc: BaseException) -> str:
    """The psycopg class of an error (QueryCanceled, AdminShutdown...), through the
    client's translation, so both paths' errors are counted under the same names."""
    cause = exc.__cause__ if isinstance(exc, MachineSyncError) else exc
    return type(cause if isinstance(cause, psycopg.Error) else exc).__name__


def _now() -> datetime:
    return datetime.now(UTC)


class LegacyPath:
    """Production's code: two autocommit statements per event (legacy-system.md)."""

    name = "legacy"

    def start(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """Read status, check it in Python, then write machines, then machine_state."""
        row = conn.execute(LEGACY_READ_STATUS, {"machine": machine}).fetchone()
        if row is None or row[0] not in STARTABLE:
            raise Refused(f"machine is {row[0] if row else 'missing'}")
        args = {"machine": machine, "process": process, "now": _now()}
        conn.execute(LEGACY_START_MACHINES, args)
        with second("machine_state"):
            conn.execute(LEGACY_START_STATE, args)

    def complete(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """machines idle, then machine_state idle; the process is not checked."""
        self._idle(conn, machine, second)

    def error(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """machine_state first (error + description), then machines."""
        args = {"machine": machine, "description": ERROR_DESCRIPTION}
        conn.execute(LEGACY_ERROR_STATE, args)
        with second("machines"):
            conn.execute(LEGACY_ERROR_MACHINES, args)

    def stop(self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite) -> None:
        """machines loses its process (its status stays), then machine_state idle."""
        conn.execute(LEGACY_STOP_MACHINES, {"machine": machine})
        with second("machine_state"):
            conn.execute(LEGACY_STOP_STATE, {"machine": machine})

    def reset(self, conn: Conn, machine: uuid.UUID, second: SecondWrite) -> None:
        """The operator's "mark idle" button runs the completion path."""
        self._idle(conn, machine, second)

    @staticmethod
    def _idle(conn: Conn, machine: uuid.UUID, second: SecondWrite) -> None:
        args = {"machine": machine, "now": _now()}
        conn.execute(LEGACY_COMPLETE_MACHINES, args)
        with second("machine_state"):
            conn.execute(LEGACY_COMPLETE_STATE, args)


class ClientPath:
    """machine-sync: :class:`machine_sync.client.Client`, one statement per event.

    Refusals by the transition rules (busy machine, a run that is no longer
    current) become :class:`Refused`; every other error is raised as the
    client raises it.
    """

    name = "client"

    def start(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """Start only from idle or offline, decided inside the statement."""
        with second("machine_state"), _refusals():
            Client(conn).start_process(machine, process)

    def complete(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """Complete only the machine's current run."""
        with second("machine_state"), _refusals():
            Client(conn).complete_process(machine, process)

    def error(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """Fail only the machine's current run, with the legacy message."""
        with second("machine_state"), _refusals():
            Client(conn).fail_process(machine, ERROR_DESCRIPTION, process_id=process)

    def stop(self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite) -> None:
        """Stop only the machine's current run."""
        with second("machine_state"), _refusals():
            Client(conn).stop_process(machine, process)

    def reset(self, conn: Conn, machine: uuid.UUID, second: SecondWrite) -> None:
        """An operator override: idle, no process."""
        with second("machine_state"), _refusals():
            Client(conn).set_status(machine, "idle")


@contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except InvalidTransition as exc:
        raise Refused(str(exc)) from exc


def no_fault(_table: str) -> AbstractContextManager[None]:
    """A :data:`SecondWrite` that does nothing."""
    return _nothing()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


class FaultInjector:
    """Makes one planned fault happen to a writer's second write.

    A realistic cause: the row the second write needs is locked by another
    session (a long report, a migration, a stuck transaction). The injector
    takes that lock on its own connection, lets the write block on it, and
    then either lets the writer's ``statement_timeout`` fire or terminates the
    writer's backend, as a crashed client or a dropped connection would.
    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._conn: Conn | None = None

    def close(self) -> None:
        """Close the injector's connection."""
        if self._conn is not None:
            self._conn.close()

    def _blocker(self) -> Conn:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(
                self._conninfo, autocommit=False, application_name="machine-sync fault"
            )
            self._conn.execute(SET_LOCK_TIMEOUT, {"value": "1s"})
            self._conn.commit()
        return self._conn

    @contextmanager
    def inject(self, fault: Fault, victim: Conn, machine: uuid.UUID, table: str) -> Iterator[bool]:
        """Hold ``table``'s row of ``machine`` while the body runs; then ``fault``.

        Yields False, and injects nothing, when the row could not be locked
        (another session kept it longer than the injector's lock_timeout).
        """
        blocker = self._blocker()
        lock = LOCK_STATE_ROW if table == "machine_state" else LOCK_MACHINE_ROW
        try:
            blocker.execute(lock, {"machine": machine})
        except psycopg.Error:
            with suppress(psycopg.Error):
                blocker.rollback()
            yield False
            return
        done = threading.Event()
        killer: threading.Thread | None = None
        if fault is Fault.KILLED:
            pid = victim.info.backend_pid
            killer = threading.Thread(
                target=self._kill_when_blocked, args=(blocker, pid, done), daemon=True
            )
            killer.start()
        try:
            yield True
        finally:
            done.set()
            if killer is not None:
                killer.join()
            with suppress(psycopg.Error):
                blocker.rollback()

    @staticmethod
    def _kill_when_blocked(blocker: Conn, victim: int, done: threading.Event) -> None:
        # Kill only once the victim waits on our lock, so the statement is in
        # flight; stop looking as soon as the write returned without waiting.
        deadline = time.monotonic() + 2.0
        with suppress(psycopg.Error):  # a lost injector connection only loses the fault
            while not done.is_set() and time.monotonic() < deadline:
                row = blocker.execute(IS_BLOCKING, {"victim": victim}).fetchone()
                if row is not None and row[0]:
                    blocker.execute(TERMINATE, {"victim": victim})
                    return
                time.sleep(0.001)


# ---------------------------------------------------------------------------
# Setup helpers.


def connect(conninfo: str, *, statement_timeout_ms: int | None = None, name: str = "") -> Conn:
    """An autocommit connection, as each legacy HTTP request effectively is."""
    conn = psycopg.connect(
        conninfo, autocommit=True, application_name=name or "machine-sync workload"
    )
    if statement_timeout_ms is not None:
        conn.execute(SET_STATEMENT_TIMEOUT, {"value": f"{statement_timeout_ms}ms"})
    return conn


def create_machines(conn: Conn, count: int, prefix: str = "WL-") -> list[uuid.UUID]:
    """Insert ``count`` idle machines, each with an agreeing ``machine_state`` row."""
    with conn.transaction():
        rows = conn.execute(CREATE_MACHINES, {"prefix": prefix, "count": count}).fetchall()
        ids = [row[0] for row in rows]
        conn.execute(CREATE_MISSING_STATE_ROWS, {"ids": ids})
    return ids


def schema_of(conn: Conn) -> Schema:
    """``migrated`` once machine-sync's drift view exists, else ``legacy``."""
    row = conn.execute(SCHEMA_IS_MIGRATED).fetchone()
    return "migrated" if row is not None and row[0] else "legacy"


class ProcessIds:
    """Process ids for new runs, safe to share between threads.

    On the production schema ``machines.current_process_id`` references
    ``process_executions``, so ids there are real rows, made in batches on a
    connection of their own; elsewhere they are random UUIDs.
    """

    def __init__(self, conninfo: str, batch: int = 512) -> None:
        self._conninfo = conninfo
        self._batch = batch
        self._lock = threading.Lock()
        self._ids: list[uuid.UUID] = []
        with psycopg.connect(conninfo, autocommit=True) as conn:
            row = conn.execute(HAS_PROCESS_TABLE).fetchone()
        self._table = bool(row and row[0])

    def take(self) -> uuid.UUID:
        """A process id no run has used."""
        if not self._table:
            return uuid.uuid4()
        with self._lock:
            if not self._ids:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    rows = conn.execute(CREATE_PROCESSES, {"count": self._batch}).fetchall()
                self._ids = [row[0] for row in rows]
            return self._ids.pop()


def drift(conn: Conn, schema: Schema, ids: Sequence[uuid.UUID] | None = None) -> Counter[str]:
    """Drifting machines by problem (all machines, or only ``ids``).

    Before migration this is the module's own query; after, ``machine_sync.drift``.
    """
    query = LEGACY_DRIFT if schema == "legacy" else MIGRATED_DRIFT
    rows = conn.execute(query, {"ids": None if ids is None else list(ids)}).fetchall()
    return Counter(str(row[1]) for row in rows)


def machine_drifts(conn: Conn, schema: Schema, machine: uuid.UUID) -> bool:
    """True when ``machine``'s two rows disagree right now."""
    query = LEGACY_MACHINE_DRIFTS if schema == "legacy" else MIGRATED_MACHINE_DRIFTS
    row = conn.execute(query, {"machine": machine}).fetchone()
    return bool(row and row[0])


# ---------------------------------------------------------------------------
# The concurrent workload.


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
class _Shared:
    """State every writer of one run shares."""

    conninfo: str
    schema: Schema
    path: WritePath
    machines: list[uuid.UUID]
    processes: ProcessIds
    config: WorkloadConfig
    deadline: float
    stop: threading.Event  # set when the run must end now
    runs: _Runs


class _Runs:
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

    def __init__(self, shared: _Shared, index: int) -> None:
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
    shared = _Shared(
        conninfo=conninfo,
        schema=schema,
        path=path,
        machines=list(machines),
        processes=ProcessIds(conninfo),
        config=config,
        deadline=time.monotonic() + config.seconds,
        stop=stop,
        runs=_Runs(machines),
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


# ---------------------------------------------------------------------------
# Statements and round trips, from libpq's protocol trace.

# One fixed recipe script: every event kind, machines end idle.
SCRIPT: Final = (
    Event.START,
    Event.COMPLETE,
    Event.START,
    Event.ERROR,
    Event.RESET,
    Event.START,
    Event.STOP,
    Event.RESET,
)
_TRACE_LINE = re.compile(r"^([FB])\t\d+\t(\w+)")


@dataclass(frozen=True)
class WireCount:
    """Protocol messages per state change, counted from the wire."""

    state_changes: int
    statements: int  # Query and Execute messages the client sent
    round_trips: int  # ReadyForQuery messages: the client waited for the server

    @property
    def statements_per_change(self) -> float:
        """Statements per state change."""
        return self.statements / self.state_changes

    @property
    def round_trips_per_change(self) -> float:
        """Round trips per state change."""
        return self.round_trips / self.state_changes


def _play(
    conn: Conn, path: WritePath, machine: uuid.UUID, processes: ProcessIds, script: Sequence[Event]
) -> int:
    """Run ``script`` once on ``machine``; return how many events it ran."""
    process = processes.take()
    for kind in script:
        if kind is Event.START:
            process = processes.take()
            path.start(conn, machine, process, no_fault)
        elif kind is Event.RESET:
            path.reset(conn, machine, no_fault)
        else:
            getattr(path, kind.value)(conn, machine, process, no_fault)
    return len(script)


def count_round_trips(
    conninfo: str, path: WritePath, machine: uuid.UUID, *, cycles: int = 3
) -> WireCount | None:
    """Count statements and round trips per state change of ``path``.

    Runs :data:`SCRIPT` a few times untraced (so psycopg has prepared what it
    prepares: steady state), then ``cycles`` times under libpq's trace.
    Returns None when this libpq cannot trace (before 14).
    """
    processes = ProcessIds(conninfo)
    with connect(conninfo, name="machine-sync trace") as conn:
        for _ in range(6):
            _play(conn, path, machine, processes, SCRIPT)
        fd, name = tempfile.mkstemp(prefix="machine-sync-trace-")
        try:
            try:
                conn.pgconn.trace(fd)
                conn.pgconn.set_trace_flags(
                    psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE
                )
            except psycopg.NotSupportedError:
                return None
            try:
                changes = sum(_play(conn, path, machine, processes, SCRIPT) for _ in range(cycles))
            finally:
                conn.pgconn.untrace()
            with open(name, encoding="utf-8", errors="replace") as trace:
                messages = [m.groups() for m in map(_TRACE_LINE.match, trace) if m is not None]
        finally:
            os.close(fd)
            os.unlink(name)
    sent = sum(1 for way, kind in messages if way == "F" and kind in ("Query", "Execute"))
    waits = sum(1 for way, kind in messages if way == "B" and kind == "ReadyForQuery")
    return WireCount(changes, sent, waits)


# ---------------------------------------------------------------------------
# Interleaved throughput (A/B).


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
    counts = [0] * len(conns)
    errors = [0] * len(conns)
    barrier = threading.Barrier(len(conns) + 1)
    stop_at = [0.0]

    def play(index: int) -> None:
        conn, machine = conns[index], target.machines[index]
        barrier.wait()
        while time.monotonic() < stop_at[0]:
            try:
                counts[index] += _play(conn, target.path, machine, processes, SCRIPT)
            except (psycopg.Error, MachineSyncError, Refused):
                errors[index] += 1
                with suppress(psycopg.Error, MachineSyncError):
                    target.path.reset(conn, machine, no_fault)

    threads = [threading.Thread(target=play, args=(i,), daemon=True) for i in range(len(conns))]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    stop_at[0] = began + seconds
    barrier.wait()
    try:
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(timeout=0.05)
    finally:
        stop_at[0] = 0.0  # after an interrupt: the players stop after their script
        for thread in threads:
            thread.join()
    return sum(counts), time.monotonic() - began, sum(errors)


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


# ---------------------------------------------------------------------------
# The legacy RPCs.


@dataclass(frozen=True)
class RpcCheck:
    """One legacy RPC call and whether both tables show what it returned."""

    function: str
    ok: bool
    detail: str


def exercise_legacy_rpcs(conn: Conn, machine: uuid.UUID, process: uuid.UUID) -> list[RpcCheck]:
    """Call each legacy RPC as PostgREST would and check the result and the tables."""
    steps: list[tuple[str, str, dict[str, Any], str]] = [
        ("atomic_processing_machine_state", RPC_PROCESSING, {"process": process}, "processing"),
        ("atomic_complete_machine_state", RPC_COMPLETE, {}, "idle"),
        ("atomic_error_machine_state", RPC_ERROR, {"message": ERROR_MESSAGE}, "error"),
        ("atomic_update_machine_state", RPC_UPDATE, {"status": "idle"}, "idle"),
    ]
    checks = []
    for function, query, extra, expected in steps:
        try:
            row = conn.execute(query, {"machine": machine, **extra}).fetchone()
        except psycopg.Error as exc:
            checks.append(RpcCheck(function, False, " ".join(str(exc).split())))
            continue
        result: dict[str, Any] = row[0] if row else {}
        state = conn.execute(STATE_ROW, {"machine": machine}).fetchone()
        returned = (result.get("machine_state") or {}).get("current_state")
        ok = (
            result.get("success") is True
            and (result.get("machine") or {}).get("status") == expected
            and returned == expected
            and state is not None
            and state[0] == expected
            and not machine_drifts(conn, "migrated", machine)
        )
        detail = f"success={result.get('success')}, status={returned}, tables agree"
        if not ok:
            detail = f"expected {expected}: returned {result!r}, machine_state {state!r}"
        checks.append(RpcCheck(function, ok, detail))
    return checks
