"""Every write to machines is mirrored into machine_state in the same transaction."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from machines import add_machine, assert_consistent, machine, start, state


def test_insert_creates_an_agreeing_state_row(conn):
    machine_id = add_machine(conn, status="offline")
    row = state(conn, machine_id)
    assert row is not None
    assert (row["current_state"], row["process_id"], row["is_failure_mode"]) == (
        "offline",
        None,
        False,
    )
    assert_consistent(conn)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (" IDLE ", "idle"),
        ("Processing", "processing"),
        ("running", "processing"),
        ("\tError\n", "error"),
        ("MAINTENANCE", "maintenance"),
    ],
)
def test_status_is_normalized(conn, given, stored):
    machine_id = add_machine(conn, status="offline")
    # 'processing' needs its process: give one with every spelling (unused otherwise).
    conn.execute(
        """UPDATE machines SET status = %s,
               current_process_id = CASE WHEN %s = 'processing' THEN gen_random_uuid() END
           WHERE id = %s""",
        [given, stored, machine_id],
    )
    assert machine(conn, machine_id)["status"] == stored
    assert state(conn, machine_id)["current_state"] == stored
    assert_consistent(conn)


@pytest.mark.parametrize("spelling", ["IDLE", " idle", "idle\n"])
def test_status_is_normalized_on_insert(conn, spelling):
    machine_id = add_machine(conn, status=spelling)
    assert machine(conn, machine_id)["status"] == "idle"
    assert state(conn, machine_id)["current_state"] == "idle"
    assert_consistent(conn)


@pytest.mark.parametrize("spelling", ["İDLE", "\uff49\uff44\uff4c\uff45", "idle\u200b"])
def test_only_ascii_case_and_white_space_are_folded(conn, spelling):
    machine_id = add_machine(conn, status="offline")
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE machines SET status = %s WHERE id = %s", [spelling, machine_id])
    assert machine(conn, machine_id)["status"] == "offline"


@pytest.mark.parametrize("bad", ["busy", "", "   ", "idle!", "run ning"])
def test_unknown_status_is_refused_naming_the_allowed_values(conn, bad):
    machine_id = add_machine(conn, status="idle")
    before = (machine(conn, machine_id), state(conn, machine_id))
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        conn.execute("UPDATE machines SET status = %s WHERE id = %s", [bad, machine_id])
    message = str(caught.value)
    assert "invalid machine status" in message
    assert "error, idle, maintenance, offline, processing" in message
    assert caught.value.diag.constraint_name == "machines_status_allowed"
    assert (machine(conn, machine_id), state(conn, machine_id)) == before


def test_null_status_is_refused(conn):
    machine_id = add_machine(conn)
    with pytest.raises(psycopg.errors.CheckViolation, match="invalid machine status NULL"):
        conn.execute("UPDATE machines SET status = NULL WHERE id = %s", [machine_id])


def test_operators_extend_the_vocabulary_without_editing_functions(conn):
    machine_id = add_machine(conn)
    conn.execute(
        "INSERT INTO machine_sync.allowed_status VALUES ('calibrating', 'Running a calibration.')"
    )
    conn.execute("INSERT INTO machine_sync.status_alias VALUES ('cal', 'calibrating')")
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("UPDATE machines SET status = ' CAL' WHERE id = %s", [machine_id])
    assert caught.value.sqlstate == "MS003"
    assert "cannot go from idle to calibrating" in str(caught.value)
    conn.execute("INSERT INTO machine_sync.allowed_transition VALUES ('idle', 'calibrating')")
    conn.execute("UPDATE machines SET status = ' CAL' WHERE id = %s", [machine_id])
    assert state(conn, machine_id)["current_state"] == "calibrating"
    assert_consistent(conn)


def test_update_mirrors_every_paired_column(conn):
    machine_id = add_machine(conn)
    process = start(conn, machine_id)
    m, s = machine(conn, machine_id), state(conn, machine_id)
    assert (s["current_state"], s["process_id"], s["state_since"]) == (
        "processing",
        process,
        m["status_since"],
    )
    component = uuid.uuid4()
    conn.execute(
        """UPDATE machines SET status = 'error',
           failure_description = 'valve stuck', failure_component = %s WHERE id = %s""",
        [component, machine_id],
    )
    m, row = machine(conn, machine_id), state(conn, machine_id)
    # Leaving processing ends the run: the process is cleared in both tables.
    assert (
        row["current_state"],
        row["process_id"],
        row["is_failure_mode"],
        row["failure_description"],
        row["failure_component"],
        row["state_since"],
    ) == ("error", None, True, "valve stuck", component, m["status_since"])
    assert m["current_process_id"] is None
    assert_consistent(conn)


def test_leaving_error_clears_the_failure_fields(conn):
    machine_id = add_machine(
        conn, status="error", failure_description="boom", failure_component=uuid.uuid4()
    )
    conn.execute("UPDATE machines SET status = 'idle' WHERE id = %s", [machine_id])
    m, s = machine(conn, machine_id), state(conn, machine_id)
    assert (m["failure_description"], m["failure_component"]) == (None, None)
    assert (s["failure_description"], s["failure_component"], s["is_failure_mode"]) == (
        None,
        None,
        False,
    )


def test_state_since_moves_only_when_the_state_changes(conn):
    machine_id = add_machine(conn, status="idle")
    since = state(conn, machine_id)["state_since"]
    assert machine(conn, machine_id)["status_since"] == since
    conn.execute(
        "UPDATE machines SET status = 'IDLE', location = 'Bay 9' WHERE id = %s", [machine_id]
    )
    conn.execute(
        "UPDATE machines SET status_since = '2001-01-01', failure_description = 'x' WHERE id = %s",
        [machine_id],
    )
    assert state(conn, machine_id)["state_since"] == since
    assert machine(conn, machine_id)["status_since"] == since
    start(conn, machine_id)
    assert state(conn, machine_id)["state_since"] > since
    assert machine(conn, machine_id)["status_since"] == state(conn, machine_id)["state_since"]
    assert_consistent(conn)


def test_the_hot_path_decides_as_the_general_rules_at_its_edges(db, conn):
    """A status change meets a shortcut only where the general rules would come
    to the same; just past each of its edges the outcome is the general one."""
    # A processing machine written with another spelling of its own status and
    # its own process: no change of status, so no stop.
    running = add_machine(conn, status="idle")
    run = start(conn, running)
    conn.execute(
        "UPDATE machines SET status = 'Processing', current_process_id = %s WHERE id = %s",
        [run, running],
    )
    assert (machine(conn, running)["status"], machine(conn, running)["current_process_id"]) == (
        "processing",
        run,
    )
    # A run ended by naming it: the process is let go, the clocks move.
    since = state(conn, running)["state_since"]
    conn.execute(
        "UPDATE machines SET status = 'idle', current_process_id = %s WHERE id = %s",
        [run, running],
    )
    m, s = machine(conn, running), state(conn, running)
    assert (m["status"], m["current_process_id"], s["process_id"]) == ("idle", None, None)
    assert s["state_since"] == m["status_since"] > since
    # Three changes in one transaction: each after the first finds the status
    # changed already (its since is now()); the state row ends as the machine.
    with conn.transaction():
        now = conn.execute("SELECT now()").fetchone()[0]
        again = start(conn, running)
        conn.execute("UPDATE machines SET status = 'idle' WHERE id = %s", [running])
        conn.execute(
            "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s",
            [again, running],
        )
    s = state(conn, running)
    assert (s["current_state"], s["process_id"], s["state_since"]) == ("processing", again, now)
    # A change the rules refuse keeps its own message: a start from maintenance.
    kept = add_machine(conn, status="maintenance")
    with pytest.raises(psycopg.Error) as refused:
        start(conn, kept)
    assert refused.value.sqlstate == "MS003"
    assert "cannot go from maintenance to processing" in str(refused.value)
    # A missing state row is written by the next change.
    lost = add_machine(conn, status="idle")
    with db.connect(admin=True) as admin:
        admin.execute("SET session_replication_role = replica")
        admin.execute("DELETE FROM machine_state WHERE machine_id = %s", [lost])
    process = start(conn, lost)
    assert (state(conn, lost)["current_state"], state(conn, lost)["process_id"]) == (
        "processing",
        process,
    )
    assert_consistent(conn)


def test_updated_at_comes_from_the_database_clock(conn):
    machine_id = add_machine(conn, updated_at="2001-01-01T00:00:00Z")
    assert machine(conn, machine_id)["updated_at"].year > 2001
    conn.execute(
        """UPDATE machines SET status = 'processing', current_process_id = gen_random_uuid(),
               updated_at = '1999-01-01' WHERE id = %s""",
        [machine_id],
    )
    m, s = machine(conn, machine_id), state(conn, machine_id)
    now = conn.execute("SELECT now()").fetchone()[0]
    assert m["updated_at"] == s["updated_at"]
    assert abs((now - m["updated_at"]).total_seconds()) < 60


def test_an_update_that_changes_nothing_mirrored_does_not_rewrite_state(conn):
    machine_id = add_machine(conn)
    version = conn.execute(
        "SELECT xmin::text FROM machine_state WHERE machine_id = %s", [machine_id]
    ).fetchone()
    conn.execute(
        "UPDATE machines SET location = 'Bay 7', status = 'Idle' WHERE id = %s", [machine_id]
    )
    assert (
        conn.execute(
            "SELECT xmin::text FROM machine_state WHERE machine_id = %s", [machine_id]
        ).fetchone()
        == version
    )


def test_mirror_is_visible_inside_the_open_transaction_and_rolls_back(db):
    with db.connect() as setup:
        machine_id = add_machine(setup, status="idle")
    with db.connect(autocommit=False) as writer, db.connect() as observer:
        start(writer, machine_id)
        assert state(writer, machine_id)["current_state"] == "processing"
        assert state(observer, machine_id)["current_state"] == "idle"
        writer.rollback()
        assert state(observer, machine_id)["current_state"] == "idle"
        assert machine(observer, machine_id)["status"] == "idle"
        assert_consistent(observer)


def test_a_failed_statement_changes_neither_table(conn):
    good, other = add_machine(conn), add_machine(conn)
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            """UPDATE machines SET status = CASE WHEN id = %s THEN 'maintenance' ELSE 'nope' END
               WHERE id IN (%s, %s)""",
            [good, good, other],
        )
    assert {machine(conn, good)["status"], machine(conn, other)["status"]} == {"idle"}
    assert {state(conn, good)["current_state"], state(conn, other)["current_state"]} == {"idle"}


def test_savepoint_rollback_undoes_the_mirror(db):
    with db.connect() as setup:
        machine_id = add_machine(setup)
    with db.connect(autocommit=False) as conn:
        conn.execute("UPDATE machines SET status = 'maintenance' WHERE id = %s", [machine_id])
        conn.execute("SAVEPOINT before_processing")
        conn.execute("UPDATE machines SET status = 'idle' WHERE id = %s", [machine_id])
        start(conn, machine_id)
        assert state(conn, machine_id)["current_state"] == "processing"
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE machines SET status = 'bogus' WHERE id = %s", [machine_id])
        conn.execute("ROLLBACK TO SAVEPOINT before_processing")
        assert state(conn, machine_id)["current_state"] == "maintenance"
        conn.commit()
        assert_consistent(conn)


def test_multi_row_update(conn):
    ids = [add_machine(conn, status="offline") for _ in range(25)]
    result = conn.execute("UPDATE machines SET status = 'IDLE' WHERE id = ANY(%s)", [ids])
    assert result.rowcount == 25
    assert conn.execute(
        "SELECT count(*) FROM machine_state WHERE current_state = 'idle' AND machine_id = ANY(%s)",
        [ids],
    ).fetchone() == (25,)
    assert_consistent(conn)


def test_insert_on_conflict_do_update(conn):
    machine_id = add_machine(conn, status="idle")
    process = uuid.uuid4()
    # BEFORE INSERT sees the proposed row: it must obey the rules on its own.
    conn.execute(
        """INSERT INTO machines (id, serial_number, location, lab_name, lab_institution, model,
               machine_type, install_date, last_maintenance_date, admin_id, status,
               current_process_id)
           SELECT id, serial_number, location, lab_name, lab_institution, model, machine_type,
               install_date, last_maintenance_date, admin_id, 'Running', %s
           FROM machines WHERE id = %s
           ON CONFLICT (id) DO UPDATE
           SET status = excluded.status, current_process_id = excluded.current_process_id""",
        [process, machine_id],
    )
    assert state(conn, machine_id)["current_state"] == "processing"
    assert state(conn, machine_id)["process_id"] == process
    assert_consistent(conn)


def test_a_new_machine_cannot_be_processing_without_a_process(conn):
    with pytest.raises(psycopg.Error) as caught:
        add_machine(conn, status="processing")
    assert caught.value.sqlstate == "MS003"
    assert conn.execute("SELECT count(*) FROM machines").fetchone() == (0,)


def test_merge(conn):
    keep, new_id = add_machine(conn, status="idle"), uuid.uuid4()
    conn.execute(
        """MERGE INTO machines AS m
           USING (VALUES (%s::uuid, 'error'), (%s::uuid, 'maintenance')) AS v(id, status)
           ON m.id = v.id
           WHEN MATCHED THEN UPDATE SET status = v.status, failure_description = 'merged'
           WHEN NOT MATCHED THEN INSERT (id, serial_number, location, lab_name, lab_institution,
               model, machine_type, install_date, last_maintenance_date, admin_id, status)
               VALUES (v.id, 'SN', 'Bay', 'Lab', 'Inst', 'M', 'ALD', now(), now(),
                       gen_random_uuid(), v.status)""",
        [keep, new_id],
    )
    assert state(conn, keep)["failure_description"] == "merged"
    assert state(conn, new_id)["current_state"] == "maintenance"
    assert_consistent(conn)


def test_delete_removes_the_state_row(conn):
    gone, kept = add_machine(conn), add_machine(conn)
    conn.execute("DELETE FROM machines WHERE id = %s", [gone])
    assert state(conn, gone) is None
    assert state(conn, kept) is not None
    assert_consistent(conn)


def test_truncate_machines_cascade_empties_both(conn):
    add_machine(conn)
    conn.execute("TRUNCATE machines CASCADE")
    assert conn.execute(
        "SELECT (SELECT count(*) FROM machines), (SELECT count(*) FROM machine_state)"
    ).fetchone() == (0, 0)
