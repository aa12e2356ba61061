"""Transition mode: legacy writers of machine_state keep working (compat) or are refused
(strict)."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest

from machines import add_machine, assert_consistent, machine, state, wait_until_lock_waiting

# The four legacy write paths of legacy-system.md, statement by statement, in
# their original order. Each statement is its own autocommit transaction.
LEGACY_PATHS = {
    "start": [
        "UPDATE machines SET status = 'processing', current_process_id = %(p)s,"
        " updated_at = '2020-01-01' WHERE id = %(m)s",
        "UPDATE machine_state SET current_state = 'processing', process_id = %(p)s,"
        " state_since = '2020-01-01', is_failure_mode = false, failure_component = NULL,"
        " failure_description = NULL WHERE machine_id = %(m)s",
    ],
    "complete": [
        "UPDATE machines SET status = 'idle', current_process_id = NULL WHERE id = %(m)s",
        "UPDATE machine_state SET current_state = 'idle', process_id = NULL,"
        " state_since = '2020-01-01', is_failure_mode = false WHERE machine_id = %(m)s",
    ],
    "error": [
        "UPDATE machine_state SET current_state = 'error', is_failure_mode = true,"
        " failure_description = 'Recipe execution error: ' || %(msg)s WHERE machine_id = %(m)s",
        "UPDATE machines SET status = 'error', current_process_id = NULL WHERE id = %(m)s",
    ],
    "stop": [
        "UPDATE machines SET current_process_id = NULL WHERE id = %(m)s",
        "UPDATE machine_state SET current_state = 'idle', process_id = NULL,"
        " is_failure_mode = false WHERE machine_id = %(m)s",
    ],
}


def run_legacy(conn, path, machine_id, process_id=None, message="boom", check_between=True):
    params = {"m": machine_id, "p": process_id or uuid.uuid4(), "msg": message}
    for statement in LEGACY_PATHS[path]:
        result = conn.execute(statement, params)
        # supabase-py treats 0 affected rows as a failure.
        assert result.rowcount == 1
        if check_between:
            assert_consistent(conn)


def test_compat_is_the_default_mode(conn):
    assert conn.execute("SELECT machine_sync.mode()").fetchone() == ("compat",)


@pytest.mark.parametrize("initial", ["idle", "IDLE"])
def test_every_legacy_path_ends_consistent_in_compat(db, initial):
    with db.connect() as conn:
        machine_id = add_machine(conn, status=initial)
        process = uuid.uuid4()
        run_legacy(conn, "start", machine_id, process)
        assert machine(conn, machine_id)["current_process_id"] == process
        run_legacy(conn, "error", machine_id, message="chamber leak")
        assert machine(conn, machine_id)["failure_description"] == (
            "Recipe execution error: chamber leak"
        )
        assert state(conn, machine_id)["is_failure_mode"] is True
        run_legacy(conn, "complete", machine_id)
        assert machine(conn, machine_id)["failure_description"] is None
        run_legacy(conn, "start", machine_id)
        run_legacy(conn, "stop", machine_id)
        final = machine(conn, machine_id)
        assert (final["status"], final["current_process_id"]) == ("idle", None)
        assert_consistent(conn)


def test_legacy_write_with_client_clock_is_ignored(conn):
    machine_id = add_machine(conn)
    run_legacy(conn, "start", machine_id)
    s = state(conn, machine_id)
    assert s["state_since"].year > 2020
    assert s["updated_at"].year > 2020


def test_legacy_state_write_alone_lands_in_machines(conn):
    machine_id = add_machine(conn)
    result = conn.execute(
        "UPDATE machine_state SET current_state = 'MAINTENANCE' WHERE machine_id = %s RETURNING *",
        [machine_id],
    )
    assert result.rowcount == 1
    assert result.fetchone()[1] == "maintenance"  # the row reported is the row stored
    assert machine(conn, machine_id)["status"] == "maintenance"
    assert_consistent(conn)


def test_legacy_state_write_that_agrees_does_not_write_machines(conn):
    machine_id = add_machine(conn, status="idle")
    version = conn.execute("SELECT xmin::text FROM machines WHERE id = %s", [machine_id]).fetchone()
    conn.execute(
        "UPDATE machine_state SET current_state = 'IDLE' WHERE machine_id = %s", [machine_id]
    )
    assert (
        conn.execute("SELECT xmin::text FROM machines WHERE id = %s", [machine_id]).fetchone()
        == version
    )


def test_a_plain_insert_of_an_existing_state_row_fails_as_it_always_did(conn):
    # The mirror creates the row with the machine; replacing it on INSERT would
    # change what upserts mean, so a plain INSERT conflicts, as in PostgreSQL.
    machine_id = add_machine(conn, status="offline")
    with pytest.raises(psycopg.errors.UniqueViolation, match="machine_state_pkey"):
        conn.execute(
            "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'Idle')",
            [machine_id],
        )
    assert machine(conn, machine_id)["status"] == "offline"
    assert_consistent(conn)


def test_legacy_upsert_of_machine_state(conn):
    machine_id = add_machine(conn)
    result = conn.execute(
        """INSERT INTO machine_state (machine_id, current_state, is_failure_mode,
               failure_description) VALUES (%s, 'error', true, 'x')
           ON CONFLICT (machine_id) DO UPDATE SET current_state = excluded.current_state,
               failure_description = excluded.failure_description""",
        [machine_id],
    )
    assert result.rowcount == 1
    m = machine(conn, machine_id)
    assert (m["status"], m["failure_description"]) == ("error", "x")
    assert_consistent(conn)


def test_legacy_write_with_unknown_status_changes_nothing(conn):
    machine_id = add_machine(conn)
    with pytest.raises(psycopg.errors.CheckViolation, match="allowed statuses"):
        conn.execute(
            "UPDATE machine_state SET current_state = 'warming' WHERE machine_id = %s", [machine_id]
        )
    assert state(conn, machine_id)["current_state"] == "idle"
    assert_consistent(conn)


def test_machine_id_of_a_state_row_cannot_change(conn):
    a, b = add_machine(conn), add_machine(conn)
    conn.execute("DELETE FROM machines WHERE id = %s", [b])
    with pytest.raises(psycopg.errors.DatabaseError, match="machine_id cannot change") as caught:
        conn.execute("UPDATE machine_state SET machine_id = %s WHERE machine_id = %s", [b, a])
    assert caught.value.sqlstate == "MS001"


def test_strict_refuses_every_direct_write(conn):
    machine_id = add_machine(conn)
    assert conn.execute("SELECT machine_sync.set_mode(' STRICT ')").fetchone() == ("strict",)
    assert conn.execute("SELECT machine_sync.mode()").fetchone() == ("strict",)
    for statement in (
        "UPDATE machine_state SET current_state = 'idle' WHERE machine_id = %s",
        "INSERT INTO machine_state (machine_id) VALUES (%s)",
        "INSERT INTO machine_state (machine_id) VALUES (%s) ON CONFLICT (machine_id) DO NOTHING",
    ):
        with pytest.raises(psycopg.errors.DatabaseError, match=r"write public\.machines") as caught:
            conn.execute(statement, [machine_id])
        assert caught.value.sqlstate == "MS001"
    # ...while writes to machines still mirror.
    conn.execute("UPDATE machines SET status = 'processing' WHERE id = %s", [machine_id])
    assert state(conn, machine_id)["current_state"] == "processing"
    conn.execute("SELECT machine_sync.set_mode('compat')")
    run_legacy(conn, "complete", machine_id)


def test_set_mode_refuses_unknown_values(conn):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="use 'compat' or 'strict'"):
        conn.execute("SELECT machine_sync.set_mode('lenient')")
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT machine_sync.set_mode(NULL)")
    assert conn.execute("SELECT machine_sync.mode()").fetchone() == ("compat",)


@pytest.mark.parametrize("mode", ["compat", "strict"])
def test_direct_delete_is_always_refused(conn, mode):
    conn.execute("SELECT machine_sync.set_mode(%s)", [mode])
    machine_id = add_machine(conn)
    with pytest.raises(psycopg.errors.DatabaseError, match="deleted with their machine") as caught:
        conn.execute("DELETE FROM machine_state WHERE machine_id = %s", [machine_id])
    assert caught.value.sqlstate == "MS001"
    assert state(conn, machine_id) is not None


@pytest.mark.parametrize("mode", ["compat", "strict"])
def test_truncate_of_machine_state_alone_is_refused(conn, mode):
    conn.execute("SELECT machine_sync.set_mode(%s)", [mode])
    add_machine(conn)
    with pytest.raises(psycopg.errors.DatabaseError, match=r"TRUNCATE public\.machines CASCADE"):
        conn.execute("TRUNCATE machine_state")
    assert conn.execute("SELECT count(*) FROM machine_state").fetchone() == (1,)
    conn.execute("TRUNCATE machines, machine_state")
    assert_consistent(conn)


def test_racing_legacy_writers_interleaved_end_consistent(db):
    """Two legacy writers interleave their statements on one machine (the
    production race): whatever the interleaving, the tables agree."""
    with db.connect() as a, db.connect() as b:
        machine_id = add_machine(a)
        start, complete = LEGACY_PATHS["start"], LEGACY_PATHS["complete"]
        params = {"m": machine_id, "p": uuid.uuid4(), "msg": ""}
        a.execute(start[0], params)
        b.execute(complete[0], params)
        b.execute(complete[1], params)
        a.execute(start[1], params)
        assert_consistent(a)
        assert machine(a, machine_id)["status"] == "processing"


def test_a_stuck_legacy_write_cannot_stall_other_writers_for_long(db):
    """The compat lock order makes a legacy write hold machines' table lock; if
    that write is itself stuck behind a row lock, its wait is capped (55P03) so
    writers of other machines go on."""
    with db.connect() as setup:
        stuck, other = add_machine(setup), add_machine(setup)
    with (
        db.connect(autocommit=False) as holder,
        db.connect() as legacy,
        db.connect(options="-c statement_timeout=20s") as writer,
    ):
        holder.execute("SELECT FROM machine_state WHERE machine_id = %s FOR UPDATE", [stuck])
        outcome = {}

        def legacy_write():
            try:
                legacy.execute(
                    "UPDATE machine_state SET current_state = 'maintenance' WHERE machine_id = %s",
                    [stuck],
                )
                outcome["legacy"] = "written"
            except psycopg.Error as error:
                outcome["legacy"] = error

        thread = threading.Thread(target=legacy_write)
        thread.start()
        # It takes the table lock, then waits for the row.
        wait_until_lock_waiting(writer, legacy.info.backend_pid)
        writer.execute("UPDATE machines SET status = 'offline' WHERE id = %s", [other])
        thread.join()
        holder.rollback()
        assert isinstance(outcome["legacy"], psycopg.errors.LockNotAvailable)
        assert machine(writer, other)["status"] == "offline"
        assert machine(writer, stuck)["status"] == "idle"
        assert_consistent(writer)


@pytest.mark.parametrize("caller_setting", ["0", "5s", "200ms"])
def test_the_lock_wait_cap_ends_with_the_statement(db, caller_setting):
    with db.connect() as setup:
        machine_id = add_machine(setup)
    with db.connect(autocommit=False) as conn:
        conn.execute(f"SET LOCAL lock_timeout = '{caller_setting}'")
        conn.execute(
            "UPDATE machine_state SET current_state = 'maintenance' WHERE machine_id = %s",
            [machine_id],
        )
        assert conn.execute("SHOW lock_timeout").fetchone() == (caller_setting,)
        conn.commit()
        assert_consistent(conn)


@pytest.mark.parametrize("prelude", ["savepoint retry", "write to another table"])
def test_lock_order_holds_after_an_earlier_write_or_a_retried_savepoint(db, prelude):
    """A transaction with an id but no write lock on machines still takes the
    lock first; otherwise it could deadlock with a machines writer (40P01)."""
    with db.connect() as setup:
        x, y = add_machine(setup), add_machine(setup)
        setup.execute("CREATE TABLE side (n int)")
    with (
        db.connect(autocommit=False) as legacy,
        db.connect(autocommit=False) as writer,
        db.connect() as observer,
    ):
        if prelude == "savepoint retry":
            legacy.execute("SAVEPOINT attempt")
            with pytest.raises(psycopg.errors.CheckViolation):
                legacy.execute(
                    "UPDATE machine_state SET current_state = 'bogus' WHERE machine_id = %s", [x]
                )
            legacy.execute("ROLLBACK TO SAVEPOINT attempt")
        else:
            legacy.execute("INSERT INTO side VALUES (1)")
        writer.execute("UPDATE machines SET status = 'maintenance' WHERE id = %s", [y])
        outcome = {}

        def legacy_write():
            try:
                legacy.execute(
                    "UPDATE machine_state SET current_state = 'offline'"
                    " WHERE machine_id = %s OR machine_id = %s",
                    [x, y],
                )
                legacy.commit()
                outcome["legacy"] = "committed"
            except psycopg.Error as error:
                outcome["legacy"] = error

        thread = threading.Thread(target=legacy_write)
        thread.start()
        # It waits for machines' lock, holding no state row yet.
        wait_until_lock_waiting(observer, legacy.info.backend_pid)
        writer.execute("UPDATE machines SET status = 'offline' WHERE id = %s", [x])
        writer.commit()
        thread.join()
        assert outcome["legacy"] == "committed"
    with db.connect() as conn:
        assert_consistent(conn)
