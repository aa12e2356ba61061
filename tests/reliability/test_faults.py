"""Faults: a backend killed mid-transaction, between the two legacy statements
and inside a trigger; statement_timeout and lock_timeout firing. After each:
zero drift, and the rows are exactly what committed (nothing half-applied).

The server crash (``pg_ctl stop -m immediate``) is in test_crash.py: it needs
its own durable server.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from .workload import (
    LEGACY_EFFECT,
    LEGACY_PATHS,
    RPC_CALLS,
    install_sleep_triggers,
    legacy_params,
    sleep_in,
    snapshot,
    wait_until_sleeping,
)
from machines import add_machine, assert_consistent, machine, state, wait_until_lock_waiting

Conn = psycopg.Connection[Any]


def terminate(admin: Conn, pid: int) -> None:
    """Kill backend ``pid`` and wait until it is gone."""
    row = admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid]).fetchone()
    assert row == (True,), f"backend {pid} did not terminate"


def test_backend_killed_mid_transaction_leaves_nothing(db: Any) -> None:
    with db.connect() as admin:
        first, second = add_machine(admin, status="idle"), add_machine(admin, status="idle")
        before = snapshot(admin)
        victim = db.connect(autocommit=False)
        try:
            victim.execute(
                "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s",
                [uuid.uuid4(), first],
            )
            victim.execute(LEGACY_PATHS["error"][0][1], legacy_params(second, message="x"))
            # Inside the open transaction both tables already agree.
            assert_consistent(victim)
            terminate(admin, victim.info.backend_pid)
            with pytest.raises(psycopg.OperationalError):
                victim.execute("SELECT 1")
        finally:
            victim.close()
        assert snapshot(admin) == before
        assert_consistent(admin)


def test_backend_killed_between_the_two_legacy_statements(db: Any, subtests: Any) -> None:
    """The production failure mode: a legacy writer dies after its first
    statement. The first statement alone already left both tables agreeing."""
    with db.connect() as admin:
        for path in LEGACY_PATHS:
            with subtests.test(path=path):
                # A start begins on an idle machine (a processing one is busy:
                # MS002); the other paths end a run.
                if path == "start":
                    machine_id = add_machine(admin, status="idle")
                else:
                    machine_id = add_machine(
                        admin, status="processing", current_process_id=uuid.uuid4()
                    )
                params = legacy_params(machine_id, message="died")
                with db.connect() as victim:
                    victim.execute(LEGACY_PATHS[path][0][1], params)
                    terminate(admin, victim.info.backend_pid)
                assert_consistent(admin)
                status, process = LEGACY_EFFECT[path][0]
                row = machine(admin, machine_id)
                assert row is not None
                if status is not None:
                    assert row["status"] == status
                if process == "NULL":
                    assert row["current_process_id"] is None
                elif process == "P":
                    assert row["current_process_id"] == params["p"]
                if path == "error":
                    assert row["failure_description"] == "Recipe execution error: died"
                    assert state(admin, machine_id)["is_failure_mode"] is True


# Where the victim sleeps (test-only trigger) and what it runs. The sleep
# triggers sort around the product's: "_a_" before the mirror or carry,
# "_zz_" after it (see workload.SLEEP_TRIGGERS).
NEW_UPDATE = (
    "UPDATE machines SET status = 'error', failure_description = 'x',"
    " current_process_id = NULL WHERE id = %(m)s"
)
LEGACY_STATE_UPDATE = LEGACY_PATHS["error"][0][1]
INSIDE_TRIGGER = [
    ("machines_a_sleep", NEW_UPDATE),  # row written, mirror not run yet
    ("machines_zz_sleep", NEW_UPDATE),  # mirrored, not committed
    ("machine_state_a_sleep", LEGACY_STATE_UPDATE),  # state written, carry not run
    ("machine_state_zz_sleep", LEGACY_STATE_UPDATE),  # carried into machines
    ("machines_zz_sleep", LEGACY_STATE_UPDATE),  # inside the carry's own machines write
    ("machines_zz_sleep", RPC_CALLS["error"]),
    (
        "machine_state_zz_sleep",
        "INSERT INTO machine_state (machine_id, current_state) VALUES (%(m)s, 'maintenance')"
        " ON CONFLICT (machine_id) DO UPDATE SET current_state = excluded.current_state",
    ),
]


def _run_in_thread(action: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    failures: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as err:
            failures.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, failures


def test_backend_killed_inside_a_trigger(db: Any, subtests: Any) -> None:
    with db.connect() as admin:
        install_sleep_triggers(admin)
        for trigger, statement in INSIDE_TRIGGER:
            with subtests.test(trigger=trigger, statement=statement):
                machine_id = add_machine(
                    admin, status="processing", current_process_id=uuid.uuid4()
                )
                before = snapshot(admin)
                with db.connect() as victim:
                    sleep_in(victim, trigger)
                    params = {**legacy_params(machine_id), "msg": "x"}
                    thread, failures = _run_in_thread(
                        functools.partial(victim.execute, statement, params)
                    )
                    wait_until_sleeping(admin, victim.info.backend_pid)
                    terminate(admin, victim.info.backend_pid)
                    thread.join()
                assert len(failures) == 1
                assert isinstance(failures[0], psycopg.OperationalError)
                assert snapshot(admin) == before
                assert_consistent(admin)


def test_statement_timeout_inside_a_trigger(db: Any, subtests: Any) -> None:
    with db.connect() as conn:
        install_sleep_triggers(conn)
        for trigger, statement in INSIDE_TRIGGER:
            with subtests.test(trigger=trigger, statement=statement):
                machine_id = add_machine(conn, status="processing", current_process_id=uuid.uuid4())
                before = snapshot(conn)
                sleep_in(conn, trigger)
                conn.execute("SET statement_timeout = '150ms'")
                try:
                    with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
                        conn.execute(statement, {**legacy_params(machine_id), "msg": "x"})
                finally:
                    conn.execute("RESET statement_timeout")
                    sleep_in(conn, None)
                assert snapshot(conn) == before
                assert_consistent(conn)


def test_statement_timeout_inside_a_savepoint_keeps_the_rest(db: Any) -> None:
    """The timed-out statement is undone with its mirror; the transaction
    around it commits what came before."""
    with db.connect() as admin:
        install_sleep_triggers(admin)
        kept, undone = add_machine(admin, status="idle"), add_machine(admin, status="idle")
        with db.connect(autocommit=False) as conn:
            conn.execute("UPDATE machines SET status = 'maintenance' WHERE id = %s", [kept])
            sleep_in(conn, "machines_zz_sleep")
            conn.execute("SET LOCAL statement_timeout = '150ms'")
            with pytest.raises(psycopg.errors.QueryCanceled), conn.transaction():
                conn.execute("UPDATE machines SET status = 'error' WHERE id = %s", [undone])
            assert_consistent(conn)
            conn.commit()
        assert machine(admin, kept)["status"] == "maintenance"
        assert machine(admin, undone)["status"] == "idle"
        assert_consistent(admin)


LOCK_CASES = {
    # The new writer holds machines and waits for the state row the mirror needs.
    "new-waits-for-state": ("machine_state", NEW_UPDATE),
    # The legacy writer holds the state row and waits for machines (the carry).
    "legacy-waits-for-machines": ("machines", LEGACY_STATE_UPDATE),
    "rpc-waits-for-machines": ("machines", RPC_CALLS["error"]),
}


def test_lock_timeout_rolls_back_the_whole_write(db: Any, subtests: Any) -> None:
    with db.connect() as admin:
        for case, (locked_table, statement) in LOCK_CASES.items():
            with subtests.test(case=case):
                machine_id = add_machine(admin, status="idle")
                before = snapshot(admin)
                key = "id" if locked_table == "machines" else "machine_id"
                with db.connect(autocommit=False) as blocker, db.connect() as writer:
                    # Row lock only: the writer takes its first row, then blocks
                    # inside the trigger that needs the other table's row.
                    blocker.execute(
                        sql.SQL("SELECT 1 FROM {} WHERE {} = %s FOR UPDATE").format(
                            sql.Identifier(locked_table), sql.Identifier(key)
                        ),
                        [machine_id],
                    )
                    writer.execute("SET lock_timeout = '150ms'")
                    with pytest.raises(psycopg.errors.LockNotAvailable):
                        writer.execute(statement, {**legacy_params(machine_id), "msg": "x"})
                    blocker.rollback()
                assert snapshot(admin) == before
                assert_consistent(admin)


def test_a_writer_waiting_on_a_lock_can_be_killed(db: Any) -> None:
    """Killed while the mirror waits for a row lock: nothing of it remains."""
    with db.connect() as admin:
        machine_id = add_machine(admin, status="idle")
        before = snapshot(admin)
        with db.connect(autocommit=False) as blocker, db.connect() as victim:
            blocker.execute(
                "SELECT 1 FROM machine_state WHERE machine_id = %s FOR UPDATE", [machine_id]
            )
            thread, failures = _run_in_thread(lambda: victim.execute(NEW_UPDATE, {"m": machine_id}))
            wait_until_lock_waiting(admin, victim.info.backend_pid)
            terminate(admin, victim.info.backend_pid)
            thread.join()
            blocker.rollback()
        assert len(failures) == 1
        assert isinstance(failures[0], psycopg.OperationalError)
        assert snapshot(admin) == before
        assert_consistent(admin)
