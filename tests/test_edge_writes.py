"""Writes that are easy to forget: other triggers, CTEs, foreign-key actions, upserts.

Each of these once left the tables disagreeing or changed what an upsert means
(found in review); they stay here as regressions.
"""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from machines import add_machine, assert_consistent, machine, machine_insert, state


def test_a_later_write_by_another_trigger_is_not_overwritten_by_a_stale_mirror(conn):
    conn.execute(
        """CREATE FUNCTION public.auto_maintenance() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               UPDATE machines SET status = 'maintenance' WHERE id = NEW.id;
               RETURN NULL;
           END $$"""
    )
    # An AFTER trigger that writes machines again: the second write is mirrored too.
    conn.execute(
        "CREATE TRIGGER a_auto_maintenance AFTER UPDATE ON machines FOR EACH ROW"
        " WHEN (NEW.status = 'error') EXECUTE FUNCTION public.auto_maintenance()"
    )
    machine_id = add_machine(conn)
    conn.execute("UPDATE machines SET status = 'error' WHERE id = %s", [machine_id])
    assert machine(conn, machine_id)["status"] == "maintenance"
    assert state(conn, machine_id)["current_state"] == "maintenance"
    assert_consistent(conn)


@pytest.mark.parametrize("mode", ["compat", "strict"])
def test_a_machine_changed_in_the_statement_that_inserts_it_is_mirrored_as_it_ends(db, mode):
    """The new machine's state row is written once the statement is done with
    it: a change later in the same statement (here an RPC in a CTE, as an API
    role) is not overwritten with the machine as it was inserted."""
    with db.connect() as conn:
        conn.execute("SELECT machine_sync.set_mode_v1(%s)", [mode])
    with db.connect() as api:
        api.execute("SET ROLE service_role")
        insert, params = machine_insert()
        row = api.execute(
            f"""WITH a AS ({insert})
                SELECT a.id, public.atomic_update_machine_state(
                    p_machine_id => a.id, p_machine_status => 'maintenance'
                ) FROM a""",
            params,
        ).fetchone()
        assert row is not None
        machine_id = row[0]
    with db.connect() as conn:
        assert machine(conn, machine_id)["status"] == "maintenance"
        assert state(conn, machine_id)["current_state"] == "maintenance"
        assert_consistent(conn)


def test_an_after_insert_trigger_of_the_application_that_changes_the_new_machine(conn):
    conn.execute(
        """CREATE FUNCTION public.commission() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               UPDATE machines SET status = 'offline' WHERE id = NEW.id;
               RETURN NULL;
           END $$"""
    )
    # Sorts before zz_machine_sync_insert_state, so it fires first.
    conn.execute(
        "CREATE TRIGGER a_commission AFTER INSERT ON machines FOR EACH ROW"
        " EXECUTE FUNCTION public.commission()"
    )
    machine_id = add_machine(conn)
    assert machine(conn, machine_id)["status"] == "offline"
    assert state(conn, machine_id)["current_state"] == "offline"
    assert_consistent(conn)


def test_a_new_machine_gets_its_state_row_whatever_the_policies_on_machines(conn):
    """The state row is written from the machine as stored: a restrictive
    policy of the application's, for every role, does not hide it from the
    mirror."""
    conn.execute("ALTER TABLE machines ENABLE ROW LEVEL SECURITY")
    conn.execute("CREATE POLICY nobody_reads ON machines AS RESTRICTIVE FOR SELECT USING (false)")
    machine_id = add_machine(conn, status="maintenance")
    assert state(conn, machine_id)["current_state"] == "maintenance"
    assert_consistent(conn)


