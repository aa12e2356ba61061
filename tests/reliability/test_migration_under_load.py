"""Migrating the legacy production database while its writers keep writing.

What is a fair assertion here? Before the migration commits, legacy writers
run against the legacy schema: two separate statements, no triggers, so the
tables may disagree (that is the bug being fixed). The migration takes its
locks, then backfills: machines wins, failure details that only
machine_state held are copied over, spellings are normalized, every machine
gets an agreeing state row. After it commits, every write is mirrored. So:

* every statement is classified as before or after the migration by the
  writer itself, in the statement's own transaction (does the mirror trigger
  exist in that snapshot?); the migration's locks make that exact;
* a model replays each machine's statements in order: before the
  migration, each statement writes only its own table; at the migration the
  backfill rule applies; after it, the compat rules (tests/reliability/model.py),
  which also predict every refusal;
* at the end, without any further reconcile: zero drift, and every machine
  (written or not) holds exactly what the model says: no acknowledged update
  is lost, and none appears that nobody wrote;
* writers see no error but the rules' own refusals after the migration
  (MS002 busy, MS003 a transition or processing without a process), each
  predicted by the model, and possibly a retryable 40001/55P03 of a legacy
  write that changes nothing; otherwise they only wait, and how long is
  measured and printed (the migration's own lock waits are capped by its
  lock_timeout; a writer waits for the migration's whole transaction).

Each machine has exactly one writer, so the order of its statements is the
order the writer ran them; racing writers are test_concurrency's subject.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg

from .model import Refused, Row, canonical, write_machine, write_state
from .workload import LEGACY_PATHS, legacy_params
from machines import assert_consistent, wait_for

LEGACY_MACHINE = "00000000-0000-4000-8000-{:012d}"
# Writers that keep going through the migration, and writers that stop as it
# starts (their machines' final rows are decided by the backfill). Machines
# 1-5 have a legacy machine_state row, the others none.
BUSY = [1, 2, 6, 9, 12, 13]
QUIET = [3, 4, 5, 7]
PROCESSES = [uuid.UUID(int=0xE000 + n) for n in range(40)]
MIGRATED = "SELECT EXISTS (SELECT FROM pg_trigger WHERE tgname = 'zz_machine_sync')"
# What a writer may be told after the migration: the rules' refusals (the
# model predicts them) and a legacy write's retryable give-up.
RULE_REFUSALS = ("23514", "MS002", "MS003")
RETRYABLE = ("40001", "55P03")
NEW_STATUSES = ("idle", "maintenance", "IDLE", "Running", "offline")


@dataclass
class Done:
    """One acknowledged statement, as the writer saw it."""

    table: str
    changes: dict[str, Any]
    migrated: bool
    started: float
    finished: float
    refused: str | None = None  # the SQLSTATE, when the statement failed


@dataclass
class Writer:
    machine_id: uuid.UUID
    quiet: bool
    log: list[Done] = field(default_factory=list)
    failure: BaseException | None = None  # what stopped it, if anything did


def legacy_changes(path: str, step: int, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The table and mirrored columns statement ``step`` of a legacy path writes."""
    table = LEGACY_PATHS[path][step][0]
    process = params["p"]
    machines = {
        "start": {"status": "processing", "process_id": process},
        "complete": {"status": "idle", "process_id": None},
        "error": {"status": "error", "process_id": None},
        "stop": {"process_id": None},
    }
    states = {
        "start": {
            "status": "processing",
            "process_id": process,
            "failure_description": None,
            "failure_component": None,
        },
        "complete": {"status": "idle", "process_id": None},
        "error": {
            "status": "error",
            "failure_description": "Recipe execution error: " + params["msg"],
        },
        "stop": {"status": "idle", "process_id": None},
    }
    return table, (machines if table == "machines" else states)[path]


def write(
    conn: psycopg.Connection[Any],
    writer: Writer,
    table: str,
    statement: str,
    params: Any,
    changes: dict[str, Any],
) -> None:
    started = time.monotonic()
    try:
        with conn.transaction():
            conn.execute(statement, params)
            row = conn.execute(MIGRATED).fetchone()
    except psycopg.Error as err:
        # Only the migration's rules refuse anything: the legacy schema has
        # none. Anything else stops this writer and fails the test.
        if err.sqlstate not in RULE_REFUSALS + RETRYABLE:
            raise
        writer.log.append(Done(table, changes, True, started, time.monotonic(), err.sqlstate))
        return
    assert row is not None
    writer.log.append(Done(table, changes, row[0], started, time.monotonic()))


def run_writer(
    dsn: str, writer: Writer, seed: int, migrating: threading.Event, stop: threading.Event
) -> None:
    try:
        write_randomly(dsn, writer, seed, migrating, stop)
    except BaseException as err:
        writer.failure = err


