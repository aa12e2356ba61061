"""Regressions for review findings: forged markers, grants, bounded messages,
the guarded down migration, double starts, the transition table, trigger order."""

from __future__ import annotations

import re
import threading
import uuid
from typing import Any

import psycopg
import pytest

from conftest import down_file, migration_files
from machines import (
    add_machine,
    assert_consistent,
    bypassing_triggers,
    machine,
    start,
    state,
    wait_until_lock_waiting,
)

COMPONENT = "00000000-0000-4000-c000-000000000001"
FAILED = "00000000-0000-4000-8000-000000000005"


def expect(sqlstate, run, *args):
    with pytest.raises(psycopg.Error) as caught:
        run(*args)
    assert caught.value.sqlstate == sqlstate, caught.value
    return caught.value


# --- c. forged markers ------------------------------------------------------


@pytest.mark.parametrize("mode", ["strict", "compat"])
def test_forged_marker_guc_and_foreign_key_action_do_not_pass_for_the_mirror(legacy_db, mode):
    legacy_db.migrate()
    with legacy_db.connect() as conn:
        conn.execute("SELECT machine_sync.set_mode_v1(%s)", [mode])
        for setting in ("machine_sync.mirroring", "machine_sync.mirror", "machine_sync.trusted"):
            conn.execute("SELECT set_config(%s, %s, false)", [setting, FAILED])
        # machine_components ON DELETE SET NULL rewrites machine_state as the owner.
        if mode == "strict":
            expect(
                "MS001", conn.execute, "DELETE FROM machine_components WHERE id = %s", [COMPONENT]
            )
            assert machine(conn, uuid.UUID(FAILED))["failure_component"] == uuid.UUID(COMPONENT)
        else:
            conn.execute("DELETE FROM machine_components WHERE id = %s", [COMPONENT])
            assert machine(conn, uuid.UUID(FAILED))["failure_component"] is None
        assert_consistent(conn)


@pytest.mark.parametrize("mode", ["strict", "compat"])
def test_forged_marker_and_a_security_definer_trigger_of_the_application(db, mode):
    with db.connect() as conn:
        machine_id = add_machine(conn)
        conn.execute("CREATE TABLE public.events (machine_id uuid, new_state text)")
        conn.execute("GRANT INSERT ON public.events TO authenticated")
        conn.execute(
            """CREATE FUNCTION public.apply_event() RETURNS trigger LANGUAGE plpgsql
               SECURITY DEFINER SET search_path = '' AS $$
               BEGIN
                   PERFORM set_config('machine_sync.mirroring', NEW.machine_id::text, true);
                   UPDATE public.machine_state SET current_state = NEW.new_state
                   WHERE machine_id = NEW.machine_id;
                   RETURN NULL;
               END $$"""
        )
        conn.execute(
            "CREATE TRIGGER apply_event AFTER INSERT ON public.events FOR EACH ROW"
            " EXECUTE FUNCTION public.apply_event()"
        )
        conn.execute("SELECT machine_sync.set_mode_v1(%s)", [mode])
    with db.connect(autocommit=False) as api:
        api.execute("SELECT set_config('role', 'authenticated', true)")
        api.execute("SELECT set_config('machine_sync.mirroring', %s, true)", [str(machine_id)])
        insert = "INSERT INTO public.events VALUES (%s, 'maintenance')"
        if mode == "strict":
            expect("MS001", api.execute, insert, [machine_id])
            api.rollback()
        else:
            api.execute(insert, [machine_id])
            api.commit()
    with db.connect() as conn:
        expected = "idle" if mode == "strict" else "maintenance"
        assert machine(conn, machine_id)["status"] == expected
        assert_consistent(conn)


