"""Transition mode: legacy writers of machine_state keep working (compat) or are refused
(strict)."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from machines import add_machine, assert_consistent, machine, state, wait_until_lock_waiting

# The four legacy write paths (MIGRATING.md, "The system it migrates from"),
# statement by statement, in their original order. Each statement is its own autocommit transaction.
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
    assert conn.execute("SELECT machine_sync.mode_v1()").fetchone() == ("compat",)


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
    assert conn.execute("SELECT machine_sync.set_mode_v1(' STRICT ')").fetchone() == ("strict",)
    assert conn.execute("SELECT machine_sync.mode_v1()").fetchone() == ("strict",)
    for statement in (
        "UPDATE machine_state SET current_state = 'idle' WHERE machine_id = %s",
        "INSERT INTO machine_state (machine_id) VALUES (%s)",
        "INSERT INTO machine_state (machine_id) VALUES (%s) ON CONFLICT (machine_id) DO NOTHING",
    ):
        with pytest.raises(psycopg.errors.DatabaseError, match=r"write public\.machines") as caught:
            conn.execute(statement, [machine_id])
        assert caught.value.sqlstate == "MS001"
    # ...while writes to machines still mirror.
    conn.execute("UPDATE machines SET status = 'maintenance' WHERE id = %s", [machine_id])
    assert state(conn, machine_id)["current_state"] == "maintenance"
    conn.execute("SELECT machine_sync.set_mode_v1('compat')")
    run_legacy(conn, "complete", machine_id)


def test_strict_holds_for_read_committed_at_once_and_for_an_older_snapshot_once_it_ends(db):
    """The guard reads the mode with the writer's snapshot (MIGRATING.md): a
    READ COMMITTED statement sees the switch once it commits; a REPEATABLE
    READ transaction that began before it is still carried, consistently,
    and the next one is refused."""
    with db.connect() as switcher, db.connect(autocommit=False) as older:
        machine_id = add_machine(switcher)
        older.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        # Its snapshot is taken by its first query.
        assert older.execute("SELECT current_setting('transaction_isolation')").fetchone() == (
            "repeatable read",
        )
        switcher.execute("SELECT machine_sync.set_mode_v1('strict')")
        try:
            with db.connect() as current:
                with pytest.raises(psycopg.errors.DatabaseError) as caught:
                    current.execute(
                        "UPDATE machine_state SET current_state = 'offline' WHERE machine_id = %s",
                        [machine_id],
                    )
                assert caught.value.sqlstate == "MS001"
            older.execute(
                "UPDATE machine_state SET current_state = 'maintenance' WHERE machine_id = %s",
                [machine_id],
            )
            older.commit()
            assert machine(switcher, machine_id)["status"] == "maintenance"
            assert_consistent(switcher)
            older.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            assert older.execute("SELECT current_setting('transaction_isolation')").fetchone() == (
                "repeatable read",
            )
            with pytest.raises(psycopg.errors.DatabaseError) as caught:
                older.execute(
                    "UPDATE machine_state SET current_state = 'offline' WHERE machine_id = %s",
                    [machine_id],
                )
            assert caught.value.sqlstate == "MS001"
            older.rollback()
        finally:
            switcher.execute("SELECT machine_sync.set_mode_v1('compat')")


def test_set_mode_refuses_unknown_values(conn):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="use 'compat' or 'strict'"):
        conn.execute("SELECT machine_sync.set_mode_v1('lenient')")
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT machine_sync.set_mode_v1(NULL)")
    assert conn.execute("SELECT machine_sync.mode_v1()").fetchone() == ("compat",)


@pytest.mark.parametrize("mode", ["compat", "strict"])
def test_direct_delete_is_always_refused(conn, mode):
    conn.execute("SELECT machine_sync.set_mode_v1(%s)", [mode])
    machine_id = add_machine(conn)
    with pytest.raises(psycopg.errors.DatabaseError, match="deleted with their machine") as caught:
        conn.execute("DELETE FROM machine_state WHERE machine_id = %s", [machine_id])
    assert caught.value.sqlstate == "MS001"
    assert state(conn, machine_id) is not None


@pytest.mark.parametrize("mode", ["compat", "strict"])
def test_truncate_of_machine_state_alone_is_refused(conn, mode):
    conn.execute("SELECT machine_sync.set_mode_v1(%s)", [mode])
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


# ---------------------------------------------------------------------------
# Locking: a legacy write locks its own machine's row, never a table. The
# tests below hold transactions open and assert who waits and who does not.
# A statement that should not wait runs in a thread and must finish while the
# blocking transaction is still open; a statement that should wait is seen
# waiting (pg_stat_activity) before the blocker ends.

CLAIMS = '{"sub": "00000000-0000-0000-0000-000000000001", "role": "authenticated"}'


def open_policies(conn):
    """Let ``authenticated`` see and write every row (RLS is on, no policy)."""
    for table in ("machines", "machine_state"):
        conn.execute(
            f"CREATE POLICY everything ON {table} FOR ALL TO authenticated"
            " USING (true) WITH CHECK (true)"
        )


def as_api_role(conn, role):
    """Inside the current transaction, behave like PostgREST for ``role``:
    service_role without a statement timeout, authenticated with its 8 s."""
    timeout = "0" if role == "service_role" else "8s"
    conn.execute(
        "SELECT set_config('role', %s, true), set_config('statement_timeout', %s, true),"
        " set_config('request.jwt.claims', %s, true)",
        [role, timeout, CLAIMS],
    )


def api_write(conn, role, statement, params):
    """One request of an API role: its own transaction on an autocommit connection."""
    with conn.transaction():
        as_api_role(conn, role)
        result = conn.execute(statement, params)
        assert result.rowcount == 1


def in_thread(target):
    """Run ``target`` in a thread; its result or error lands in the dict."""
    outcome = {}

    def run():
        try:
            outcome["result"] = target()
        except psycopg.Error as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def finishes(thread, outcome, timeout=20.0):
    """The thread ends within ``timeout`` without a database error."""
    thread.join(timeout)
    assert not thread.is_alive(), "the statement waited for the open transaction"
    assert "error" not in outcome, outcome["error"]


def backend_state(observer, pid):
    row = observer.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return None if row is None else row[0]


# Writes of ``other`` that the API roles make, each in its own request, in an
# order where every one changes the machine.
OTHER_MACHINE_WRITES = [
    (
        "UPDATE machines SET status = 'processing', current_process_id = %(p)s WHERE id = %(m)s",
        "new single UPDATE (start)",
    ),
    (
        "UPDATE machine_state SET current_state = 'idle', process_id = NULL"
        " WHERE machine_id = %(m)s",
        "legacy state write (complete)",
    ),
    (
        "INSERT INTO machine_state (machine_id, current_state) VALUES (%(m)s, 'maintenance')"
        " ON CONFLICT (machine_id) DO UPDATE SET current_state = excluded.current_state",
        "legacy upsert",
    ),
    ("SELECT atomic_error_machine_state(%(m)s, 'probe')", "legacy RPC"),
]


@pytest.mark.parametrize("role", ["service_role", "authenticated"])
def test_an_idle_legacy_transaction_blocks_only_writers_of_its_own_machine(db, role):
    with db.connect() as setup:
        open_policies(setup)
        stuck, other = add_machine(setup), add_machine(setup)
    with (
        db.connect(autocommit=False) as idle,
        db.connect() as writer,
        db.connect() as same,
        db.connect() as observer,
    ):
        # One legacy write that changes the machine, then the client goes idle.
        idle.execute(
            "UPDATE machine_state SET current_state = 'maintenance' WHERE machine_id = %s",
            [stuck],
        )

        def write_other_machine():
            for statement, _label in OTHER_MACHINE_WRITES:
                api_write(writer, role, statement, {"m": other, "p": uuid.uuid4()})

        thread, outcome = in_thread(write_other_machine)
        finishes(thread, outcome)
        assert backend_state(observer, idle.info.backend_pid) == "idle in transaction"
        assert machine(observer, other)["status"] == "error"

        # The idle transaction really holds its machine: a writer of it waits.
        thread, outcome = in_thread(
            lambda: api_write(
                same, role, "UPDATE machines SET status = 'offline' WHERE id = %s", [stuck]
            )
        )
        wait_until_lock_waiting(observer, same.info.backend_pid)
        idle.commit()
        finishes(thread, outcome)
        assert machine(observer, stuck)["status"] == "offline"
        assert_consistent(observer)


@pytest.mark.parametrize("writer_role", ["owner", "service_role", "authenticated"])
def test_an_idle_no_op_update_of_machines_delays_no_compat_write(db, writer_role):
    """An authenticated request that ran UPDATE machines ... WHERE false and
    stays open holds machines' ROW EXCLUSIVE lock: nothing a compat write
    takes conflicts with it."""
    with db.connect() as setup:
        open_policies(setup)
        paths, upserted = add_machine(setup), add_machine(setup)
    with (
        db.connect(autocommit=False) as idle,
        db.connect() as legacy,
        db.connect() as observer,
    ):
        as_api_role(idle, "authenticated")
        assert idle.execute("UPDATE machines SET status = 'idle' WHERE false").rowcount == 0
        assert observer.execute(
            "SELECT mode FROM pg_locks WHERE pid = %s AND relation = 'machines'::regclass",
            [idle.info.backend_pid],
        ).fetchall() == [("RowExclusiveLock",)]

        def execute(statement, params):
            if writer_role == "owner":
                assert legacy.execute(statement, params).rowcount == 1
            else:
                api_write(legacy, writer_role, statement, params)

        def compat_writes():
            for name in ("start", "error", "complete", "start", "stop"):
                params = {"m": paths, "p": uuid.uuid4(), "msg": "probe"}
                for statement in LEGACY_PATHS[name]:
                    execute(statement, params)
            execute(
                "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'offline')"
                " ON CONFLICT (machine_id) DO UPDATE SET current_state = excluded.current_state",
                [upserted],
            )

        thread, outcome = in_thread(compat_writes)
        finishes(thread, outcome)
        assert backend_state(observer, idle.info.backend_pid) == "idle in transaction"
        assert machine(observer, paths)["status"] == "idle"
        assert machine(observer, upserted)["status"] == "offline"
        assert_consistent(observer)
        idle.rollback()


@pytest.mark.parametrize("interleaving", ["both hold their first", "one after the other"])
def test_legacy_writers_after_a_no_op_machines_update_do_not_deadlock(db, interleaving):
    """Two transactions start with an UPDATE of machines that matches nothing,
    then write machine_state for two machines in opposite orders. Only rows
    are locked: the one that reaches the other's row waits for it, as any
    writer of that row would, and neither gets 40P01."""
    with db.connect() as setup:
        x, y = add_machine(setup), add_machine(setup)
    write = "UPDATE machine_state SET current_state = %s WHERE machine_id = %s"
    with (
        db.connect(autocommit=False) as t1,
        db.connect(autocommit=False) as t2,
        db.connect() as observer,
    ):
        for t in (t1, t2):
            # A table lock or a deadlock would surface as an error, not a hang.
            t.execute("SET lock_timeout = '10s'")
            assert t.execute("UPDATE machines SET status = 'idle' WHERE false").rowcount == 0
        t1.execute(write, ["maintenance", x])
        if interleaving == "both hold their first":
            t2.execute(write, ["offline", y])
            thread, outcome = in_thread(lambda: t1.execute(write, ["maintenance", y]))
            wait_until_lock_waiting(observer, t1.info.backend_pid)
            t2.commit()
            finishes(thread, outcome)
            t1.commit()
            expected = {x: "maintenance", y: "maintenance"}
        else:
            t1.execute(write, ["maintenance", y])
            thread, outcome = in_thread(lambda: t2.execute(write, ["offline", y]))
            wait_until_lock_waiting(observer, t2.info.backend_pid)
            t1.commit()
            finishes(thread, outcome)
            t2.execute(write, ["offline", x])
            t2.commit()
            expected = {x: "offline", y: "offline"}
        for machine_id, status in expected.items():
            assert machine(observer, machine_id)["status"] == status
        assert_consistent(observer)


MAINTENANCE = "UPDATE machine_state SET current_state = 'maintenance' WHERE machine_id = %s"


def timed_maintenance_write(conn, machine_id, timing):
    """The legacy write these tests race (machine_state to maintenance);
    how long it took, failed or not, lands in ``timing["elapsed"]``."""
    started = time.monotonic()
    try:
        conn.execute(MAINTENANCE, [machine_id])
    finally:
        timing["elapsed"] = time.monotonic() - started


def _deadlock_timeout_ms(conn):
    row = conn.execute("SELECT setting::int FROM pg_settings WHERE name = 'deadlock_timeout'")
    return row.fetchone()[0]


def _wait_until_polling(observer, pid):
    """Until backend ``pid`` sleeps in the legacy write's poll for its machine."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = observer.execute(
            "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
        if row is not None and row[0] == "PgSleep":
            return
    raise AssertionError(f"backend {pid} never polled for its machine")


