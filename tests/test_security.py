"""Least privilege, Supabase's linter, and security-definer hygiene."""

from __future__ import annotations

import subprocess
import uuid

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from machine_sync import server as pgserver

from conftest import SUPABASE_LINTS, migration_files
from machines import add_machine, assert_consistent, state


def test_supabase_linter_is_clean_after_migrating(db):
    with db.connect() as conn:
        assert conn.execute(SUPABASE_LINTS.read_text()).fetchall() == []


def test_supabase_linter_catches_what_it_should(db):
    """Guard against a lint query that can never fail."""
    with db.connect() as conn:
        conn.execute(
            "CREATE FUNCTION public.leaky() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1'"
        )
        lints = {row[0] for row in conn.execute(SUPABASE_LINTS.read_text())}
    assert {"0011", "0028", "0029"} <= {lint[:4] for lint in lints}


def test_nothing_internal_lives_in_public(conn):
    public_functions = conn.execute(
        """SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace
           ORDER BY proname"""
    ).fetchall()
    assert public_functions == [
        ("atomic_complete_machine_state",),
        ("atomic_error_machine_state",),
        ("atomic_processing_machine_state",),
        ("atomic_update_machine_state",),
    ]
    assert conn.execute(
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        " AND relkind IN ('r', 'v', 'm') AND relname NOT IN ('machines', 'machine_state')"
    ).fetchone() == (0,)


def test_every_function_pins_search_path_and_public_rpcs_are_invokers(conn):
    rows = conn.execute(
        """SELECT p.oid::regprocedure::text, p.prosecdef, p.proconfig
           FROM pg_proc p WHERE p.pronamespace = 'machine_sync'::regnamespace
              OR p.proname LIKE 'atomic\\_%'"""
    ).fetchall()
    assert rows
    for name, security_definer, config in rows:
        # pg_catalog first: no temporary type, table or operator can shadow
        # a built-in one; every other name in the bodies is schema-qualified.
        assert "search_path=pg_catalog, pg_temp" in config, name
        assert [c for c in config if c.startswith("search_path=")] == [
            "search_path=pg_catalog, pg_temp"
        ], name
        if name.startswith("atomic_"):
            assert not security_definer, name


def test_the_mirror_runs_as_its_own_role_and_the_client_paths_as_the_caller(conn):
    definers = dict(
        conn.execute(
            """SELECT p.proname, pg_get_userbyid(p.proowner) FROM pg_proc p
               WHERE p.prosecdef AND (p.pronamespace = 'machine_sync'::regnamespace
                                      OR p.proname LIKE 'atomic\\_%')"""
        ).fetchall()
    )
    (mirror,) = conn.execute("SELECT machine_sync.mirror_role()").fetchone()
    # (This database is a copy of a migrated one, whose mirror role it keeps.)
    assert mirror.startswith("machine_sync_mirror_t_")
    assert definers.pop("machines_sync") == mirror
    assert set(definers) == {
        "reconcile_v1",
        "machine_state_direct_delete",
        "machine_state_after_truncate",
        "stored_machine",
    }
    # Nobody logs in as the mirror and no API role can become it.
    assert conn.execute(
        "SELECT rolcanlogin, rolinherit FROM pg_roles WHERE rolname = %s", [mirror]
    ).fetchone() == (False, False)
    for role in ("anon", "authenticated", "service_role"):
        assert conn.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", [role, mirror]).fetchone() == (
            False,
        ), role


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        ("anon", set()),
        ("authenticated", set()),
        ("service_role", {"machine_sync.reconcile_v1()", "machine_sync.set_mode_v1(text)"}),
    ],
)
def test_only_trusted_roles_reconcile_or_switch_mode(conn, role, allowed):
    executable = {
        name
        for (name,) in conn.execute(
            """SELECT p.oid::regprocedure::text FROM pg_proc p
               WHERE p.pronamespace = 'machine_sync'::regnamespace
                 AND has_function_privilege(%s, p.oid, 'EXECUTE')""",
            [role],
        )
    }
    trusted = {"machine_sync.reconcile_v1()", "machine_sync.set_mode_v1(text)"}
    assert executable & trusted == allowed
    # Trigger functions fire without EXECUTE; nobody needs to call them.
    assert not any(
        name.startswith(("machine_sync.machines_sync", "machine_sync.machine_state_"))
        for name in executable
    ), executable


def table_privileges(conn, role, table):
    candidates = ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"]
    if conn.execute("SELECT current_setting('server_version_num')::int >= 170000").fetchone()[0]:
        candidates.append("MAINTAIN")
    return {
        privilege
        for privilege in candidates
        if conn.execute(
            "SELECT has_table_privilege(%s, %s, %s)", [role, table, privilege]
        ).fetchone()[0]
    }