@pytest.mark.parametrize("mode", ["strict", "compat"])
def test_service_role_trigger_on_its_own_temporary_table_writing_machine_state(db, mode):
    with db.connect() as conn:
        machine_id = add_machine(conn)
        conn.execute("SELECT machine_sync.set_mode_v1(%s)", [mode])
    with db.connect(autocommit=False) as api:
        api.execute("SET ROLE service_role")
        api.execute("SELECT set_config('machine_sync.mirroring', %s, false)", [str(machine_id)])
        api.execute("CREATE TEMP TABLE poke (machine_id pg_catalog.uuid)")
        api.execute(
            """CREATE FUNCTION pg_temp.poke() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   UPDATE public.machine_state SET current_state = 'offline'
                   WHERE machine_id = NEW.machine_id;
                   RETURN NULL;
               END $$"""
        )
        api.execute(
            "CREATE TRIGGER poke AFTER INSERT ON pg_temp.poke FOR EACH ROW"
            " EXECUTE FUNCTION pg_temp.poke()"
        )
        api.commit()
        if mode == "strict":
            expect("MS001", api.execute, "INSERT INTO pg_temp.poke VALUES (%s)", [machine_id])
            api.rollback()
        else:
            api.execute("INSERT INTO pg_temp.poke VALUES (%s)", [machine_id])
            api.commit()
    with db.connect() as conn:
        assert machine(conn, machine_id)["status"] == ("idle" if mode == "strict" else "offline")
        assert_consistent(conn)


# --- d. owner-only privileges ----------------------------------------------


def owner_only_privileges(conn):
    privileges = ["TRUNCATE", "TRIGGER", "REFERENCES"]
    if conn.execute("SELECT current_setting('server_version_num')::int >= 170000").fetchone()[0]:
        privileges.append("MAINTAIN")
    return privileges


@pytest.mark.parametrize("install", ["fresh", "migrated legacy"])
def test_anon_has_no_maintain_truncate_trigger_or_references(db, legacy_db, install):
    target = db if install == "fresh" else legacy_db
    if install != "fresh":
        legacy_db.migrate()
    with target.connect() as conn:
        for table in ("machines", "machine_state"):
            for role in ("anon", "authenticated", "service_role"):
                for privilege in owner_only_privileges(conn):
                    assert conn.execute(
                        "SELECT has_table_privilege(%s, %s, %s)", [role, table, privilege]
                    ).fetchone() == (False,), (role, table, privilege)
            for role in ("authenticated", "service_role"):
                for privilege in ("INSERT", "UPDATE"):
                    assert conn.execute(
                        "SELECT has_table_privilege(%s, 'machine_state', %s)", [role, privilege]
                    ).fetchone() == (True,), (role, privilege)
    with target.connect(autocommit=False) as anon:
        anon.execute("SET LOCAL ROLE anon")
        maintain = "MAINTAIN" in owner_only_privileges(anon)
        statements = ["TRUNCATE machine_state", "TRUNCATE machines CASCADE"]
        if maintain:
            statements += ["LOCK TABLE machines", "LOCK TABLE machine_state IN SHARE MODE"]
        for statement in statements:
            expect("42501", anon.execute, statement)
            anon.rollback()
            anon.execute("SET LOCAL ROLE anon")
    if maintain:
        with target.connect() as anon:
            anon.execute("SET ROLE anon")
            # VACUUM skips what it may not maintain, with a warning: nothing happens.
            notices = []
            anon.add_notice_handler(lambda n: notices.append(n.message_primary))
            anon.execute("VACUUM FULL machines")
            assert any("permission denied" in n or "skipping" in n for n in notices), notices


# --- e. set_mode under safeupdate ------------------------------------------


def test_set_mode_works_as_service_role_and_its_update_names_its_row(db):
    """safeupdate (PostgREST on Supabase) refuses UPDATE without WHERE.

    Neither the embedded server nor Debian's PostgreSQL 15 here has the
    extension (no pg-safeupdate package), and a trigger cannot see a WHERE
    clause, so the function's UPDATE is checked in its definition.
    """
    with db.connect() as conn:
        definition = conn.execute(
            "SELECT pg_get_functiondef('machine_sync.set_mode_v1(text)'::regprocedure)"
        ).fetchone()[0]
        updates = re.findall(r"UPDATE\s[^;]*;", definition, re.S | re.I)
        assert updates
        assert all(re.search(r"\sWHERE\s", u, re.I) for u in updates), updates
        try:
            conn.execute("LOAD 'safeupdate'")
            conn.execute("SET safeupdate.enabled = 1")
        except psycopg.Error:
            pass  # not installed: the definition check above stands in for it
        conn.execute("SET ROLE service_role")
        assert conn.execute("SELECT machine_sync.set_mode_v1(' STRICT ')").fetchone() == ("strict",)
        assert conn.execute("SELECT machine_sync.mode_v1()").fetchone() == ("strict",)
        assert conn.execute("SELECT machine_sync.set_mode_v1('compat')").fetchone() == ("compat",)
        conn.execute("RESET ROLE")
        conn.execute("SET ROLE authenticated")
        expect("42501", conn.execute, "SELECT machine_sync.set_mode_v1('strict')")


