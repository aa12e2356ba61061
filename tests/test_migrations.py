"""Migrations take an empty database and the legacy production database to the same place."""

from __future__ import annotations

import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from catalog import data, snapshot
from conftest import Database, down_file, migration_files, sql_files
from machines import add_machine, assert_consistent, bypassing_triggers, machine, wait_for

LEGACY_MACHINE = "00000000-0000-4000-8000-{:012d}"

AUDIT = """
    SELECT count(*) FILTER (WHERE s.machine_id IS NULL) AS missing,
           count(*) FILTER (WHERE s.current_state <> m.status
                            AND lower(s.current_state) = lower(m.status)) AS case_mismatch,
           count(*) FILTER (WHERE s.current_state = m.status) AS agreeing
    FROM machines m LEFT JOIN machine_state s ON s.machine_id = m.id
"""


def test_migration_files_follow_the_supabase_convention():
    files = migration_files()
    assert len(files) >= 2
    for path in files:
        assert re.fullmatch(r"\d{14}_[a-z0-9_]+\.sql", path.name), path.name
        text = path.read_text()
        assert re.search(r"^BEGIN;$", text, re.M)
        assert re.search(r"^COMMIT;$", text, re.M)
        assert "SET LOCAL lock_timeout" in text
        assert down_file(path).is_file(), f"{path.name} has no down file"
        for applied in (text, down_file(path).read_text()):
            assert re.search(r"^SET LOCAL search_path = pg_catalog, pg_temp;$", applied, re.M)


def test_legacy_database_is_migrated_without_losing_anything(legacy_db):
    with legacy_db.connect() as conn:
        assert conn.execute(AUDIT).fetchone() == (13, 4, 1)
        assert conn.execute("SELECT count(*) FROM machine_state").fetchone() == (5,)
    legacy_db.migrate()
    with legacy_db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM machines").fetchone() == (18,)
        assert conn.execute(AUDIT).fetchone() == (0, 0, 18)
        assert_consistent(conn)
        # The failure details that only machine_state had survive in both tables.
        failed = LEGACY_MACHINE.format(5)
        assert conn.execute(
            """SELECT m.failure_description, s.failure_description, m.failure_component::text
               FROM machines m JOIN machine_state s ON s.machine_id = m.id WHERE m.id = %s""",
            [failed],
        ).fetchone() == (
            "Recipe execution error: precursor pressure low",
            "Recipe execution error: precursor pressure low",
            "00000000-0000-4000-c000-000000000001",
        )
        # state_since of the 'IDLE' rows is kept: only the spelling changed.
        assert conn.execute(
            "SELECT state_since::text FROM machine_state WHERE machine_id = %s",
            [LEGACY_MACHINE.format(1)],
        ).fetchone() == ("2026-11-01 09:00:00+00",)
        # The foreign key now cascades, and the legacy policy is untouched.
        conn.execute("DELETE FROM machines WHERE id = %s", [LEGACY_MACHINE.format(18)])
        assert conn.execute("SELECT count(*) FROM machine_state").fetchone() == (17,)
        # machine-sync adds only its mirror's policy.
        assert conn.execute(
            "SELECT polname FROM pg_policy WHERE polrelid = 'machine_state'::regclass"
            " ORDER BY polname"
        ).fetchall() == [
            ("machine_sync_mirror",),
            ("users see assigned machines",),
            ("users update assigned machine state",),
            ("users write assigned machine state",),
        ]
        assert conn.execute(
            "SELECT polname FROM pg_policy WHERE polrelid = 'machines'::regclass ORDER BY 1"
        ).fetchall() == [("users see their machines",), ("users update their machines",)]
        # Foreign keys to tables outside the product stay where they were.
        assert conn.execute(
            """SELECT count(*) FROM pg_constraint WHERE contype = 'f'
               AND confrelid IN ('process_executions'::regclass, 'machine_components'::regclass)"""
        ).fetchone() == (2,)


def test_applying_everything_again_changes_nothing(legacy_db):
    legacy_db.migrate()
    with legacy_db.connect() as conn:
        before = (snapshot(conn), data(conn))
    legacy_db.migrate()
    with legacy_db.connect() as conn:
        assert (snapshot(conn), data(conn)) == before


def test_fresh_install_legacy_migration_and_sql_definitions_match(cluster, empty_db, legacy_db):
    empty_db.migrate()
    legacy_db.migrate()
    from_sql = cluster.create("supabase")
    try:
        from_sql.psql(*sql_files())
        snapshots = []
        for database in (empty_db, legacy_db, from_sql):
            with database.connect() as conn:
                snapshots.append(snapshot(conn))
        fresh, legacy, definitions = snapshots
        for part in fresh:
            assert fresh[part] == legacy[part], f"fresh and migrated legacy differ in {part}"
            assert fresh[part] == definitions[part], f"migrations and sql/ differ in {part}"
        assert len(fresh["functions"]) >= 14
        assert len(fresh["triggers"]) == 9
    finally:
        cluster.drop(from_sql)


def test_a_status_outside_the_vocabulary_stops_the_migration_and_names_it(legacy_db):
    with legacy_db.connect() as conn:
        conn.execute(
            "UPDATE machines SET status = 'broken' WHERE id = %s", [LEGACY_MACHINE.format(17)]
        )
    result = legacy_db.psql(*migration_files(), check=False)
    assert result.returncode != 0
    assert LEGACY_MACHINE.format(17) in result.stderr
    assert "'broken'" in result.stderr
    assert "machine_sync.allowed_status" in result.stderr
    with legacy_db.connect() as conn:  # the failed migration left nothing behind
        assert conn.execute("SELECT to_regnamespace('machine_sync')").fetchone() == (None,)
        assert conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'machines'"
            " AND column_name = 'failure_description'"
        ).fetchone() == (0,)