def test_a_legacy_write_in_a_lock_cycle_gives_up_at_once(db):
    """A machines writer holds the machine's row (a write of an unwatched
    column) when a legacy write locks the state row and polls for the machine;
    the writer then changes the status, which needs the state row: each needs
    the other. The legacy write sees a transaction waiting for it and gives up
    at once (40001, retry), never waiting in the lock manager, so PostgreSQL's
    deadlock detector has nothing to find; the machines writer goes on."""
    with db.connect() as setup:
        machine_id = add_machine(setup)
        deadlock_ms = _deadlock_timeout_ms(setup)
    with (
        db.connect(autocommit=False) as writer,
        db.connect() as legacy,
        db.connect() as observer,
    ):
        writer.execute("UPDATE machines SET location = 'Bay 2' WHERE id = %s", [machine_id])
        timing = {}

        def legacy_write():
            timed_maintenance_write(legacy, machine_id, timing)

        def machines_write():
            writer.execute("UPDATE machines SET status = 'offline' WHERE id = %s", [machine_id])
            writer.commit()

        legacy_thread, legacy_outcome = in_thread(legacy_write)
        _wait_until_polling(observer, legacy.info.backend_pid)
        writer_thread, writer_outcome = in_thread(machines_write)
        legacy_thread.join()
        finishes(writer_thread, writer_outcome)
        error = legacy_outcome.get("error")
        assert isinstance(error, psycopg.errors.SerializationFailure), legacy_outcome
        assert "retry" in str(error)
        assert timing["elapsed"] < deadlock_ms / 2000
        assert machine(observer, machine_id)["status"] == "offline"
        assert_consistent(observer)