# --- g. a 1 MB unknown status ----------------------------------------------


def assert_bounded(error, length):
    message = str(error.diag.message_primary)
    assert len(message) < 500, len(message)
    assert f"{length} characters" in message
    assert "'" + "x" * 40 + "'..." in message


def test_a_1mb_unknown_status_gives_a_short_message_quoting_a_prefix_and_the_length(conn):
    huge = "x" * 1_000_000
    machine_id = add_machine(conn)
    for statement, params in (
        ("UPDATE machines SET status = %s WHERE id = %s", [huge, machine_id]),
        (
            "UPDATE machine_state SET current_state = %s::text WHERE machine_id = %s",
            [huge, machine_id],
        ),
        (
            "SELECT atomic_update_machine_state(p_machine_id => %s, p_machine_status => %s)",
            [machine_id, huge],
        ),
        ("SELECT machine_sync.set_mode_v1(%s)", [huge]),
    ):
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(statement, params)
        assert caught.value.sqlstate in ("23514", "22023", "22001"), caught.value
        assert len(str(caught.value.diag.message_primary)) < 500
        # 22001: varchar(50) refuses it before any trigger, in PostgreSQL's short words.
        if caught.value.sqlstate != "22001":
            assert_bounded(caught.value, len(huge))
    assert machine(conn, machine_id)["status"] == "idle"
    assert_consistent(conn)


def test_an_unknown_status_with_control_characters_is_quoted_without_them(conn):
    """A refusal quotes the bad value; its control characters (a terminal's
    escape sequences, a newline that forges a log line) are shown as ?."""
    machine_id = add_machine(conn)
    hostile = "\x1b[2J\x1b]0;owned\x07\nLOG:  forged"
    for statement, params in (
        ("UPDATE machines SET status = %s WHERE id = %s", [hostile, machine_id]),
        ("SELECT machine_sync.set_mode_v1(%s)", [hostile]),
    ):
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(statement, params)
        message = str(caught.value.diag.message_primary)
        assert not any(ord(c) < 32 or ord(c) == 127 for c in message), repr(message)
        assert "'?[2J?]0;owned??LOG:  forged'" in message, message
        assert f"({len(hostile)} characters, control characters shown as ?)" in message
    assert machine(conn, machine_id)["status"] == "idle"


# --- h. the v1 down migration refuses while drift exists -------------------


def test_v1_down_refuses_while_drift_exists_and_works_after_reconcile(db):
    with db.connect() as conn:
        machine_id = add_machine(conn, status="error")
        conn.execute("ALTER TABLE machines DISABLE TRIGGER zz_machine_sync")
        conn.execute(
            "UPDATE machines SET failure_description = 'only in machines' WHERE id = %s",
            [machine_id],
        )
        conn.execute("ALTER TABLE machines ENABLE TRIGGER zz_machine_sync")
        before = (machine(conn, machine_id), state(conn, machine_id))
    down = down_file(migration_files()[-1])
    result = db.psql(down, check=False)
    assert result.returncode != 0
    assert "refusing to revert machine-sync: 1 machine drifts," in result.stderr
    with db.connect() as conn:
        assert (machine(conn, machine_id), state(conn, machine_id)) == before
        assert conn.execute("SELECT to_regnamespace('machine_sync') IS NOT NULL").fetchone() == (
            True,
        )
        conn.execute("SELECT * FROM machine_sync.reconcile_v1()")
    db.psql(down)
    with db.connect() as conn:
        assert conn.execute("SELECT to_regnamespace('machine_sync')").fetchone() == (None,)
        assert state(conn, machine_id)["failure_description"] == "only in machines"


# --- i. double starts --------------------------------------------------------


def errors_behind_a_start(db, machine_id, process, statement, params) -> list[psycopg.Error]:
    """Start ``process`` on the machine in a transaction left open, run
    ``statement`` from another session until it waits for that row, commit the
    start, and return what the waiting statement raised (nothing, or one error)."""
    errors: list[psycopg.Error] = []
    with db.connect(autocommit=False) as winner, db.connect() as loser, db.connect() as watch:
        winner.execute(
            "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s",
            [process, machine_id],
        )

        def wait_and_write():
            try:
                loser.execute(statement, params)
            except psycopg.Error as error:
                errors.append(error)

        thread = threading.Thread(target=wait_and_write)
        thread.start()
        wait_until_lock_waiting(watch, loser.info.backend_pid)
        winner.commit()
        thread.join(10)
        assert not thread.is_alive()
    return errors