@pytest.mark.parametrize(
    ("role", "state_privileges", "machine_privileges"),
    [
        ("anon", {"SELECT"}, {"SELECT"}),
        # Legacy writers keep writing machine_state (compat carries it into
        # machines); deleting state rows, TRUNCATE, TRIGGER, REFERENCES and
        # MAINTAIN are the owner's only.
        ("authenticated", {"SELECT", "INSERT", "UPDATE"}, {"SELECT", "INSERT", "UPDATE", "DELETE"}),
        ("service_role", {"SELECT", "INSERT", "UPDATE"}, {"SELECT", "INSERT", "UPDATE", "DELETE"}),
    ],
)
def test_table_grants_follow_least_privilege(conn, role, state_privileges, machine_privileges):
    assert table_privileges(conn, role, "public.machine_state") == state_privileges
    assert table_privileges(conn, role, "public.machines") == machine_privileges


def test_anon_cannot_call_the_legacy_rpcs_but_authenticated_can(conn):
    check = (
        "SELECT has_function_privilege(%s, 'public.atomic_complete_machine_state(uuid)', 'EXECUTE')"
    )
    assert conn.execute(check, ["anon"]).fetchone() == (False,)
    assert conn.execute(check, ["authenticated"]).fetchone() == (True,)


def test_a_writer_whose_state_rows_rls_hides_is_still_mirrored(db):
    with db.connect() as conn:
        machine_id = add_machine(conn)
        # A fresh install starts with RLS on both tables and no policy for
        # clients; the application grants its users what they may do.
        conn.execute(
            "CREATE POLICY operators ON machines FOR ALL TO authenticated"
            " USING (true) WITH CHECK (true)"
        )
    with db.connect(autocommit=False) as conn:
        conn.execute("SET LOCAL ROLE authenticated")
        # machine_state hides every row from it: a direct write finds nothing.
        assert conn.execute("UPDATE machine_state SET current_state = 'error'").rowcount == 0
        assert conn.execute("SELECT count(*) FROM machine_state").fetchone() == (0,)
        conn.execute(
            "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s",
            [process := uuid.uuid4(), machine_id],
        )
        conn.commit()
    with db.connect() as conn:
        assert state(conn, machine_id)["current_state"] == "processing"
        assert state(conn, machine_id)["process_id"] == process
        assert_consistent(conn)


def test_migrations_apply_on_a_plain_postgresql_without_supabase_roles():
    """No anon/authenticated/service_role: the grants fall back to PUBLIC only."""
    with pgserver.embedded_server() as server:
        psql = pgserver.find_psql(server)
        argv = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", server.dsn]
        for path in migration_files() * 2:
            argv += ["-f", str(path)]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            assert conn.execute(
                "SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated')"
            ).fetchone() == (0,)
            conn.execute("CREATE ROLE app LOGIN")
            conn.execute("GRANT SELECT, UPDATE ON machines, machine_state TO app")
            assert conn.execute(
                "SELECT has_function_privilege('app', 'machine_sync.reconcile_v1()', 'EXECUTE'),"
                " has_table_privilege('app', 'machine_state', 'UPDATE')"
            ).fetchone() == (False, True)


def test_a_fresh_install_is_closed_to_anonymous_visitors(db):
    with db.connect() as conn:
        machine_id = add_machine(conn)
        assert conn.execute(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'machines'::regclass"
        ).fetchone() == (True,)
        for privilege in ("INSERT", "UPDATE", "DELETE", "TRUNCATE"):
            assert conn.execute(
                "SELECT has_table_privilege('anon', 'machines', %s)", [privilege]
            ).fetchone() == (False,), privilege
    with db.connect(autocommit=False) as conn:
        conn.execute("SET LOCAL ROLE anon")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM machines")
    with db.connect() as conn:
        assert state(conn, machine_id) is not None


@pytest.mark.parametrize("enabled", [True, False])
def test_migrating_leaves_rls_on_an_existing_machines_table_as_it_was(legacy_db, enabled):
    with legacy_db.connect() as conn:
        conn.execute(
            f"ALTER TABLE machines {'ENABLE' if enabled else 'DISABLE'} ROW LEVEL SECURITY"
        )
    legacy_db.migrate()
    with legacy_db.connect() as conn:
        assert conn.execute(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'machines'::regclass"
        ).fetchone() == (enabled,)