GATE = 4242  # the advisory lock a test-only policy on machines waits for


def _gate_machines_inside_triggers(conn):
    """A restrictive policy on machines whose check waits for advisory lock
    GATE whenever it runs inside a trigger, that is, in the legacy write's
    lock step (the statement's own scan of machine_state runs outside any
    trigger). It stands for every wait PostgreSQL may add to a row lock
    (following a row's update chain waits, whatever SKIP LOCKED says)."""
    open_policies(conn)
    conn.execute(
        "CREATE FUNCTION public.gate() RETURNS boolean LANGUAGE plpgsql AS $$"
        " BEGIN IF pg_trigger_depth() > 0 THEN"
        f" PERFORM pg_advisory_xact_lock_shared({GATE}); END IF; RETURN true; END $$"
    )
    conn.execute(
        "CREATE POLICY gate ON machines AS RESTRICTIVE FOR ALL TO authenticated"
        " USING (public.gate())"
    )


def test_a_wait_inside_the_legacy_lock_step_gives_up_before_a_cycle_can_form(db):
    """The legacy write holds the state row when its lock step meets a wait
    that SKIP LOCKED does not skip; the transaction it waits for then writes
    the machine's status, which needs that state row. Were the legacy write
    to wait there, the two would deadlock. Every wait of the lock step is
    bounded at 1 ms: the legacy write fails at once with 55P03 (retry) and
    writes nothing, and the other writer goes on."""
    with db.connect() as setup:
        machine_id = add_machine(setup)
        _gate_machines_inside_triggers(setup)
        deadlock_ms = _deadlock_timeout_ms(setup)
    with db.connect(autocommit=False) as writer, db.connect(autocommit=False) as legacy:
        writer.execute("SELECT pg_advisory_xact_lock(%s)", [GATE])
        as_api_role(legacy, "authenticated")
        timing = {}

        def legacy_write():
            timed_maintenance_write(legacy, machine_id, timing)

        thread, outcome = in_thread(legacy_write)
        thread.join(deadlock_ms / 1000 / 2)
        # A legacy write still waiting now would close the cycle below.
        writer.execute("UPDATE machines SET status = 'offline' WHERE id = %s", [machine_id])
        writer.commit()
        thread.join(20)
        assert isinstance(outcome.get("error"), psycopg.errors.LockNotAvailable), outcome
        assert timing["elapsed"] < deadlock_ms / 1000 / 2
        legacy.rollback()
        assert state(legacy, machine_id)["current_state"] == "offline"
        # The retry, with the gate open, succeeds and leaves the caller's
        # lock_timeout as it was.
        as_api_role(legacy, "authenticated")
        legacy.execute("SET LOCAL lock_timeout = '5s'")
        legacy_write()
        assert legacy.execute("SHOW lock_timeout").fetchone() == ("5s",)
        legacy.commit()
        assert machine(legacy, machine_id)["status"] == "maintenance"
        assert_consistent(legacy)