def test_two_concurrent_starts_give_one_run_and_the_loser_ms002_naming_the_winner(db):
    with db.connect() as setup:
        machine_id = add_machine(setup)
    first, second = uuid.uuid4(), uuid.uuid4()
    errors = errors_behind_a_start(
        db,
        machine_id,
        first,
        "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s",
        [second, machine_id],
    )
    assert len(errors) == 1
    assert errors[0].sqlstate == "MS002"
    assert f"running process {first}" in str(errors[0])
    with db.connect() as conn:
        assert machine(conn, machine_id)["current_process_id"] == first
        assert_consistent(conn)


def test_a_late_end_of_a_run_waiting_behind_the_next_start_is_ms005_naming_it(db):
    """The run a write ends is checked on the row it locks: a completion of the
    old run that waits for a transaction starting the next one is refused once
    that commits, whatever the writer (here a plain UPDATE, as psql sends it)."""
    with db.connect() as setup:
        machine_id = add_machine(setup)
        old = start(setup, machine_id)
        setup.execute("UPDATE machines SET status = 'idle' WHERE id = %s", [machine_id])
    new = uuid.uuid4()
    errors = errors_behind_a_start(
        db,
        machine_id,
        new,
        "UPDATE machines SET status = 'idle', current_process_id = %s WHERE id = %s",
        [old, machine_id],
    )
    assert [error.sqlstate for error in errors] == ["MS005"]
    assert f"is not running process {old}: its status is processing, with process {new}" in str(
        errors[0]
    )
    with db.connect() as conn:
        assert machine(conn, machine_id)["current_process_id"] == new
        expect(
            "MS005",
            conn.execute,
            "UPDATE machines SET status = 'error', current_process_id = %s WHERE id = %s",
            [old, machine_id],
        )
        conn.execute(
            "UPDATE machines SET status = 'error', current_process_id = %s WHERE id = %s",
            [new, machine_id],
        )
        assert (machine(conn, machine_id)["status"], state(conn, machine_id)["process_id"]) == (
            "error",
            None,
        )
        error = expect(
            "MS005",
            conn.execute,
            "UPDATE machines SET current_process_id = %s WHERE id = %s",
            [new, machine_id],
        )
        assert "its status is error, with no current process" in str(error)
        assert "set status processing with it" in (error.diag.message_hint or "")
        # A new machine has no run to end: a process without processing is a rule.
        with pytest.raises(psycopg.Error) as caught:
            add_machine(conn, status="idle", current_process_id=uuid.uuid4())
        assert caught.value.sqlstate == "MS003"
        assert_consistent(conn)


def test_two_legacy_read_then_write_starts_in_compat_give_one_run(db):
    with db.connect() as setup:
        machine_id = add_machine(setup)
    first, second = uuid.uuid4(), uuid.uuid4()
    read = "SELECT current_state FROM machine_state WHERE machine_id = %s"
    write = (
        "UPDATE machine_state SET current_state = 'processing', process_id = %s"
        " WHERE machine_id = %s"
    )
    with db.connect(autocommit=False) as a, db.connect(autocommit=False) as b:
        # Both read 'idle' before either writes: the check-then-act race.
        assert a.execute(read, [machine_id]).fetchone() == ("idle",)
        assert b.execute(read, [machine_id]).fetchone() == ("idle",)
        a.execute(write, [first, machine_id])
        a.commit()
        error = expect("MS002", b.execute, write, [second, machine_id])
        assert f"running process {first}" in str(error)
        b.rollback()
    with db.connect() as conn:
        assert machine(conn, machine_id)["current_process_id"] == first
        assert_consistent(conn)


# --- j. the transition table -------------------------------------------------