def test_down_then_up_on_the_legacy_database(legacy_db):
    legacy_db.migrate()
    with legacy_db.connect() as conn:
        migrated = snapshot(conn)
        rows = conn.execute("SELECT * FROM machine_state ORDER BY machine_id").fetchall()
    latest = migration_files()[-1]
    reverted = legacy_db.psql(down_file(latest))
    # Run again, it finds nothing to do; neither run buries the file's own
    # notices under PostgreSQL's (what a drop cascades to, what is gone).
    again = legacy_db.psql(down_file(latest))
    for result in (reverted, again):
        assert "drop cascades" not in result.stderr, result.stderr
        assert "does not exist, skipping" not in result.stderr, result.stderr
    with legacy_db.connect() as conn:
        assert conn.execute("SELECT to_regnamespace('machine_sync')").fetchone() == (None,)
        assert conn.execute(
            "SELECT to_regprocedure('public.atomic_complete_machine_state(uuid)')"
        ).fetchone() == (None,)
        # Reverted to two independent tables, with every row kept.
        assert conn.execute("SELECT * FROM machine_state ORDER BY machine_id").fetchall() == rows
        conn.execute("UPDATE machine_state SET current_state = 'IDLE'")
        conn.execute("UPDATE machines SET status = 'idle'")
    legacy_db.psql(latest)
    with legacy_db.connect() as conn:
        assert snapshot(conn) == migrated
        assert_consistent(conn)


def test_every_down_file_reverts_a_fresh_install_to_empty(empty_db):
    with empty_db.connect() as conn:
        before = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        ).fetchone()
    empty_db.migrate()
    for up in reversed(migration_files()):
        empty_db.psql(down_file(up))
    with empty_db.connect() as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            ).fetchone()
            == before
        )
        assert conn.execute("SELECT to_regnamespace('machine_sync')").fetchone() == (None,)
    empty_db.migrate()  # and up again
    with empty_db.connect() as conn:
        add_machine(conn)
        assert_consistent(conn)


def test_the_baseline_down_refuses_to_drop_tables_with_rows(db):
    with db.connect() as conn:
        add_machine(conn)
    result = db.psql(down_file(migration_files()[0]), check=False)
    assert result.returncode != 0
    assert "hold rows" in result.stderr
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM machines").fetchone() == (1,)