def write_randomly(
    dsn: str, writer: Writer, seed: int, migrating: threading.Event, stop: threading.Event
) -> None:
    rng = random.Random(seed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set() and not (writer.quiet and migrating.is_set()):
            if rng.random() < 0.25:
                status = rng.choice(NEW_STATUSES)
                write(
                    conn,
                    writer,
                    "machines",
                    "UPDATE machines SET status = %s, current_process_id = NULL WHERE id = %s",
                    [status, writer.machine_id],
                    {"status": status, "process_id": None},
                )
                continue
            path = rng.choice(sorted(LEGACY_PATHS))
            params = legacy_params(
                writer.machine_id, rng.choice(PROCESSES), message=f"m{rng.randrange(100)}"
            )
            for step, (_table, statement) in enumerate(LEGACY_PATHS[path]):
                table, changes = legacy_changes(path, step, params)
                write(conn, writer, table, statement, params, changes)


def backfill(machine: dict[str, Any], state: Row | None) -> Row:
    """The row the migration leaves for one machine: machines wins, under
    the rules (a machine left processing without a process is idle; a run
    ends with its status), with failure details only machine_state held."""
    status = canonical(machine["status"])
    assert status is not None
    process_id = machine["process_id"]
    if status == "processing" and process_id is None:
        status = "idle"
    if status != "processing":
        process_id = None
    row = Row(status, process_id)
    if state is not None and (
        state.failure_description is not None or state.failure_component is not None
    ):
        row = replace(
            row,
            failure_description=state.failure_description,
            failure_component=state.failure_component,
        )
    return row


def replay(row: Row, done: Done) -> Row:
    """One statement after the migration: the model's row, or its refusal,
    which must be the one the writer saw (a retryable give-up changes nothing)."""
    if done.refused in RETRYABLE:
        return row
    predicted: str | None = None
    new = row
    try:
        if done.table == "machines":
            new = write_machine(row, **done.changes)
        else:
            new = write_state(row, "compat", **done.changes)
    except Refused as refused:
        predicted = refused.sqlstate
    assert done.refused == predicted, f"{row} {done}: the model predicts {predicted}"
    return new


def expected_row(machine: dict[str, Any], state: Row | None, log: list[Done]) -> Row:
    """Replay one machine's statements."""
    migrated: Row | None = None
    for done in log:
        if not done.migrated:
            assert migrated is None, "a statement classified pre-migration after a migrated one"
            if done.table == "machines":
                machine = {**machine, **done.changes}
            elif state is not None:
                state = replace(state, **done.changes)
            continue
        if migrated is None:
            migrated = backfill(machine, state)
        migrated = replay(migrated, done)
    return backfill(machine, state) if migrated is None else migrated


def watch_lock_waits(dsn: str, done: threading.Event, blocked: list[int]) -> None:
    """Sample how many writers wait for a lock while the migration runs."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not done.is_set():
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND application_name <> 'psql'"
            ).fetchone()
            blocked.append(0 if row is None else row[0])
            time.sleep(0.002)


def test_migrating_while_legacy_and_new_writers_run(legacy_db: Any) -> None:
    with legacy_db.connect() as conn:
        conn.execute("INSERT INTO process_executions (id) SELECT unnest(%s::uuid[])", [PROCESSES])
        machines = {
            row[0]: {"status": row[1], "process_id": row[2]}
            for row in conn.execute("SELECT id, status, current_process_id FROM machines")
        }
        states = {
            row[0]: Row(*row[1:])
            for row in conn.execute(
                "SELECT machine_id, current_state, process_id, failure_description,"
                " failure_component FROM machine_state"
            )
        }
    writers = [Writer(uuid.UUID(LEGACY_MACHINE.format(n)), quiet=n in QUIET) for n in BUSY + QUIET]
    migrating, stop = threading.Event(), threading.Event()
    threads = [
        threading.Thread(target=run_writer, args=(legacy_db.dsn, w, n, migrating, stop))
        for n, w in enumerate(writers)
    ]
    for thread in threads:
        thread.start()
    busy_writers = [w for w in writers if not w.quiet]
    try:
        # Every writer has written before the migration starts ...
        wait_for(
            "every writer wrote before the migration",
            lambda: all(len(w.log) >= 3 or w.failure is not None for w in writers),
        )
        migrating.set()
        blocked: list[int] = []
        done = threading.Event()
        watcher = threading.Thread(target=watch_lock_waits, args=(legacy_db.dsn, done, blocked))
        watcher.start()
        began = time.monotonic()
        try:
            legacy_db.migrate()
        finally:
            ended = time.monotonic()
            done.set()
            watcher.join()
        # ... and every busy writer goes on writing after it.
        wait_for(
            "every busy writer wrote after the migration",
            lambda: all(
                sum(d.migrated for d in w.log) >= 5 or w.failure is not None for w in busy_writers
            ),
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    # Each wait_for above fails if a writer stopped; none may have.
    assert [w.failure for w in writers if w.failure is not None] == []
    with legacy_db.connect() as conn:
        assert_consistent(conn)
        found = {
            row[0]: Row(*row[1:])
            for row in conn.execute(
                "SELECT id, status, current_process_id, failure_description, failure_component"
                " FROM machines"
            )
        }
    logs = {w.machine_id: w.log for w in writers}
    for machine_id, machine in machines.items():
        expected = expected_row(machine, states.get(machine_id), logs.get(machine_id, []))
        assert found[machine_id] == expected, f"{machine_id}: {found[machine_id]} != {expected}"

    every = [done for w in writers for done in w.log]
    busy = [done for w in writers if not w.quiet for done in w.log]
    assert any(not d.migrated for d in busy)
    assert any(d.migrated for d in busy)
    refusals = Counter(d.refused for d in every if d.refused is not None)
    # Writers were really blocked by the migration (the point of "under load").
    assert max(blocked) > 0, "no writer ever waited for the migration's locks"
    around = [d.finished - d.started for d in every if d.finished > began and d.started < ended]
    elsewhere = [d.finished - d.started for d in every if d.finished <= began or d.started >= ended]
    print(
        f"\nmigration under load: {len(every)} acknowledged statements"
        f" ({sum(not d.migrated for d in every)} before, {sum(d.migrated for d in every)} after),"
        f" migration {ended - began:.3f}s,"
        f" up to {max(blocked)} writers waiting for its locks at once,"
        f" max writer latency around it {max(around):.3f}s, elsewhere {max(elsewhere):.3f}s,"
        f" refusals {dict(refusals)}"
    )


def test_a_machine_stopped_by_the_legacy_path_is_idle_after_migrating(legacy_db: Any) -> None:
    machine_id = uuid.UUID(LEGACY_MACHINE.format(1))  # has a legacy state row
    with legacy_db.connect() as conn:
        conn.execute("INSERT INTO process_executions (id) VALUES (%s)", [PROCESSES[0]])
        for path in ("start", "stop"):
            for _table, statement in LEGACY_PATHS[path]:
                conn.execute(statement, legacy_params(machine_id, PROCESSES[0]))
        assert conn.execute(
            "SELECT m.status, s.current_state FROM machines m JOIN machine_state s"
            " ON s.machine_id = m.id WHERE m.id = %s",
            [machine_id],
        ).fetchone() == ("processing", "idle")
    legacy_db.migrate()
    with legacy_db.connect() as conn:
        assert_consistent(conn)
        assert conn.execute(
            "SELECT status, current_process_id FROM machines WHERE id = %s", [machine_id]
        ).fetchone() == ("idle", None)


def test_rows_both_tables_agree_on_are_brought_under_the_rules_too(legacy_db: Any) -> None:
    """A machine processing without a process, and one in error still holding
    its process, where both tables say so (no drift to repair): after the
    migration every machine obeys the rules."""
    stopped = uuid.UUID(LEGACY_MACHINE.format(1))  # both have a legacy state row
    failed = uuid.UUID(LEGACY_MACHINE.format(2))
    with legacy_db.connect() as conn:
        conn.execute("INSERT INTO process_executions (id) VALUES (%s)", [PROCESSES[0]])
        for machine_id, status, process_id in (
            (stopped, "processing", None),
            (failed, "error", PROCESSES[0]),
        ):
            conn.execute(
                "UPDATE machines SET status = %s, current_process_id = %s WHERE id = %s",
                [status, process_id, machine_id],
            )
            conn.execute(
                "UPDATE machine_state SET current_state = %s, process_id = %s,"
                " is_failure_mode = %s, failure_description = NULL, failure_component = NULL"
                " WHERE machine_id = %s",
                [status, process_id, status == "error", machine_id],
            )
    legacy_db.migrate()
    with legacy_db.connect() as conn:
        assert_consistent(conn)
        assert conn.execute(
            "SELECT count(*) FROM machines WHERE (status = 'processing')"
            " <> (current_process_id IS NOT NULL)"
        ).fetchone() == (0,)
        for machine_id, status in ((stopped, "idle"), (failed, "error")):
            assert conn.execute(
                "SELECT status, current_process_id FROM machines WHERE id = %s", [machine_id]
            ).fetchone() == (status, None)