def test_deleting_a_transition_refuses_that_change_and_inserting_one_widens_the_rules(conn):
    machine_id = add_machine(conn, status="idle")
    conn.execute(
        "DELETE FROM machine_sync.allowed_transition"
        " WHERE from_status = 'idle' AND to_status = 'maintenance'"
    )
    error = expect(
        "MS003",
        conn.execute,
        "UPDATE machines SET status = 'maintenance' WHERE id = %s",
        [machine_id],
    )
    assert "cannot go from idle to maintenance" in str(error)
    assert "maintenance" not in (error.diag.message_detail or "").split(": ")[-1].split(", ")
    # Other changes into maintenance are untouched.
    start(conn, machine_id)
    conn.execute("UPDATE machines SET status = 'maintenance' WHERE id = %s", [machine_id])
    conn.execute("UPDATE machines SET status = 'error' WHERE id = %s", [machine_id])
    expect(
        "MS003",
        conn.execute,
        "UPDATE machines SET status = 'processing', current_process_id = gen_random_uuid()"
        " WHERE id = %s",
        [machine_id],
    )
    conn.execute("INSERT INTO machine_sync.allowed_transition VALUES ('error', 'processing')")
    conn.execute(
        "UPDATE machines SET status = 'processing', current_process_id = gen_random_uuid()"
        " WHERE id = %s",
        [machine_id],
    )
    assert state(conn, machine_id)["current_state"] == "processing"
    assert_consistent(conn)


def test_the_transition_probe_reads_only_the_table_for_any_spelling_old_or_new(db):
    """The probe that lets a change through must find its row in the table:
    a missing row refuses the change whatever the spellings (new or stored
    outside the canonical form), and the stop path (clearing the process of
    a processing machine) is checked like any other change."""
    with db.connect() as conn:
        conn.execute(
            "DELETE FROM machine_sync.allowed_transition"
            " WHERE (from_status, to_status) IN (('processing', 'idle'), ('idle', 'maintenance'))"
        )

        def stored(status, process=None):
            machine_id = add_machine(conn, status="idle")
            bypassing_triggers(
                db,
                (
                    "UPDATE machines SET status = %s, current_process_id = %s WHERE id = %s",
                    [status, process, machine_id],
                ),
                (
                    "UPDATE machine_state SET current_state = %s, process_id = %s"
                    " WHERE machine_id = %s",
                    [status, process, machine_id],
                ),
            )
            return machine_id

        def write(machine_id, status, process=None):
            conn.execute(
                "UPDATE machines SET status = %s, current_process_id = %s WHERE id = %s",
                [status, process, machine_id],
            )
            return machine(conn, machine_id)["status"]

        run = uuid.uuid4()
        for old, new in (
            ("PROCESSING", " idle "),
            ("processing", "IDLE"),
            (" idle ", "MAINTENANCE"),
        ):
            machine_id = stored(old, run if "rocess" in old.lower() else None)
            error = expect("MS003", write, machine_id, new)
            assert f"cannot go from {old.strip().lower()} to {new.strip().lower()}" in str(error)
        stop = add_machine(conn, status="idle")
        start(conn, stop)
        expect(
            "MS003",
            conn.execute,
            "UPDATE machines SET current_process_id = NULL WHERE id = %s",
            [stop],
        )
        assert machine(conn, stop)["status"] == "processing"  # refused: left as it was
        accepted = [
            (stored("PROCESSING", run), "\tError\n", None, "error"),
            (stored(" idle "), "running", uuid.uuid4(), "processing"),
            (stored("IDLE"), "idle", None, "idle"),
        ]
        expect("MS003", write, stored("ERROR"), "Processing", uuid.uuid4())
        conn.execute("INSERT INTO machine_sync.allowed_transition VALUES ('error', 'processing')")
        accepted.append((stored("ERROR"), "Processing", uuid.uuid4(), "processing"))
        for machine_id, status, process, result in accepted:
            assert write(machine_id, status, process) == result
            assert state(conn, machine_id)["current_state"] == result
        drifted = {row[0] for row in conn.execute("SELECT machine_id FROM machine_sync.drift")}
        assert drifted.isdisjoint(machine_id for machine_id, *_ in accepted)


# --- k. application BEFORE triggers and zz_machine_sync ----------------------