def test_down_refuses_where_policies_hide_drift_from_the_owner(db):
    """FORCE ROW LEVEL SECURITY with an owner lacking BYPASSRLS, and policies
    that hide every row from it: the drift check would find nothing and the
    revert would drop the only copy of a machine's failure. It fails with
    PostgreSQL's own error instead. (Run in one transaction, rolled back: the
    role attribute is the cluster's.)"""
    with db.connect() as conn:
        machine_id = add_machine(conn)
    bypassing_triggers(
        db, ("UPDATE machines SET failure_description = 'only here' WHERE id = %s", [machine_id])
    )
    revert = "\n".join(
        line
        for line in down_file(migration_files()[-1]).read_text().splitlines()
        if line not in ("BEGIN;", "COMMIT;")
    )
    owner = sql.Identifier(db.cluster.owner)
    with db.connect(admin=True, autocommit=False) as admin:
        admin.execute(sql.SQL("ALTER ROLE {} NOBYPASSRLS").format(owner))
        admin.execute(sql.SQL("SET ROLE {}").format(owner))
        for table in ("machines", "machine_state"):
            admin.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
            admin.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
            admin.execute(f"CREATE POLICY hidden ON {table} AS RESTRICTIVE USING (false)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            admin.execute(revert)
        admin.rollback()
    with db.connect() as conn:
        assert machine(conn, machine_id)["failure_description"] == "only here"


def test_a_migration_refused_for_many_unknown_statuses_names_a_few(legacy_db):
    """Every machine with a status outside the vocabulary was listed in the
    one error message: thousands of them made a message (and log line) of
    hundreds of kilobytes. It names the first ten and counts the rest."""
    with legacy_db.connect() as conn:
        conn.execute(
            """INSERT INTO machines (id, serial_number, location, lab_name, lab_institution,
                   model, machine_type, install_date, last_maintenance_date, status, admin_id)
               SELECT gen_random_uuid(), 'SN-' || n, m.location, m.lab_name, m.lab_institution,
                   m.model, m.machine_type, m.install_date, m.last_maintenance_date,
                   'bogus-' || n, m.admin_id
               FROM generate_series(1, 5000) AS n,
                   (SELECT * FROM machines ORDER BY id LIMIT 1) AS m"""
        )
    result = legacy_db.psql(*migration_files(), check=False)
    assert result.returncode != 0
    assert "machines with a status machine-sync does not know" in result.stderr
    assert "and 4990 more" in result.stderr
    assert len(result.stderr) < 4000


def test_down_refuses_while_application_objects_depend_on_machine_sync(db):
    """Dropping machine_sync with CASCADE (its notices silenced) also dropped,
    without a word, whatever of the application's used it: a view of the
    vocabulary, a foreign key to it, a column of one of its types (and its
    data). The revert refuses, naming them, and changes nothing."""
    with db.connect() as conn:
        conn.execute(
            "CREATE VIEW public.status_names AS SELECT status FROM machine_sync.allowed_status"
        )
        conn.execute(
            "CREATE TABLE public.status_history (status text"
            " CONSTRAINT status_history_status_fkey REFERENCES machine_sync.allowed_status)"
        )
        conn.execute(
            "CREATE TABLE public.mode_log (id int, mode machine_sync.settings,"
            " label text GENERATED ALWAYS AS (machine_sync.quote_bounded(id::text)) STORED)"
        )
        conn.execute("INSERT INTO public.mode_log (id, mode) VALUES (1, ROW(true, 'strict'))")
    result = db.psql(down_file(migration_files()[-1]), check=False)
    assert result.returncode != 0
    assert "refusing to revert machine-sync" in result.stderr
    for named in ("status_names", "status_history_status_fkey", "mode_log"):
        assert named in result.stderr
    with db.connect() as conn:
        assert conn.execute("SELECT id, (mode).mode, label FROM public.mode_log").fetchall() == [
            (1, "strict", "'1'")
        ]
        assert conn.execute("SELECT count(*) FROM public.status_names").fetchone()[0] > 0
        assert conn.execute("SELECT machine_sync.mode_v1()").fetchone() == ("compat",)


def test_migrations_wait_at_most_their_lock_timeout(legacy_db):
    with legacy_db.connect(autocommit=False) as blocker:
        blocker.execute("LOCK TABLE machines IN ACCESS SHARE MODE")
        result = legacy_db.psql(*migration_files(), check=False)
        blocker.rollback()
    assert result.returncode != 0
    assert "lock timeout" in result.stderr
    assert "public.machines stayed locked by another transaction" in result.stderr
    with legacy_db.connect() as conn:
        assert conn.execute("SELECT to_regnamespace('machine_sync')").fetchone() == (None,)


def test_the_baseline_takes_no_lock_on_the_legacy_tables(legacy_db):
    """On production the baseline changes nothing, so it must not queue for
    machine_state behind a transaction left open on it (every reader and
    writer would queue behind the baseline for its whole lock_timeout)."""
    baseline = migration_files()[0]
    with legacy_db.connect(autocommit=False) as writer:
        writer.execute(LEGACY_WRITES["machine_state"], [LEGACY_MACHINE.format(1)])
        result = legacy_db.psql(baseline, check=False)
        writer.rollback()
    assert result.returncode == 0, result.stderr


def test_a_transaction_left_open_on_machines_queues_others_behind_the_migration_briefly(
    legacy_db,
):
    """A legacy write of machines left idle in its transaction: the migration
    queues for machines at most half of deadlock_timeout at a time, so a
    reader that comes after it waits no longer than that (not all of its
    lock_timeout), and the migration completes once the write commits."""
    with ThreadPoolExecutor(1) as pool, legacy_db.connect(autocommit=False) as writer:
        writer.execute(LEGACY_WRITES["machines"], [LEGACY_MACHINE.format(1)])
        migration = pool.submit(legacy_db.psql, *migration_files(), check=False)
        wait_for("the migration queues for machines", lambda: legacy_db.one(PSQL_WAITS) > 0)
        with legacy_db.connect() as reader:
            reader.execute("SET statement_timeout = '1500ms'")
            assert reader.execute("SELECT count(*) FROM machines").fetchone() == (18,)
        writer.commit()
        result = migration.result(timeout=60)
    assert result.returncode == 0, result.stderr


# Locks on the two tables held or wanted by a psql session (the migration).
PSQL_LOCKS = """
    SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE a.application_name = 'psql' AND a.datname = current_database()
      AND l.relation IN ('public.machines'::regclass, 'public.machine_state'::regclass)
"""
PSQL_WAITS = """
    SELECT count(*) FROM pg_stat_activity
    WHERE application_name = 'psql' AND datname = current_database()
      AND (wait_event_type = 'Lock' OR wait_event = 'PgSleep')
"""
LEGACY_WRITES = {
    "machine_state": "UPDATE machine_state SET current_state = 'idle' WHERE machine_id = %s",
    "machines": "UPDATE machines SET status = 'idle' WHERE id = %s",
}


@pytest.mark.parametrize("first", sorted(LEGACY_WRITES))
def test_migrating_does_not_deadlock_a_legacy_pair_in_one_transaction(legacy_db, first):
    """The legacy code's two writes, in one transaction, in either order,
    while the migration starts: both commit, neither gets 40P01."""
    machine = LEGACY_MACHINE.format(1)
    second = next(table for table in LEGACY_WRITES if table != first)
    with ThreadPoolExecutor(1) as pool, legacy_db.connect(autocommit=False) as writer:
        writer.execute(LEGACY_WRITES[first], [machine])
        migration = pool.submit(legacy_db.psql, *migration_files(), check=False)
        wait_for("the migration reaches the tables", lambda: legacy_db.one(PSQL_LOCKS) > 0)
        writer.execute(LEGACY_WRITES[second], [machine])
        writer.commit()
        result = migration.result(timeout=60)
    assert result.returncode == 0, result.stderr
    with legacy_db.connect() as conn:
        assert_consistent(conn)
        assert conn.execute(
            "SELECT status, current_state FROM machines JOIN machine_state ON machine_id = id"
            " WHERE id = %s",
            [machine],
        ).fetchone() == ("idle", "idle")


# A psql session (the migration) waiting for machine_state.
PSQL_QUEUED = """
    SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE a.application_name = 'psql' AND a.datname = current_database()
      AND l.relation = 'public.machine_state'::regclass AND NOT l.granted
"""


def test_a_legacy_pair_in_one_transaction_meets_the_migration_queued_for_machine_state(
    legacy_db,
):
    """The legacy code's two writes in one transaction, machine_state first,
    held past the first half of the migration's lock_timeout: the migration
    holds machines and queues for machine_state, the transaction then waits
    for machines. The migration gives up its turn before that wait is long
    enough for a deadlock check: the transaction commits, then the migration
    does."""
    machine = LEGACY_MACHINE.format(1)
    with ThreadPoolExecutor(1) as pool, legacy_db.connect(autocommit=False) as writer:
        writer.execute(LEGACY_WRITES["machine_state"], [machine])
        migration = pool.submit(legacy_db.psql, *migration_files(), check=False)
        wait_for("the migration queues for machine_state", lambda: legacy_db.one(PSQL_QUEUED) > 0)
        writer.execute(LEGACY_WRITES["machines"], [machine])  # no 40P01
        writer.commit()
        result = migration.result(timeout=60)
    assert result.returncode == 0, result.stderr
    with legacy_db.connect() as conn:
        assert_consistent(conn)


def test_migrating_is_not_starved_by_overlapping_readers_of_machine_state(legacy_db):
    """Readers of machine_state one after another, each ending only once the
    next holds the table or waits for it, so that it is never free: the
    migration queues for it (in the second half of its lock_timeout), the
    next reader queues behind it, and it has the table when the reader
    holding it ends, rather than giving up with 55P03."""
    done = threading.Event()
    with ExitStack() as stack:
        readers = [stack.enter_context(legacy_db.connect(autocommit=False)) for _ in range(2)]
        watcher = stack.enter_context(legacy_db.connect())
        pids = [reader.info.backend_pid for reader in readers]

        def on_machine_state(pid: int) -> bool:  # holding it or waiting for it
            return watcher.execute(
                "SELECT EXISTS (SELECT FROM pg_locks WHERE pid = %s"
                " AND relation = 'public.machine_state'::regclass)",
                [pid],
            ).fetchone() == (True,)

        watching = threading.Lock()  # one connection, two threads
        turn = [0]  # whose read may end next: they end in turns, never both at once

        def read_in_turn(me: int) -> int:
            reads = 0
            while not done.is_set():
                readers[me].execute("SELECT count(*) FROM machine_state")
                reads += 1

                def handed_over() -> bool:
                    with watching:
                        return done.is_set() or (turn[0] == me and on_machine_state(pids[1 - me]))

                wait_for("the other reader is on machine_state", handed_over)
                readers[me].commit()
                turn[0] = 1 - me
            return reads

        pool = stack.enter_context(ThreadPoolExecutor(2))
        turns = [pool.submit(read_in_turn, me) for me in range(2)]
        try:
            result = legacy_db.psql(*migration_files(), check=False)
        finally:
            done.set()
        reads = [turn.result(timeout=30) for turn in turns]
    assert result.returncode == 0, result.stderr
    assert min(reads) > 1  # the readers did overlap, in turns
    with legacy_db.connect() as conn:
        assert conn.execute("SELECT to_regnamespace('machine_sync') IS NOT NULL").fetchone() == (
            True,
        )
        assert_consistent(conn)


def test_reverting_does_not_deadlock_a_reader(legacy_db):
    """A transaction that reads machine_state, then the drift view (and so
    machines), while the down migration starts: both complete."""
    legacy_db.migrate()
    with ThreadPoolExecutor(1) as pool, legacy_db.connect(autocommit=False) as reader:
        reader.execute("SELECT count(*) FROM machine_state")
        revert = pool.submit(legacy_db.psql, down_file(migration_files()[-1]), check=False)
        wait_for("the revert waits for the reader", lambda: legacy_db.one(PSQL_WAITS) > 0)
        assert reader.execute("SELECT count(*) FROM machine_sync.drift").fetchone() == (0,)
        reader.commit()
        result = revert.result(timeout=60)
    assert result.returncode == 0, result.stderr
    assert legacy_db.one("SELECT to_regnamespace('machine_sync')") is None


# What a transaction may do with machine-sync's own tables before it writes
# machines: read the status vocabulary (as atomic_update_machine_state's
# check of its two statuses does), or switch the mode.
BEFORE_MACHINES = {
    "vocabulary": "SELECT count(*) FROM machine_sync.allowed_status",
    "status_check": "SELECT machine_sync.normalize_status('idle')",
    "set_mode": "SELECT machine_sync.set_mode_v1('compat')",
}


@pytest.mark.parametrize(
    ("direction", "first"),
    [("down", first) for first in sorted(BEFORE_MACHINES)] + [("reapply", "set_mode")],
)
def test_migrating_does_not_deadlock_a_writer_that_used_machine_sync_first(
    legacy_db, first, direction
):
    """A transaction that read machine_sync's vocabulary or switched the
    mode, then writes machines, while the migration is reverted (which drops
    those tables) or re-applied (which inserts the mode's row again): both
    complete, neither gets 40P01."""
    legacy_db.migrate()
    files = migration_files() if direction == "reapply" else [down_file(migration_files()[-1])]
    machine = LEGACY_MACHINE.format(1)
    with ThreadPoolExecutor(1) as pool, legacy_db.connect(autocommit=False) as writer:
        writer.execute(BEFORE_MACHINES[first])
        migration = pool.submit(legacy_db.psql, *files, check=False)
        wait_for("the migration waits", lambda: legacy_db.one(PSQL_WAITS) > 0)
        writer.execute(LEGACY_WRITES["machines"], [machine])
        writer.commit()
        result = migration.result(timeout=60)
    assert result.returncode == 0, result.stderr
    installed = legacy_db.one("SELECT to_regnamespace('machine_sync') IS NOT NULL")
    assert installed is (direction == "reapply")
    assert legacy_db.one("SELECT status FROM machines WHERE id = %s", [machine]) == "idle"


LEGACY_SHAPE = """
    SELECT 'grant', c.relname || ' ' || coalesce(r.rolname, 'PUBLIC') || ' ' || a.privilege_type
    FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
    LEFT JOIN pg_roles r ON r.oid = a.grantee
    WHERE c.oid IN ('machines'::regclass, 'machine_state'::regclass)
    UNION ALL
    SELECT 'column grant', a.attrelid::regclass || '.' || a.attname || ' ' ||
           coalesce(r.rolname, 'PUBLIC') || ' ' || g.privilege_type || ' ' || g.is_grantable
    FROM pg_attribute a CROSS JOIN LATERAL aclexplode(a.attacl) g
    LEFT JOIN pg_roles r ON r.oid = g.grantee
    WHERE a.attrelid IN ('machines'::regclass, 'machine_state'::regclass)
    UNION ALL
    SELECT 'constraint', conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
    WHERE conrelid IN ('machines'::regclass, 'machine_state'::regclass)
    UNION ALL
    SELECT 'column', attrelid::regclass || '.' || attname || ' ' ||
           coalesce(pg_get_expr(d.adbin, d.adrelid), '')
    FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid IN ('machines'::regclass, 'machine_state'::regclass)
      AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT 'trigger', tgname FROM pg_trigger
    WHERE tgrelid IN ('machines'::regclass, 'machine_state'::regclass) AND NOT tgisinternal
    ORDER BY 1, 2
"""


def test_down_restores_the_legacy_grants_foreign_key_and_defaults(legacy_db):
    with legacy_db.connect() as conn:
        # Make the legacy shape distinctive: a default and grants of its own.
        conn.execute("ALTER TABLE machines ALTER COLUMN id SET DEFAULT md5('x')::uuid")
        conn.execute("GRANT ALL ON machine_state TO anon WITH GRANT OPTION")
        conn.execute("REVOKE TRUNCATE ON machines FROM service_role")
        # Column grants: v1 revokes anon's writes and the API roles' REFERENCES,
        # on the table and so on every column; the revert revokes all of them.
        conn.execute("REVOKE UPDATE ON machines FROM anon")
        conn.execute("GRANT UPDATE (location, status) ON machines TO anon")
        conn.execute("GRANT REFERENCES (id) ON machines TO authenticated WITH GRANT OPTION")
        conn.execute("GRANT SELECT (id, status) ON machines TO PUBLIC")
        before = conn.execute(LEGACY_SHAPE).fetchall()
        assert sum(kind == "column grant" for kind, _ in before) == 5
    legacy_db.migrate()
    with legacy_db.connect() as conn:
        assert conn.execute(LEGACY_SHAPE).fetchall() != before
    legacy_db.psql(down_file(migration_files()[-1]))
    with legacy_db.connect() as conn:
        assert conn.execute(LEGACY_SHAPE).fetchall() == before
        assert conn.execute("SELECT to_regnamespace('machine_sync_revert')").fetchone() == (None,)
    legacy_db.migrate()  # and up again, recording afresh
    with legacy_db.connect() as conn:
        assert_consistent(conn)


def test_down_puts_back_no_grant_of_a_role_dropped_meanwhile(legacy_db):
    """A role granted on machines before v1, whose grants were revoked and
    which was dropped while v1 was installed, stopped every revert (role
    does not exist); and a new role given its name would have been granted
    what the old one had. Its grants are left out, with a NOTICE; the rest
    are put back."""
    gone = f"t_gone_{uuid.uuid4().hex[:8]}"
    with legacy_db.connect() as conn:
        conn.execute(f'CREATE ROLE "{gone}"')
        conn.execute(f'GRANT SELECT, UPDATE (status) ON machines TO "{gone}"')
        conn.execute("GRANT SELECT (id, status) ON machines TO PUBLIC")
        conn.execute(f'REVOKE ALL ON machines FROM "{gone}"')
        before = conn.execute(LEGACY_SHAPE).fetchall()
        conn.execute(f'GRANT SELECT, UPDATE (status) ON machines TO "{gone}"')
    legacy_db.migrate()
    with legacy_db.connect() as conn:
        conn.execute(f'REVOKE ALL ON machines FROM "{gone}"')
        conn.execute(f'DROP ROLE "{gone}"')
        conn.execute(f'CREATE ROLE "{gone}"')  # someone else, by the same name
    try:
        result = legacy_db.psql(down_file(migration_files()[-1]), check=False)
        assert result.returncode == 0, result.stderr
        assert f"role {gone} (granted before machine-sync) no longer exists" in result.stderr
        with legacy_db.connect() as conn:
            assert conn.execute(LEGACY_SHAPE).fetchall() == before
            assert conn.execute(
                "SELECT has_table_privilege(%s, 'machines', 'SELECT'),"
                " has_column_privilege(%s, 'machines', 'status', 'UPDATE')",
                [gone, gone],
            ).fetchone() == (False, False)
    finally:
        with legacy_db.connect() as conn:
            conn.execute(f'DROP ROLE "{gone}"')


def test_only_the_tables_owner_may_apply_machine_sync(legacy_db):
    """A superuser, or a member of the owner's role, would own the SECURITY
    DEFINER functions: refused before anything is made, naming the owner."""
    owner = legacy_db.cluster.owner
    result = legacy_db.psql(*migration_files(), check=False, admin=True)
    assert result.returncode != 0
    assert "machine-sync must be applied by the owner of its tables" in result.stderr
    assert (
        f"public.machine_state (owned by {owner}), public.machines (owned by {owner})"
        in result.stderr
    )
    member = f"t_member_{uuid.uuid4().hex[:8]}"
    v1 = migration_files()[-1].read_text()
    with legacy_db.connect(admin=True) as admin:
        assert admin.execute("SELECT to_regnamespace('machine_sync')").fetchone() == (None,)
        admin.execute(f'CREATE ROLE "{member}" NOLOGIN IN ROLE "{owner}"')
        try:
            admin.execute(f'SET ROLE "{member}"')
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
                admin.execute(v1)
            assert f"not by {member}" in str(caught.value)
            admin.execute("ROLLBACK")
            assert admin.execute("SELECT to_regnamespace('machine_sync')").fetchone() == (None,)
            # The hint's way out: the owner's role, taken with SET ROLE.
            admin.execute(f'SET ROLE "{owner}"')
            admin.execute(v1)
            assert admin.execute("SELECT machine_sync.mode_v1()").fetchone() == ("compat",)
            assert admin.execute(
                "SELECT pg_get_userbyid(proowner) FROM pg_proc"
                " WHERE oid = 'machine_sync.stored_machine(uuid)'::regprocedure"
            ).fetchone() == (owner,)
        finally:
            admin.execute("RESET ROLE")
            admin.execute(f'DROP ROLE "{member}"')
    with legacy_db.connect() as conn:
        assert_consistent(conn)


def test_a_function_planted_on_the_search_path_never_runs_while_migrating(legacy_db):
    """Where every role may create in public (databases made before
    PostgreSQL 15), an overload there that matches a call better than the
    built-in would run as the migrating role, and one that returns NULL would
    wave a superuser past the owner check. Names resolve in pg_catalog alone."""
    planter = f"t_planter_{uuid.uuid4().hex[:8]}"
    with legacy_db.connect(admin=True) as admin:
        admin.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        admin.execute(f'CREATE ROLE "{planter}" NOLOGIN')
        admin.execute(f'SET ROLE "{planter}"')
        admin.execute("CREATE TABLE public.planted_calls (called_as text)")
        admin.execute("GRANT SELECT, INSERT ON public.planted_calls TO PUBLIC")
        for args in ("text, name, name, name", "text, uuid, text", "text, text"):
            admin.execute(
                f"CREATE FUNCTION public.format({args}) RETURNS text LANGUAGE plpgsql AS $$"
                " BEGIN INSERT INTO public.planted_calls VALUES (current_user); RETURN NULL; END $$"
            )
        admin.execute("RESET ROLE")
    try:
        refused = legacy_db.psql(*migration_files(), check=False, admin=True)
        assert refused.returncode != 0
        assert "machine-sync must be applied by the owner of its tables" in refused.stderr
        legacy_db.migrate()
        for up in reversed(migration_files()[1:]):
            legacy_db.psql(down_file(up))
        legacy_db.migrate()
        with legacy_db.connect() as conn:
            assert conn.execute("SELECT called_as FROM public.planted_calls").fetchall() == []
            assert conn.execute("SELECT machine_sync.mode_v1()").fetchone() == ("compat",)
            assert_consistent(conn)
    finally:
        with legacy_db.connect(admin=True) as admin:
            admin.execute(f'DROP OWNED BY "{planter}"')
            admin.execute(f'DROP ROLE "{planter}"')


def test_an_owner_given_the_mirror_role_without_admin_option_can_apply_and_revert_it(cluster):
    """Where an administrator made the database's mirror role beforehand
    (the owner may not create roles) and granted it plainly, as the
    refusal's hint says, the migrations go through: nothing in them needs
    ADMIN OPTION on the role. The revert goes through too, keeping the role,
    which only its maker may drop."""
    owner = f"t_lab_{uuid.uuid4().hex[:8]}"
    target = cluster.create()
    mirror = f"machine_sync_mirror_{target.name}"
    with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{owner}" LOGIN')
        admin.execute(f'CREATE ROLE "{mirror}" NOLOGIN NOINHERIT')
        admin.execute(f'GRANT "{mirror}" TO "{owner}"')
        admin.execute(f'ALTER DATABASE "{target.name}" OWNER TO "{owner}"')
    try:
        dsn = make_conninfo(target.admin_dsn, user=owner)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for path in migration_files():
                conn.execute(path.read_text())
            assert conn.execute("SELECT machine_sync.mode_v1()").fetchone() == ("compat",)
            assert conn.execute("SELECT machine_sync.mirror_role()").fetchone() == (mirror,)
            add_machine(conn, status="idle")
            assert_consistent(conn)
            notices: list[str] = []
            conn.add_notice_handler(lambda notice: notices.append(notice.message_primary or ""))
            conn.execute(down_file(migration_files()[-1]).read_text())
            assert conn.execute("SELECT to_regnamespace('machine_sync')").fetchone() == (None,)
            assert conn.execute("SELECT count(*) FROM public.machines").fetchone() == (1,)
            assert any(f"role {mirror} is kept: {owner} may not drop it" in n for n in notices), (
                notices
            )
            assert conn.execute(
                "SELECT count(*) FROM pg_roles WHERE rolname = %s", [mirror]
            ).fetchone() == (1,)
    finally:
        cluster.drop(target)
        with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{mirror}"')
            admin.execute(f'DROP ROLE "{owner}"')


@pytest.mark.parametrize("length", ["short", "long"])
def test_each_database_gets_its_own_mirror_role_and_takes_it_along(cluster, length):
    """The first migration of a database makes its mirror role, named after
    it (after its md5 when the name would not fit in a role's); reverting
    drops the role, and so does dropping the database the way the demo, the
    benchmark and these tests do."""
    name = f"t_{uuid.uuid4().hex[:16]}" + ("_" + "x" * 40 if length == "long" else "")
    with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
        admin.execute(
            f'CREATE DATABASE "{name}" TEMPLATE "{cluster.template("legacy")}"'
            f' OWNER "{cluster.owner}"'
        )
    db = Database(cluster, name)
    try:
        db.migrate()
        with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
            (expected,) = admin.execute(
                "SELECT 'machine_sync_mirror_' || CASE WHEN octet_length(%s) <= 43 THEN %s"
                " ELSE md5(%s) END",
                [name, name, name],
            ).fetchone()
        assert (length == "long") == (expected != f"machine_sync_mirror_{name}")
        with db.connect() as conn:
            assert conn.execute("SELECT machine_sync.mirror_role()").fetchone() == (expected,)
            assert conn.execute(
                "SELECT pg_get_userbyid(proowner) FROM pg_proc"
                " WHERE oid = 'machine_sync.machines_sync()'::regprocedure"
            ).fetchone() == (expected,)
            machine_id = add_machine(conn, status="idle")
            conn.execute("UPDATE machines SET status = 'offline' WHERE id = %s", [machine_id])
            assert_consistent(conn)
            conn.execute(down_file(migration_files()[-1]).read_text())
            gone = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", [expected])
            assert gone.fetchone() == (0,)
        db.migrate()
        cluster.drop(db)
        with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
            left = admin.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", [expected])
            assert left.fetchone() == (0,)
    finally:
        cluster.drop(db)


@pytest.mark.parametrize("spelling", ["Upper", 'quo\'te "dot.ted" back\\slash é'])
def test_a_database_of_any_name_gets_its_mirror_role_and_its_record(cluster, spelling):
    """A database's name may hold capitals, quotes, dots, backslashes and
    any letter, and so may its mirror role's. The record of the mirror's
    function took the role by to_regrole(), which reads its argument as SQL
    spells a name: a dot or a quote made the migration fail (invalid name
    syntax), a capital made it look up another name, so the record held no
    owner and `migrate status` missed a mirror's function given away."""
    name = f"t_{uuid.uuid4().hex[:8]}_{spelling}"
    with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
                sql.Identifier(name),
                sql.Identifier(cluster.template("legacy")),
                sql.Identifier(cluster.owner),
            )
        )
    db = Database(cluster, name)
    try:
        db.migrate()
        with db.connect() as conn:
            assert conn.execute("SELECT machine_sync.mirror_role()").fetchone() == (
                f"machine_sync_mirror_{name}",
            )
            machine_id = add_machine(conn, status="idle")
            conn.execute("UPDATE machines SET status = 'offline' WHERE id = %s", [machine_id])
            assert_consistent(conn)
            problems = "SELECT object_name, problem FROM machine_sync_installed.problems_v1()"
            assert conn.execute(problems).fetchall() == []
            conn.execute(f'ALTER FUNCTION machine_sync.machines_sync() OWNER TO "{cluster.owner}"')
            assert [row[0] for row in conn.execute(problems).fetchall()] == [
                "machine_sync.machines_sync()"
            ]
    finally:
        cluster.drop(db)