@pytest.mark.parametrize(
    "role", ["anon", "authenticated", "service_role", "the mirror role", "PUBLIC"]
)
def test_only_the_owner_may_call_lock_tables(db, conn, role):
    """lock_tables() takes ACCESS EXCLUSIVE on machines and every table of
    machine_sync: the migrations' alone. PostgreSQL grants EXECUTE on a new
    function to PUBLIC; 90_grants.sql takes it back."""
    if role == "the mirror role":
        (role,) = conn.execute("SELECT machine_sync.mirror_role()").fetchone()
    (acl,) = conn.execute(
        "SELECT proacl::text[] FROM pg_proc WHERE oid = 'machine_sync.lock_tables()'::regprocedure"
    ).fetchone()
    assert acl == [f"{db.cluster.owner}=X/{db.cluster.owner}"]
    if role == "PUBLIC":
        return
    assert conn.execute(
        "SELECT has_function_privilege(%s, 'machine_sync.lock_tables()', 'EXECUTE')", [role]
    ).fetchone() == (False,)
    with db.connect(admin=True) as admin:
        admin.execute(f'SET ROLE "{role}"')
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            admin.execute("SELECT machine_sync.lock_tables()")


@pytest.mark.parametrize(
    "lock_timeout", ["0", "1us", "1", "1500us", "90s", "61min", "25h", "1d", "2147483647ms"]
)
def test_lock_tables_takes_any_lock_timeout_and_gives_it_back(conn, lock_timeout):
    """Whatever the caller's lock_timeout and however PostgreSQL spells it
    (rounded microseconds, minutes, hours, days, the largest value), the
    owner's call locks the tables at once when they are free and leaves the
    setting as it found it."""
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", [lock_timeout])
        (before,) = conn.execute("SELECT current_setting('lock_timeout')").fetchone()
        conn.execute("SELECT machine_sync.lock_tables()")
        assert conn.execute("SELECT current_setting('lock_timeout')").fetchone() == (before,)
        (locked,) = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid()"
            " AND mode = 'AccessExclusiveLock'"
            " AND relation IN ('public.machines'::regclass, 'public.machine_state'::regclass)"
        ).fetchone()
        assert locked == 2


def test_the_owner_of_another_database_cannot_act_as_this_databases_mirror(db, cluster):
    """Another database of the cluster, with another owner, migrated by it:
    that owner is a member of that database's mirror role, as migrating made
    it. Connected here (PUBLIC may CONNECT to a database by default), it can
    neither become this database's mirror nor, as its own, read machines
    past row-level security, write machine_state past the guard or change
    this database's mirror. (With one mirror role for the whole cluster, it
    could do all of that.)"""
    other_owner = f"t_other_{uuid.uuid4().hex[:8]}"
    other = cluster.create()
    with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{other_owner}" LOGIN CREATEROLE')
        admin.execute(f'ALTER DATABASE "{other.name}" OWNER TO "{other_owner}"')
    with db.connect() as conn:
        machine_id = add_machine(conn, status="idle")
        (mirror,) = conn.execute("SELECT machine_sync.mirror_role()").fetchone()
        conn.execute("SELECT machine_sync.set_mode_v1('strict')")
    try:
        other_dsn = make_conninfo(other.admin_dsn, user=other_owner)
        with psycopg.connect(other_dsn, autocommit=True) as owner_there:
            for path in migration_files():
                owner_there.execute(path.read_text())
            (other_mirror,) = owner_there.execute("SELECT machine_sync.mirror_role()").fetchone()
        assert other_mirror == f"machine_sync_mirror_{other.name}" != mirror
        dsn = make_conninfo(db.admin_dsn, user=other_owner)
        with psycopg.connect(dsn, autocommit=True) as intruder:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                intruder.execute(f'SET ROLE "{mirror}"')
            if intruder.info.server_version >= 160000:
                # (On PostgreSQL 15 a CREATEROLE role may grant itself any
                # role that is not a superuser, this database's owner too.)
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    intruder.execute(f'GRANT "{mirror}" TO "{other_owner}"')
            intruder.execute(f'SET ROLE "{other_mirror}"')
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                intruder.execute("SELECT * FROM machine_sync.stored_machine(%s)", [machine_id])
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                intruder.execute(
                    "UPDATE machine_state SET current_state = 'error' WHERE machine_id = %s",
                    [machine_id],
                )
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                intruder.execute("ALTER FUNCTION machine_sync.machines_sync() SET work_mem = '1MB'")
        with db.connect() as conn:
            assert (state(conn, machine_id) or {}).get("current_state") == "idle"
            assert_consistent(conn)
    finally:
        cluster.drop(other)
        with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
            admin.execute(f'DROP ROLE "{other_owner}"')