def test_a_legacy_write_during_a_table_lock_on_machines_gives_up_at_once(db):
    """A DDL statement (here LOCK TABLE) holds machines while a legacy write
    holds its state row: waiting there could close a cycle with DDL that
    wants machine_state next, so the write gives up at once (55P03, retry),
    writes nothing, and succeeds once the lock is gone."""
    with db.connect() as setup:
        machine_id = add_machine(setup)
        deadlock_ms = _deadlock_timeout_ms(setup)
    with db.connect(autocommit=False) as ddl, db.connect() as legacy:
        ddl.execute("LOCK TABLE machines IN ACCESS EXCLUSIVE MODE")
        legacy.execute("SET lock_timeout = '10s'")
        timing = {}
        with pytest.raises(psycopg.errors.LockNotAvailable):
            timed_maintenance_write(legacy, machine_id, timing)
        assert timing["elapsed"] < deadlock_ms / 1000 / 2
        ddl.rollback()
        assert state(legacy, machine_id)["current_state"] == "idle"
        assert legacy.execute(MAINTENANCE, [machine_id]).rowcount == 1
        assert machine(legacy, machine_id)["status"] == "maintenance"
        assert_consistent(legacy)


@pytest.mark.parametrize("caller_lock_timeout", ["0", "200ms"])
def test_a_legacy_write_waits_for_a_busy_machine_within_its_bound(db, caller_lock_timeout):
    """A transaction holds the machine's row and stays idle: the legacy write
    polls for it at most half of deadlock_timeout (or the caller's lower
    lock_timeout), then gives up with 55P03 naming the wait; the caller's own
    setting is unchanged and nothing was written."""
    with db.connect() as setup:
        machine_id = add_machine(setup)
        deadlock_ms = _deadlock_timeout_ms(setup)
    bound_ms = deadlock_ms // 2 if caller_lock_timeout == "0" else min(200, deadlock_ms // 2)
    with db.connect(autocommit=False) as holder, db.connect() as legacy:
        legacy.execute("SELECT set_config('lock_timeout', %s, false)", [caller_lock_timeout])
        holder.execute("UPDATE machines SET location = 'Bay 2' WHERE id = %s", [machine_id])
        started = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable) as caught:
            legacy.execute(
                "UPDATE machine_state SET current_state = 'maintenance' WHERE machine_id = %s",
                [machine_id],
            )
        elapsed = time.monotonic() - started
        assert f"waited {bound_ms} ms" in str(caught.value)
        assert "retry" in str(caught.value)
        assert 0.9 * bound_ms / 1000 <= elapsed < deadlock_ms / 1000
        assert legacy.execute("SHOW lock_timeout").fetchone() == (caller_lock_timeout,)
        holder.rollback()
        assert state(legacy, machine_id)["current_state"] == "idle"
        assert_consistent(legacy)


