"""Drift is detected by machine_sync.drift and repaired by machine_sync.reconcile().

Drift can only arise by bypassing the triggers; these tests bypass them the
way a data-only restore does (session_replication_role = replica).
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

from machines import add_machine, assert_consistent, disagreements, machine, state


def bypassing_triggers(conn, *statements):
    conn.execute("SET session_replication_role = replica")
    try:
        for statement, params in statements:
            conn.execute(statement, params)
    finally:
        conn.execute("SET session_replication_role = origin")


def problems(conn):
    return dict(conn.execute("SELECT machine_id, problem FROM machine_sync.drift").fetchall())


def test_drift_is_empty_in_normal_operation(conn):
    for status in ("idle", "error", "processing"):
        add_machine(conn, status=status)
    assert problems(conn) == {}


def test_every_kind_of_drift_is_detected_and_repaired(conn):
    missing, case, value, noncanonical, fine = (add_machine(conn) for _ in range(5))
    orphan = uuid.uuid4()
    bypassing_triggers(
        conn,
        ("DELETE FROM machine_state WHERE machine_id = %s", [missing]),
        ("UPDATE machine_state SET current_state = 'IDLE' WHERE machine_id = %s", [case]),
        ("UPDATE machines SET current_process_id = %s WHERE id = %s", [uuid.uuid4(), value]),
        ("UPDATE machines SET status = 'Idle' WHERE id = %s", [noncanonical]),
        ("INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'idle')", [orphan]),
    )
    assert problems(conn) == {
        missing: "missing_state",
        case: "status_case",
        value: "value_mismatch",
        noncanonical: "status_case",
        orphan: "orphaned_state",
    }
    assert len(disagreements(conn)) == 5  # the view agrees with an independent check
    assert conn.execute("SELECT machine_sync.reconcile()").fetchone() == (5,)
    assert_consistent(conn)
    assert machine(conn, noncanonical)["status"] == "idle"
    assert state(conn, value)["process_id"] == machine(conn, value)["current_process_id"]
    assert state(conn, fine) is not None
    assert conn.execute("SELECT machine_sync.reconcile()").fetchone() == (0,)


def test_noncanonical_status_in_both_tables_is_detected(conn):
    machine_id = add_machine(conn)
    bypassing_triggers(
        conn,
        ("UPDATE machines SET status = 'running' WHERE id = %s", [machine_id]),
        ("UPDATE machine_state SET current_state = 'running' WHERE machine_id = %s", [machine_id]),
    )
    assert problems(conn) == {machine_id: "noncanonical_status"}
    assert conn.execute("SELECT machine_sync.reconcile()").fetchone() == (1,)
    assert machine(conn, machine_id)["status"] == "processing"
    assert_consistent(conn)


def test_reconcile_keeps_state_since_when_only_the_spelling_differs(conn):
    machine_id = add_machine(conn)
    since = state(conn, machine_id)["state_since"]
    bypassing_triggers(
        conn,
        ("UPDATE machine_state SET current_state = 'IDLE' WHERE machine_id = %s", [machine_id]),
    )
    conn.execute("SELECT machine_sync.reconcile()")
    assert state(conn, machine_id)["state_since"] == since


def test_reconcile_works_in_strict_mode(conn):
    machine_id = add_machine(conn)
    conn.execute("SELECT machine_sync.set_mode('strict')")
    bypassing_triggers(conn, ("DELETE FROM machine_state WHERE machine_id = %s", [machine_id]))
    assert conn.execute("SELECT machine_sync.reconcile()").fetchone() == (1,)
    assert_consistent(conn)


def test_reconcile_refuses_while_triggers_are_bypassed(conn):
    add_machine(conn)
    conn.execute("SET session_replication_role = replica")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="session_replication"):
        conn.execute("SELECT machine_sync.reconcile()")


def test_reconcile_names_an_unknown_status_instead_of_guessing(conn):
    machine_id = add_machine(conn)
    bypassing_triggers(conn, ("UPDATE machines SET status = 'warming' WHERE id = %s", [machine_id]))
    with pytest.raises(psycopg.errors.CheckViolation, match="'warming'"):
        conn.execute("SELECT machine_sync.reconcile()")
    assert machine(conn, machine_id)["status"] == "warming"  # nothing half-repaired