def test_where_policies_bind_the_owner_a_new_machine_is_refused_not_left_without_state(db):
    """FORCE ROW LEVEL SECURITY with an owner lacking BYPASSRLS: the mirror's
    read of the new machine as stored would find nothing. It fails with
    PostgreSQL's own error instead, and nothing is written. (Rolled back:
    the role attribute is the cluster's.)"""
    with db.connect(admin=True, autocommit=False) as admin:
        admin.execute("ALTER ROLE postgres NOBYPASSRLS")
        admin.execute("SET ROLE postgres")
        admin.execute("ALTER TABLE machines ENABLE ROW LEVEL SECURITY")
        admin.execute("ALTER TABLE machines FORCE ROW LEVEL SECURITY")
        admin.execute("CREATE POLICY everyone ON machines USING (true) WITH CHECK (true)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            add_machine(admin)
        admin.rollback()


def test_a_machine_deleted_in_the_statement_that_inserts_it_leaves_no_state_row(conn):
    conn.execute(
        """CREATE FUNCTION public.scrap(machine uuid) RETURNS uuid LANGUAGE sql
           AS 'DELETE FROM public.machines WHERE id = machine RETURNING id'"""
    )
    insert, params = machine_insert()
    row = conn.execute(f"WITH a AS ({insert}) SELECT public.scrap(a.id) FROM a", params).fetchone()
    assert row is not None
    assert machine(conn, row[0]) is None
    assert state(conn, row[0]) is None
    assert_consistent(conn)


def test_one_statement_writing_both_tables_ends_consistent(conn):
    machine_id = add_machine(conn)
    process = uuid.uuid4()
    conn.execute(
        """WITH m AS (
               UPDATE machines SET status = 'processing', current_process_id = %(p)s
               WHERE id = %(id)s RETURNING id
           )
           UPDATE machine_state SET current_state = 'maintenance' WHERE machine_id = %(id)s""",
        {"id": machine_id, "p": process},
    )
    # Both parts see the statement's snapshot and PostgreSQL skips a row the
    # same statement changed already: one of the two writes lands whole,
    # never a mix of them (the legacy part runs first here).
    m = machine(conn, machine_id)
    assert (m["status"], m["current_process_id"]) in {
        ("processing", process),
        ("maintenance", None),
    }
    assert_consistent(conn)


@pytest.mark.parametrize("mode", ["compat", "strict"])
def test_a_trigger_of_the_application_writing_machine_state_is_guarded(conn, mode):
    conn.execute("CREATE TABLE public.events (machine_id uuid, new_state text)")
    conn.execute(
        """CREATE FUNCTION public.apply_event() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               UPDATE machine_state SET current_state = NEW.new_state
               WHERE machine_id = NEW.machine_id;
               RETURN NULL;
           END $$"""
    )
    conn.execute(
        "CREATE TRIGGER apply_event AFTER INSERT ON public.events FOR EACH ROW"
        " EXECUTE FUNCTION public.apply_event()"
    )
    machine_id = add_machine(conn)
    conn.execute("SELECT machine_sync.set_mode_v1(%s)", [mode])
    if mode == "strict":
        with pytest.raises(
            psycopg.errors.DatabaseError, match="read-only in strict mode"
        ) as caught:
            conn.execute("INSERT INTO public.events VALUES (%s, 'MAINTENANCE')", [machine_id])
        assert caught.value.sqlstate == "MS001"
        assert machine(conn, machine_id)["status"] == "idle"
    else:
        conn.execute("INSERT INTO public.events VALUES (%s, 'MAINTENANCE')", [machine_id])
        assert machine(conn, machine_id)["status"] == "maintenance"
        # The rules apply to the carried write: no processing without a process.
        conn.execute("INSERT INTO public.events VALUES (%s, 'idle')", [machine_id])
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("INSERT INTO public.events VALUES (%s, 'PROCESSING')", [machine_id])
        assert caught.value.sqlstate == "MS003"
    assert_consistent(conn)


def test_a_trigger_of_the_application_cannot_delete_a_state_row(conn):
    conn.execute(
        """CREATE FUNCTION public.forget() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN DELETE FROM machine_state WHERE machine_id = NEW.id; RETURN NULL; END $$"""
    )
    conn.execute(
        "CREATE TRIGGER forget AFTER UPDATE OF location ON machines FOR EACH ROW"
        " EXECUTE FUNCTION public.forget()"
    )
    machine_id = add_machine(conn)
    with pytest.raises(psycopg.errors.DatabaseError, match="deleted with their machine"):
        conn.execute("UPDATE machines SET location = 'Bay 2' WHERE id = %s", [machine_id])
    assert_consistent(conn)


def test_a_foreign_key_action_on_machine_state_is_carried_into_machines(conn):
    conn.execute("CREATE TABLE public.components (id uuid PRIMARY KEY)")
    component = uuid.uuid4()
    conn.execute("INSERT INTO public.components VALUES (%s)", [component])
    conn.execute(
        "ALTER TABLE machine_state ADD FOREIGN KEY (failure_component)"
        " REFERENCES public.components (id) ON DELETE SET NULL"
    )
    machine_id = add_machine(conn, status="error", failure_component=component)
    conn.execute("DELETE FROM public.components")
    assert machine(conn, machine_id)["failure_component"] is None
    assert_consistent(conn)


def test_a_merge_that_deletes_machines(conn):
    doomed, kept = add_machine(conn, status="offline"), add_machine(conn)
    conn.execute(
        """MERGE INTO machines AS m USING (SELECT %s::uuid AS id) AS v ON m.id = v.id
           WHEN MATCHED THEN DELETE""",
        [doomed],
    )
    assert state(conn, doomed) is None
    assert state(conn, kept) is not None
    assert_consistent(conn)


def test_upsert_do_nothing_keeps_the_existing_state(conn):
    machine_id = add_machine(conn, status="processing", current_process_id=uuid.uuid4())
    before = machine(conn, machine_id)
    result = conn.execute(
        "INSERT INTO machine_state (machine_id) VALUES (%s) ON CONFLICT DO NOTHING",
        [machine_id],
    )
    assert result.rowcount == 0  # as PostgreSQL always reported it
    assert machine(conn, machine_id) == before
    assert_consistent(conn)


def test_partial_upsert_changes_only_the_columns_it_names(conn):
    # PostgREST's merge-duplicates upsert sets only the columns it was given.
    running = uuid.uuid4()
    machine_id = add_machine(conn, status="processing", current_process_id=running)
    conn.execute(
        """INSERT INTO machine_state (machine_id, failure_description) VALUES (%s, 'note')
           ON CONFLICT (machine_id) DO UPDATE
           SET failure_description = excluded.failure_description""",
        [machine_id],
    )
    m = machine(conn, machine_id)
    assert (m["status"], m["current_process_id"], m["failure_description"]) == (
        "processing",
        running,
        "note",
    )
    assert_consistent(conn)


def test_an_upsert_giving_a_busy_machine_another_process_is_ms002(conn):
    running = uuid.uuid4()
    machine_id = add_machine(conn, status="processing", current_process_id=running)
    with pytest.raises(psycopg.Error, match=f"running process {running}") as caught:
        conn.execute(
            """INSERT INTO machine_state (machine_id, process_id) VALUES (%s, %s)
               ON CONFLICT (machine_id) DO UPDATE SET process_id = excluded.process_id""",
            [machine_id, uuid.uuid4()],
        )
    assert caught.value.sqlstate == "MS002"
    assert machine(conn, machine_id)["current_process_id"] == running
    assert_consistent(conn)


def whole_row_upsert(conn, machine_id, **changes):
    """Upsert a machine's whole row as read, with changes: how an app that
    saves its model object writes (INSERT ... ON CONFLICT (id) DO UPDATE)."""
    row = {**machine(conn, machine_id), **changes}
    names = ", ".join(row)
    conn.execute(
        f"""INSERT INTO machines ({names})
            SELECT {names} FROM json_populate_record(NULL::machines, %s)
            ON CONFLICT (id) DO UPDATE SET
            ({names}) = ROW({", ".join(f"excluded.{name}" for name in row)})""",
        [json.dumps(row, default=str)],
    )


def test_an_upsert_of_a_whole_machine_row_ends_or_stops_its_run_as_an_update_does(conn):
    """The row an upsert proposes is checked as a new machine only if it is
    inserted: on a conflict it is an UPDATE, and ends or stops the run."""
    run = uuid.uuid4()
    machine_id = add_machine(conn, status="processing", current_process_id=run)
    # Completion naming the run: the run ends.
    whole_row_upsert(conn, machine_id, status="idle", current_process_id=run)
    ended = machine(conn, machine_id)
    assert (ended["status"], ended["current_process_id"]) == ("idle", None)
    # The legacy stop as a whole row: processing with the process cleared is idle.
    conn.execute(
        "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s",
        [uuid.uuid4(), machine_id],
    )
    whole_row_upsert(conn, machine_id, current_process_id=None)
    assert machine(conn, machine_id)["status"] == "idle"
    # A late completion of another run is refused as an UPDATE refuses it.
    current = uuid.uuid4()
    conn.execute(
        "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s",
        [current, machine_id],
    )
    with pytest.raises(
        psycopg.Error, match=f"its status is processing, with process {current}"
    ) as caught:
        whole_row_upsert(conn, machine_id, status="idle", current_process_id=run)
    assert caught.value.sqlstate == "MS005"
    # DO NOTHING on the existing machine does nothing, and raises nothing.
    before = machine(conn, machine_id)
    insert, params = machine_insert("idle", id=machine_id, current_process_id=run)
    result = conn.execute(insert.replace(" RETURNING id", " ON CONFLICT DO NOTHING"), params)
    assert result.rowcount == 0
    assert machine(conn, machine_id) == before
    assert_consistent(conn)


@pytest.mark.parametrize(
    ("status", "process", "message"),
    [
        ("idle", uuid.uuid4(), "cannot take process"),
        ("processing", None, "cannot be processing without a process"),
    ],
)
def test_a_new_machine_whose_status_and_process_disagree_is_refused(conn, status, process, message):
    """Plainly, or as an upsert whose row does not conflict: MS003, nothing inserted."""
    (machines,) = conn.execute("SELECT count(*) FROM machines").fetchone()
    for suffix in ("", " ON CONFLICT (id) DO UPDATE SET status = excluded.status"):
        insert, params = machine_insert(status, current_process_id=process)
        with pytest.raises(psycopg.Error, match=message) as caught:
            conn.execute(insert.replace(" RETURNING id", suffix + " RETURNING id"), params)
        assert caught.value.sqlstate == "MS003"
        assert caught.value.diag.message_primary.startswith("new machine ")
    assert conn.execute("SELECT count(*) FROM machines").fetchone() == (machines,)
    assert_consistent(conn)


@pytest.mark.parametrize(
    ("status", "process", "message"),
    [
        ("idle", uuid.uuid4(), "cannot take process"),
        ("processing", None, "cannot be processing without a process"),
    ],
)
@pytest.mark.parametrize("writer", ["after_insert_trigger", "rpc_in_a_cte"])
def test_a_new_machine_is_checked_as_inserted_not_as_the_statement_left_it(
    conn, status, process, message, writer
):
    """Before the AFTER INSERT check fires, the same statement may write the
    new machine again (an application's AFTER INSERT trigger sorting before
    zz_machine_sync_insert_state, an RPC in a CTE). That write met the rules
    with the unchecked row as its OLD: a process with another status read as
    a run to end (dropped), processing without one as a stop (idle). The
    insert is still refused, as it was when the BEFORE INSERT trigger checked
    it, not silently stored otherwise than the INSERT (and its RETURNING) says."""
    (machines,) = conn.execute("SELECT count(*) FROM machines").fetchone()
    insert, params = machine_insert(status, current_process_id=process)
    if writer == "after_insert_trigger":
        conn.execute(
            """CREATE FUNCTION public.note_arrival() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   UPDATE machines SET failure_description = 'arrived' WHERE id = NEW.id;
                   RETURN NULL;
               END $$"""
        )
        conn.execute(
            "CREATE TRIGGER a_note_arrival AFTER INSERT ON machines FOR EACH ROW"
            " EXECUTE FUNCTION public.note_arrival()"
        )
        statement = insert
    else:
        statement = f"""WITH a AS ({insert})
            SELECT public.atomic_update_machine_state(
                p_machine_id => a.id, p_machine_status => 'maintenance'
            ) FROM a"""
    with pytest.raises(psycopg.Error, match=message) as caught:
        conn.execute(statement, params)
    assert caught.value.sqlstate == "MS003"
    assert caught.value.diag.message_primary.startswith("new machine ")
    assert conn.execute("SELECT count(*) FROM machines").fetchone() == (machines,)
    assert_consistent(conn)


def test_upsert_do_update_applies_its_own_set_clause(conn):
    machine_id = add_machine(conn)
    conn.execute(
        """INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'idle')
           ON CONFLICT (machine_id) DO UPDATE SET current_state = 'maintenance'""",
        [machine_id],
    )
    assert machine(conn, machine_id)["status"] == "maintenance"
    assert_consistent(conn)


def test_mode_and_vocabulary_inputs_are_checked(conn):
    assert conn.execute("SELECT machine_sync.set_mode_v1(E'strict\\n')").fetchone() == ("strict",)
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO machine_sync.allowed_status VALUES (%s, 'too long')", ["x" * 51])
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO machine_sync.allowed_status VALUES ('Calibrating', 'not lower')")