def test_a_retried_legacy_write_succeeds_once_the_machine_is_free(db):
    """55P03 says retry, and a retry after the other writer commits works."""
    with db.connect() as setup:
        machine_id = add_machine(setup)
    with db.connect(autocommit=False) as writer, db.connect() as legacy:
        writer.execute("UPDATE machines SET location = 'Bay 2' WHERE id = %s", [machine_id])
        statement = "UPDATE machine_state SET current_state = 'maintenance' WHERE machine_id = %s"
        with pytest.raises(psycopg.errors.LockNotAvailable, match="retry"):
            legacy.execute(statement, [machine_id])
        assert state(legacy, machine_id)["current_state"] == "idle"
        writer.commit()
        assert legacy.execute(statement, [machine_id]).rowcount == 1
        assert machine(legacy, machine_id)["status"] == "maintenance"
        assert_consistent(legacy)


def test_a_no_op_legacy_write_then_a_machines_write_in_one_transaction_does_not_deadlock(db):
    """The stop path reversed in one transaction on an idle machine: the state
    write agrees (no machine lock), a new writer of the machine then waits for
    the state row, and the transaction's machines write waits for the writer.
    The state write locks the machine too, so the new writer waits for the
    machine instead and no cycle can form."""
    with db.connect() as setup:
        machine_id = add_machine(setup)
    with (
        db.connect(autocommit=False) as legacy,
        db.connect() as writer,
        db.connect() as observer,
    ):
        legacy.execute(
            "UPDATE machine_state SET current_state = 'idle', process_id = NULL"
            " WHERE machine_id = %s",
            [machine_id],
        )
        thread, outcome = in_thread(
            lambda: writer.execute(
                "UPDATE machines SET status = 'maintenance' WHERE id = %s", [machine_id]
            )
        )
        wait_until_lock_waiting(observer, writer.info.backend_pid)
        try:
            legacy.execute(
                "UPDATE machines SET current_process_id = NULL WHERE id = %s", [machine_id]
            )
            legacy.commit()
        finally:
            thread.join()
        if "error" in outcome:
            raise outcome["error"]
        assert machine(observer, machine_id)["status"] == "maintenance"
        assert_consistent(observer)