@pytest.mark.parametrize(
    "schema", ["machine_sync", "machine_sync_revert", "machine_sync_installed"]
)
def test_a_schema_of_machine_sync_made_beforehand_by_another_role_is_refused(legacy_db, schema):
    """A role that may create schemas (CREATE on the database) can make one of
    machine-sync's first, open to everyone. machine_sync_revert was then used
    with a WARNING only: the revert record went into that role's table, for
    it to read and rewrite, and every revert failed at the end (must be owner
    of schema). The other two stopped at a COMMENT with PostgreSQL's bare
    "must be owner of schema". Now each is refused before anything is made,
    naming the schema and its owner."""
    squatter = f"t_squatter_{uuid.uuid4().hex[:8]}"
    with legacy_db.connect(admin=True) as admin:
        admin.execute(f'CREATE ROLE "{squatter}" NOLOGIN')
        admin.execute(f'GRANT CREATE ON DATABASE "{legacy_db.name}" TO "{squatter}"')
        admin.execute(f'SET ROLE "{squatter}"')
        admin.execute(f"CREATE SCHEMA {schema}")
        admin.execute(f"GRANT ALL ON SCHEMA {schema} TO PUBLIC")
        if schema == "machine_sync_revert":
            admin.execute(
                "CREATE TABLE machine_sync_revert.privilege (table_name text NOT NULL,"
                " column_name text, grantee text NOT NULL, privilege_type text NOT NULL,"
                " is_grantable boolean NOT NULL,"
                " UNIQUE NULLS NOT DISTINCT (table_name, column_name, grantee, privilege_type))"
            )
            admin.execute("GRANT ALL ON machine_sync_revert.privilege TO PUBLIC")
        admin.execute("RESET ROLE")
    try:
        result = legacy_db.psql(*migration_files(), check=False)
        assert result.returncode != 0
        assert (
            f"machine-sync's schema {schema} exists and is owned by {squatter}," in result.stderr
        ), result.stderr
        with legacy_db.connect() as conn:
            assert conn.execute("SELECT to_regclass('machine_sync.settings')").fetchone() == (None,)
            assert conn.execute(
                "SELECT count(*) FROM pg_class"
                " WHERE relnamespace = %s::regnamespace AND relkind = 'r'",
                [schema],
            ).fetchone() == (1 if schema == "machine_sync_revert" else 0,)
        with legacy_db.connect(admin=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
        legacy_db.migrate()
        with legacy_db.connect() as conn:
            assert_consistent(conn)
    finally:
        with legacy_db.connect(admin=True) as admin:
            admin.execute(f'DROP OWNED BY "{squatter}"')
            admin.execute(f'DROP ROLE "{squatter}"')


def assert_mirror_role_refused(target: Database, mirror: str, *named: str) -> None:
    """Migrating ``target`` stops before it makes anything, saying why the
    mirror role made beforehand will not do (``named``: what it must say)."""
    result = target.psql(*migration_files(), check=False)
    assert result.returncode != 0
    assert f"role {mirror} must be one nobody else can be" in result.stderr, result.stderr
    for part in named:
        assert part in result.stderr, result.stderr
    with target.connect() as conn:
        assert conn.execute("SELECT to_regnamespace('machine_sync')").fetchone() == (None,)


@pytest.mark.parametrize("made_as", ["LOGIN", "granted to authenticated", "SUPERUSER"])
def test_a_mirror_role_made_beforehand_that_others_can_be_is_refused(cluster, made_as):
    """The mirror role passes the guard, sees every machine_state row and
    may call stored_machine() (any machine, past row-level security). Made
    beforehand, by an administrator, so that someone can log in as it,
    granted to an API role (whose members would inherit all that), or a
    superuser (the mirror would run as one), it was taken as it was; now it
    is refused before anything is made."""
    target = cluster.create("legacy")
    mirror = f"machine_sync_mirror_{target.name}"
    with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{mirror}" NOLOGIN NOINHERIT')
        admin.execute(f'GRANT "{mirror}" TO "{cluster.owner}"')
        if made_as == "LOGIN":
            admin.execute(f'ALTER ROLE "{mirror}" LOGIN')
        elif made_as == "SUPERUSER":
            admin.execute(f'ALTER ROLE "{mirror}" SUPERUSER')
        else:
            admin.execute(f'GRANT "{mirror}" TO authenticated')
    try:
        assert_mirror_role_refused(target, mirror)
    finally:
        cluster.drop(target)
        with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
            admin.execute(f'DROP ROLE "{mirror}"')


@pytest.mark.parametrize("made_as", ["granted to another role", "made by another role"])
def test_a_mirror_role_made_beforehand_that_another_role_holds_is_refused(cluster, made_as):
    """Whoever is a member of the mirror role (or holds ADMIN OPTION on it,
    as the CREATEROLE role that made it does on PostgreSQL 16+, and may then
    grant it to itself) can SET ROLE to it and write machine_state past the
    guard. A role made beforehand and granted to someone besides the
    migrating owner, or made by another CREATEROLE role that granted it to
    the owner, was taken as it was; now it is refused before anything is
    made, naming the member."""
    target = cluster.create("legacy")
    mirror = f"machine_sync_mirror_{target.name}"
    other = f"t_other_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
        server_version = admin.info.server_version
        if made_as == "made by another role":
            if server_version < 160000:
                pytest.skip("PostgreSQL 15: any CREATEROLE role may take any role (README)")
            admin.execute(f'CREATE ROLE "{other}" NOLOGIN CREATEROLE')
            admin.execute(f'SET ROLE "{other}"')
            admin.execute(f'CREATE ROLE "{mirror}" NOLOGIN NOINHERIT')
            admin.execute(f'GRANT "{mirror}" TO "{cluster.owner}"')
            admin.execute("RESET ROLE")
        else:
            admin.execute(f'CREATE ROLE "{other}" NOLOGIN')
            admin.execute(f'CREATE ROLE "{mirror}" NOLOGIN NOINHERIT')
            admin.execute(f'GRANT "{mirror}" TO "{cluster.owner}"')
            admin.execute(f'GRANT "{mirror}" TO "{other}"')
    try:
        assert_mirror_role_refused(target, mirror, f"{other} is a member of it")
    finally:
        cluster.drop(target)
        with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{mirror}"')
            admin.execute(f'DROP ROLE "{other}"')


def test_a_mirror_role_made_beforehand_that_owns_objects_here_is_refused(cluster):
    """Whoever could act as the mirror role before the migration (its maker,
    and on PostgreSQL 15 any CREATEROLE role) could leave objects of its in
    the database: a SECURITY DEFINER function open to PUBLIC, once the
    migration grants the role machine_state and its policy, writes
    machine_state past the guard for anyone who calls it, long after the
    role it was granted to is gone. A role made beforehand that owns anything
    here but the mirror's own function is refused before anything is made,
    naming what it owns."""
    target = cluster.create("legacy")
    mirror = f"machine_sync_mirror_{target.name}"
    with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{mirror}" NOLOGIN NOINHERIT')
        admin.execute(f'GRANT "{mirror}" TO "{cluster.owner}"')
    with target.connect(admin=True) as admin:
        admin.execute(f'CREATE SCHEMA t_planted AUTHORIZATION "{mirror}"')
        admin.execute(f'SET ROLE "{mirror}"')
        admin.execute(
            "CREATE FUNCTION t_planted.write_state(machine uuid) RETURNS void"
            " LANGUAGE sql SECURITY DEFINER"
            " RETURN (SELECT NULL::void FROM public.machine_state WHERE machine_id = machine)"
        )
        admin.execute("RESET ROLE")
    try:
        assert_mirror_role_refused(
            target,
            mirror,
            "it owns function t_planted.write_state(uuid)",
            "it owns schema t_planted",
        )
    finally:
        cluster.drop(target)
        with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{mirror}"')


def test_the_down_migration_drops_no_role_a_setting_names(legacy_db):
    """The down migration learns the mirror role to drop at its end from a
    setting it makes at its start, and made it only where machine_sync
    names a mirror role. Run where it does not (again, after a revert), it
    took the setting as the session had it: a value set for the database or
    for the role (ALTER DATABASE/ROLE ... SET, by whoever may) made it DROP
    OWNED BY, and DROP ROLE, any role the reverting role could."""
    team = f"t_team_{uuid.uuid4().hex[:8]}"
    with legacy_db.connect(admin=True) as admin:
        admin.execute(f'CREATE ROLE "{team}" NOLOGIN')
        admin.execute(f'GRANT "{team}" TO "{legacy_db.cluster.owner}"')
        admin.execute("CREATE TABLE public.team_notes (note text)")
        admin.execute(f'ALTER TABLE public.team_notes OWNER TO "{team}"')
    try:
        legacy_db.migrate()
        legacy_db.psql(down_file(migration_files()[-1]))
        with legacy_db.connect(admin=True) as admin:
            admin.execute(
                f'ALTER DATABASE "{legacy_db.name}"'
                f' SET machine_sync.reverted_mirror_role = "{team}"'
            )
        legacy_db.psql(down_file(migration_files()[-1]))
        with legacy_db.connect() as conn:
            assert conn.execute("SELECT to_regclass('public.team_notes')").fetchone() == (
                "team_notes",
            )
    finally:
        with legacy_db.connect(admin=True) as admin:
            admin.execute(f'ALTER DATABASE "{legacy_db.name}" RESET ALL')
            if admin.execute("SELECT to_regrole(%s)", [team]).fetchone() != (None,):
                admin.execute(f'DROP OWNED BY "{team}"')
                admin.execute(f'DROP ROLE "{team}"')


def test_the_down_migration_runs_nothing_from_a_schema_another_role_made(legacy_db):
    """After a revert, a role that may create schemas can make machine_sync
    again with a lock_tables() of its own. The down migration, run again by
    hand, would call it as the owner: refused before it calls anything."""
    squatter = f"t_squatter_{uuid.uuid4().hex[:8]}"
    with legacy_db.connect(admin=True) as admin:
        admin.execute(f'CREATE ROLE "{squatter}" NOLOGIN')
        admin.execute(f'GRANT CREATE ON DATABASE "{legacy_db.name}" TO "{squatter}"')
        admin.execute(f'SET ROLE "{squatter}"')
        admin.execute("CREATE SCHEMA machine_sync")
        admin.execute("GRANT USAGE ON SCHEMA machine_sync TO PUBLIC")
        admin.execute(
            "CREATE FUNCTION machine_sync.lock_tables() RETURNS void LANGUAGE plpgsql AS $$"
            " BEGIN RAISE WARNING 'SQUATTED CODE RAN AS %', current_user; END $$"
        )
        admin.execute("RESET ROLE")
    try:
        result = legacy_db.psql(down_file(migration_files()[-1]), check=False)
        assert "SQUATTED CODE RAN" not in result.stderr
        assert result.returncode != 0
        assert (
            f"machine-sync's schema machine_sync exists and is owned by {squatter},"
            in result.stderr
        ), result.stderr
    finally:
        with legacy_db.connect(admin=True) as admin:
            admin.execute(f'DROP OWNED BY "{squatter}"')
            admin.execute(f'DROP ROLE "{squatter}"')