def test_application_before_triggers_sorting_before_the_mirror_are_seen_by_it(conn):
    conn.execute(
        """CREATE FUNCTION public.stamp() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               NEW.location := 'stamped';
               NEW.failure_description := coalesce(NEW.failure_description, 'from a trigger');
               RETURN NEW;
           END $$"""
    )
    conn.execute(
        "CREATE TRIGGER a_stamp BEFORE UPDATE ON machines FOR EACH ROW"
        " EXECUTE FUNCTION public.stamp()"
    )
    machine_id = add_machine(conn)
    conn.execute("UPDATE machines SET status = 'error' WHERE id = %s", [machine_id])
    m, s = machine(conn, machine_id), state(conn, machine_id)
    assert m["location"] == "stamped"
    assert m["failure_description"] == s["failure_description"] == "from a trigger"
    assert_consistent(conn)


def test_a_before_trigger_sorting_after_the_mirror_that_changes_status_makes_reported_drift(conn):
    conn.execute(
        """CREATE FUNCTION public.late() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN NEW.status := 'offline'; RETURN NEW; END $$"""
    )
    conn.execute(
        "CREATE TRIGGER zzz_late BEFORE UPDATE ON machines FOR EACH ROW"
        " EXECUTE FUNCTION public.late()"
    )
    machine_id = add_machine(conn)
    conn.execute("UPDATE machines SET status = 'maintenance' WHERE id = %s", [machine_id])
    assert machine(conn, machine_id)["status"] == "offline"
    assert state(conn, machine_id)["current_state"] == "maintenance"
    assert conn.execute(
        "SELECT problem FROM machine_sync.drift WHERE machine_id = %s", [machine_id]
    ).fetchall() == [("value_mismatch",)]


def test_a_before_trigger_changing_the_status_of_an_update_that_sets_no_watched_column_is_not_seen(
    conn,
):
    """zz_machine_sync fires on its column list: what an application trigger
    changes in an update whose SET names no watched column is drift, reported
    and repaired like any other."""
    conn.execute(
        """CREATE FUNCTION public.retire() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.location = 'scrapyard' THEN NEW.status := 'offline'; END IF;
               RETURN NEW;
           END $$"""
    )
    conn.execute(
        "CREATE TRIGGER a_retire BEFORE UPDATE ON machines FOR EACH ROW"
        " EXECUTE FUNCTION public.retire()"
    )
    machine_id = add_machine(conn, status="idle")
    conn.execute("UPDATE machines SET location = 'scrapyard' WHERE id = %s", [machine_id])
    assert machine(conn, machine_id)["status"] == "offline"
    assert state(conn, machine_id)["current_state"] == "idle"
    assert conn.execute(
        "SELECT problem FROM machine_sync.drift WHERE machine_id = %s", [machine_id]
    ).fetchall() == [("value_mismatch",)]
    repaired = conn.execute(
        "SELECT repaired FROM machine_sync.reconcile_v1() WHERE machine_id = %s", [machine_id]
    ).fetchall()
    assert repaired == [(True,)]
    assert state(conn, machine_id)["current_state"] == "offline"
    assert_consistent(conn)


def test_only_an_update_that_sets_a_watched_column_calls_the_mirror(db):
    """The column list: an UPDATE of other columns calls no function; one that
    sets a watched column to the value it has calls the mirror, which
    rewrites nothing."""
    with db.connect(admin=True) as conn:
        conn.execute("SET track_functions = 'all'")
        machine_id = add_machine(conn, status="idle")
        conn.commit()

        def calls() -> int:
            return conn.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions"
                " WHERE schemaname = 'machine_sync' AND funcname = 'machines_sync'"
            ).fetchone()[0]

        def state_version() -> str:
            return conn.execute(
                "SELECT xmin::text FROM machine_state WHERE machine_id = %s", [machine_id]
            ).fetchone()[0]

        def calls_by(statement: str) -> int:
            before = calls()
            conn.execute(statement, [machine_id])
            return calls() - before

        def updated_at() -> Any:
            return conn.execute(
                "SELECT updated_at FROM machines WHERE id = %s", [machine_id]
            ).fetchone()[0]

        version, stamped = state_version(), updated_at()
        assert calls_by("UPDATE machines SET location = 'bay 2' WHERE id = %s") == 0
        assert calls_by("UPDATE machines SET status = 'idle' WHERE id = %s") == 1
        # It changed nothing: no clock moves, machine_state is not rewritten.
        assert (state_version(), updated_at()) == (version, stamped)
        assert calls_by("UPDATE machines SET status = 'maintenance' WHERE id = %s") == 1
        assert state_version() != version
        conn.commit()
        assert_consistent(conn)
