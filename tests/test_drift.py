"""Drift is detected by machine_sync.drift and repaired by machine_sync.reconcile_v1().

Drift can only arise by bypassing the triggers; these tests bypass them the
way a data-only restore does (session_replication_role = replica, which only
the server's superuser may set).
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from machines import (
    add_machine,
    assert_consistent,
    bypassing_triggers,
    disagreements,
    machine,
    start,
    state,
)


def problems(conn):
    return dict(conn.execute("SELECT machine_id, problem FROM machine_sync.drift").fetchall())


def reconcile(conn):
    """{machine_id: (problem, repaired, reason)} from one reconcile() call."""
    return {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT machine_id, problem, repaired, reason FROM machine_sync.reconcile_v1()"
        ).fetchall()
    }


def test_drift_is_empty_in_normal_operation(conn):
    for status in ("idle", "error", "offline", "maintenance"):
        add_machine(conn, status=status)
    start(conn, add_machine(conn))
    assert problems(conn) == {}
    assert reconcile(conn) == {}


def test_every_kind_of_drift_is_detected_and_repaired(db, conn):
    missing, case, value, since, noncanonical, fine = (add_machine(conn) for _ in range(6))
    orphan = uuid.uuid4()
    bypassing_triggers(
        db,
        ("DELETE FROM machine_state WHERE machine_id = %s", [missing]),
        ("UPDATE machine_state SET current_state = 'IDLE' WHERE machine_id = %s", [case]),
        ("UPDATE machines SET failure_description = 'only here' WHERE id = %s", [value]),
        ("UPDATE machines SET status_since = '2001-01-01' WHERE id = %s", [since]),
        ("UPDATE machines SET status = 'Idle' WHERE id = %s", [noncanonical]),
        ("INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'idle')", [orphan]),
    )
    assert problems(conn) == {
        missing: "missing_state",
        case: "status_case",
        value: "value_mismatch",
        since: "value_mismatch",
        noncanonical: "status_case",
        orphan: "orphaned_state",
    }
    assert len(disagreements(conn)) == 5  # status_since is compared by the view only
    report = reconcile(conn)
    assert {key: (problem, repaired) for key, (problem, repaired, _) in report.items()} == {
        missing: ("missing_state", True),
        case: ("status_case", True),
        value: ("value_mismatch", True),
        since: ("value_mismatch", True),
        noncanonical: ("status_case", True),
        orphan: ("orphaned_state", True),
    }
    assert all(reason is None for _, _, reason in report.values())
    assert_consistent(conn)
    assert machine(conn, noncanonical)["status"] == "idle"
    assert state(conn, value)["failure_description"] == "only here"
    assert state(conn, since)["state_since"] == machine(conn, since)["status_since"]
    assert state(conn, fine) is not None
    assert reconcile(conn) == {}


def test_reconcile_repairs_a_stored_row_that_breaks_the_rules(db, conn):
    """A restored machine 'idle' with a process: the rules end the run."""
    machine_id = add_machine(conn)
    bypassing_triggers(
        db,
        ("UPDATE machines SET current_process_id = %s WHERE id = %s", [uuid.uuid4(), machine_id]),
    )
    assert problems(conn) == {machine_id: "value_mismatch"}
    assert reconcile(conn) == {machine_id: ("value_mismatch", True, None)}
    assert machine(conn, machine_id)["current_process_id"] is None
    assert_consistent(conn)


def test_noncanonical_status_in_both_tables_is_detected(db, conn):
    machine_id = add_machine(conn)
    process = start(conn, machine_id)
    bypassing_triggers(
        db,
        ("UPDATE machines SET status = 'running' WHERE id = %s", [machine_id]),
        ("UPDATE machine_state SET current_state = 'running' WHERE machine_id = %s", [machine_id]),
    )
    assert problems(conn) == {machine_id: "noncanonical_status"}
    assert reconcile(conn) == {machine_id: ("noncanonical_status", True, None)}
    assert machine(conn, machine_id)["status"] == "processing"
    assert machine(conn, machine_id)["current_process_id"] == process
    assert_consistent(conn)


def test_reconcile_keeps_state_since_when_only_the_spelling_differs(db, conn):
    machine_id = add_machine(conn)
    since = state(conn, machine_id)["state_since"]
    bypassing_triggers(
        db,
        ("UPDATE machine_state SET current_state = 'IDLE' WHERE machine_id = %s", [machine_id]),
    )
    reconcile(conn)
    assert state(conn, machine_id)["state_since"] == since
    assert machine(conn, machine_id)["status_since"] == since


def test_reconcile_works_in_strict_mode(db, conn):
    machine_id = add_machine(conn)
    conn.execute("SELECT machine_sync.set_mode_v1('strict')")
    bypassing_triggers(db, ("DELETE FROM machine_state WHERE machine_id = %s", [machine_id]))
    assert reconcile(conn) == {machine_id: ("missing_state", True, None)}
    assert_consistent(conn)


def test_reconcile_refuses_while_triggers_are_bypassed(db):
    with db.connect(admin=True) as admin:
        add_machine(admin)
        admin.execute("SET session_replication_role = replica")
        with pytest.raises(
            psycopg.errors.ObjectNotInPrerequisiteState, match="session_replication"
        ):
            admin.execute("SELECT * FROM machine_sync.reconcile_v1()")


def test_reconcile_reports_an_unknown_status_and_repairs_the_others(db, conn):
    unknown, other = add_machine(conn), add_machine(conn)
    bypassing_triggers(
        db,
        ("UPDATE machines SET status = 'warming' WHERE id = %s", [unknown]),
        ("DELETE FROM machine_state WHERE machine_id = %s", [other]),
    )
    report = reconcile(conn)
    assert report[other] == ("missing_state", True, None)
    problem, repaired, reason = report[unknown]
    assert (problem, repaired) == ("noncanonical_status", False)
    assert "'warming'" in reason
    assert "allowed_status" in reason
    assert machine(conn, unknown)["status"] == "warming"  # nothing guessed
    assert problems(conn) == {unknown: "noncanonical_status"}
    conn.execute("INSERT INTO machine_sync.allowed_status VALUES ('warming', 'Heating up.')")
    assert reconcile(conn) == {unknown: ("value_mismatch", True, None)}
    assert_consistent(conn)


def test_drift_view_shows_only_what_the_caller_may_see(db, conn):
    machine_id = add_machine(conn)
    bypassing_triggers(db, ("DELETE FROM machine_state WHERE machine_id = %s", [machine_id]))
    with db.connect() as api:
        api.execute("SET ROLE service_role")
        assert problems(api) == {machine_id: "missing_state"}
        api.execute("RESET ROLE")
        api.execute("SET ROLE anon")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            api.execute("SELECT * FROM machine_sync.drift")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            api.execute("SELECT * FROM machine_sync.reconcile_v1()")


def test_where_policies_bind_the_owner_reconcile_fails_rather_than_delete_state_rows(db):
    """FORCE ROW LEVEL SECURITY with an owner lacking BYPASSRLS: reconcile_v1()
    runs as the owner, from whom the policies on machines hide every machine,
    while the state rows stay visible to it (as a member of the mirror role).
    Every state row would look orphaned and be deleted as "repaired". It
    refuses (42501) instead, and nothing is deleted. (Rolled back: the role
    attribute is the cluster's.)"""
    owner = sql.Identifier(db.cluster.owner)
    with db.connect(admin=True, autocommit=False) as admin:
        admin.execute(sql.SQL("ALTER ROLE {} NOBYPASSRLS").format(owner))
        admin.execute(sql.SQL("SET ROLE {}").format(owner))
        machine_id = add_machine(admin)
        admin.execute("ALTER TABLE machines ENABLE ROW LEVEL SECURITY")
        admin.execute("ALTER TABLE machines FORCE ROW LEVEL SECURITY")
        admin.execute("SET ROLE service_role")
        admin.execute("SAVEPOINT attempt")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            admin.execute("SELECT * FROM machine_sync.reconcile_v1()").fetchall()
        admin.execute("ROLLBACK TO SAVEPOINT attempt")
        admin.execute("RESET ROLE")
        assert state(admin, machine_id) is not None
        admin.rollback()
