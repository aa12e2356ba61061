"""Restores of a migrated database, as Supabase makes them: the roles exist,
the schema is restored first, then the data with session_replication_role =
replica, so that no trigger fires while rows are loaded.

Each restore is done with the server's own pg_dump, pg_restore and psql, of a
migrated production-shaped database (the legacy fixture migrated by
``machine-sync migrate apply``) holding machines in every status. Afterwards
the triggers are there and enabled, the catalog is the source's, drift is
empty (or, when the dump itself drifted, reported and repaired by
``machine-sync reconcile``) and ordinary writes are mirrored again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from .workload import LEGACY_PATHS, legacy_params
from catalog import snapshot as catalog_snapshot
from conftest import Cluster, Database
from machines import add_machine, assert_consistent, disagreements

Conn = psycopg.Connection[Any]

PRODUCT_TRIGGERS = """
    SELECT tgrelid::regclass::text, tgname, tgenabled
    FROM pg_trigger
    WHERE NOT tgisinternal
      AND tgrelid IN ('public.machines'::regclass, 'public.machine_state'::regclass)
    ORDER BY 1, 2
"""
SHIPPED_TRIGGERS = {
    ("machines", "zz_machine_sync"),
    ("machines", "zz_machine_sync_insert"),
    ("machines", "zz_machine_sync_insert_state"),
    ("machines", "zz_machine_sync_applied"),
    ("machine_state", "machine_state_direct_write"),
    ("machine_state", "machine_state_carry_update"),
    ("machine_state", "machine_state_carry_insert"),
    ("machine_state", "machine_state_direct_delete"),
    ("machine_state", "machine_state_truncate_alone"),
}
# The application's tables: what a data-only restore over an existing install
# brings (machine-sync's own tables are the install's).
APPLICATION_DATA = ("--schema", "public")


def tool(cluster: Cluster, name: str) -> str:
    """pg_dump, pg_restore or psql of the server's own version."""
    path = Path(cluster.psql).parent / name
    if not path.is_file():  # only a server named by MACHINE_SYNC_TEST_DSN lacks them
        pytest.skip(f"no {name} beside {cluster.psql}")
    return str(path)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args[0]} failed ({done.returncode}): {done.stderr}"
    assert "ERROR" not in done.stderr, done.stderr
    return done.stdout


def cli(db: Database, *args: str) -> subprocess.CompletedProcess[str]:
    """The machine-sync command line, as an operator runs it."""
    env = {**os.environ, "DATABASE_URL": db.dsn}
    return subprocess.run(
        [sys.executable, "-m", "machine_sync", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def pg_dump(db: Database, target: Path, *options: str) -> Path:
    """Dump as the owner (Supabase's dump runs as postgres)."""
    ok(run(tool(db.cluster, "pg_dump"), *options, "-f", str(target), "-d", db.dsn))
    return target


def restore_supabase_way(
    db: Database, schema: Path | None, data: Path, *, admin: bool
) -> subprocess.CompletedProcess[str]:
    """Supabase's documented restore: one psql, one transaction, stop at the first error."""
    argv = [tool(db.cluster, "psql"), "-X", "-q", "--single-transaction", "-v", "ON_ERROR_STOP=1"]
    if schema is not None:
        argv += ["-f", str(schema)]
    argv += ["-c", "SET session_replication_role = replica", "-f", str(data)]
    return run(*argv, "-d", db.admin_dsn if admin else db.dsn)


@pytest.fixture
def owner_sets_replica(cluster: Cluster) -> Iterator[None]:
    """The owner may set session_replication_role, as Supabase's postgres may."""
    grant = sql.SQL("GRANT SET ON PARAMETER session_replication_role TO {}")
    revoke = sql.SQL("REVOKE SET ON PARAMETER session_replication_role FROM {}")
    with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
        admin.execute(grant.format(sql.Identifier(cluster.owner)))
    try:
        yield
    finally:
        with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
            admin.execute(revoke.format(sql.Identifier(cluster.owner)))


def migrated(cluster: Cluster) -> Database:
    """The legacy production database, migrated by the runner (so with its history)."""
    db = cluster.create("legacy")
    ok(cli(db, "migrate", "apply"))
    return db


def start(conn: Conn, machine_id: uuid.UUID) -> uuid.UUID:
    """Start a run (a process_executions row: the legacy foreign key wants one)."""
    row = conn.execute("INSERT INTO process_executions DEFAULT VALUES RETURNING id").fetchone()
    assert row is not None
    conn.execute(
        "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s",
        [row[0], machine_id],
    )
    process: uuid.UUID = row[0]
    return process


def populate(conn: Conn) -> dict[str, uuid.UUID]:
    """Machines in every status, written the ordinary way (the triggers run)."""
    made: dict[str, uuid.UUID] = {}
    for n in range(3):
        for status in ("offline", "idle", "maintenance"):
            made[f"{status}{n}"] = add_machine(conn, status=status)
        made[f"processing{n}"] = add_machine(conn, status="idle")
        start(conn, made[f"processing{n}"])
        made[f"error{n}"] = add_machine(conn, status="idle")
        conn.execute(
            "UPDATE machines SET status = 'error', failure_description = %s,"
            " failure_component = (SELECT id FROM machine_components LIMIT 1) WHERE id = %s",
            [f"heater {n} failed", made[f"error{n}"]],
        )
    assert_consistent(conn)
    statuses = {r[0] for r in conn.execute("SELECT status FROM machines").fetchall()}
    assert statuses == {"offline", "idle", "processing", "error", "maintenance"}
    return made


def rows(conn: Conn) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    return (
        conn.execute("SELECT * FROM machines ORDER BY id").fetchall(),
        conn.execute("SELECT * FROM machine_state ORDER BY machine_id").fetchall(),
    )


def assert_installed(target: Database, source: Database) -> None:
    """The product is there as in the source: triggers enabled, the mirror run
    as the source's mirror role, the same catalog, and `migrate status` clean."""
    with target.connect() as conn, source.connect() as original:
        triggers = conn.execute(PRODUCT_TRIGGERS).fetchall()
        assert triggers == original.execute(PRODUCT_TRIGGERS).fetchall()
        assert {(table, name) for table, name, _ in triggers} >= SHIPPED_TRIGGERS
        assert {(name, enabled) for _, name, enabled in triggers if enabled != "O"} == {
            ("zz_machine_sync_applied", "D")  # on for a subscriber of machines alone only
        }
        owner = conn.execute(
            "SELECT proowner::regrole::text FROM pg_proc"
            " WHERE oid = 'machine_sync.machines_sync()'::regprocedure"
        ).fetchone()
        mirror = original.execute("SELECT machine_sync.mirror_role()::regrole::text").fetchone()
        assert owner == mirror  # the source's: a restored copy keeps its mirror role
        assert catalog_snapshot(conn) == catalog_snapshot(original)
    status = cli(target, "migrate", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "up to date" in status.stdout


def assert_writes_mirrored(conn: Conn, made: dict[str, uuid.UUID]) -> None:
    """Every kind of write after the restore is mirrored: the new UPDATE, the
    legacy two-statement paths in compat, an insert, a delete."""
    conn.execute("UPDATE machines SET status = 'idle' WHERE id = %s", [made["maintenance0"]])
    conn.execute("UPDATE machines SET status = 'idle' WHERE id = %s", [made["error0"]])
    process = start(conn, made["idle0"])
    assert conn.execute(
        "SELECT current_state, process_id FROM machine_state WHERE machine_id = %s",
        [made["idle0"]],
    ).fetchone() == ("processing", process)
    for path, machine_id in (("complete", made["processing0"]), ("error", made["idle1"])):
        params = legacy_params(machine_id)
        for _table, statement in LEGACY_PATHS[path]:
            conn.execute(statement, params)
    new = add_machine(conn, status="IDLE")
    conn.execute("DELETE FROM machines WHERE id = %s", [made["offline0"]])
    assert conn.execute(
        "SELECT current_state FROM machine_state WHERE machine_id = %s", [new]
    ).fetchone() == ("idle",)
    assert conn.execute(
        "SELECT count(*) FROM machine_state WHERE machine_id = %s", [made["offline0"]]
    ).fetchone() == (0,)
    assert_consistent(conn)


def drift_on_purpose(source: Database, made: dict[str, uuid.UUID]) -> dict[uuid.UUID, str]:
    """Make machines and machine_state disagree in the source, bypassing the
    triggers; return the drift each machine must show after a restore."""
    orphan = uuid.uuid4()
    with source.connect(admin=True) as admin:
        admin.execute("SET session_replication_role = replica")
        admin.execute("DELETE FROM machine_state WHERE machine_id = %s", [made["idle0"]])
        admin.execute(
            "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'idle')", [orphan]
        )
        admin.execute(
            "UPDATE machine_state SET current_state = 'IDLE' WHERE machine_id = %s",
            [made["idle1"]],
        )
        admin.execute(
            "UPDATE machine_state SET process_id = NULL WHERE machine_id = %s",
            [made["processing1"]],
        )
        admin.execute("UPDATE machines SET status = ' Maintenance' WHERE id = %s", [made["idle2"]])
        admin.execute(
            "UPDATE machines SET status = 'offline' WHERE id = %s", [made["maintenance1"]]
        )
    return {
        made["idle0"]: "missing_state",
        orphan: "orphaned_state",
        made["idle1"]: "status_case",
        made["processing1"]: "value_mismatch",
        made["idle2"]: "noncanonical_status",
        made["maintenance1"]: "value_mismatch",
    }


def assert_reconcile_repairs(target: Database, expected: dict[uuid.UUID, str]) -> None:
    """Drift shows exactly what the dump held; the CLI repairs all of it."""
    with target.connect() as conn:
        found = dict(conn.execute("SELECT machine_id, problem FROM machine_sync.drift").fetchall())
        assert found == expected
        assert len(disagreements(conn)) == len(expected)
    drift = cli(target, "drift")
    assert drift.returncode == 1, drift.stderr
    for machine_id in expected:
        assert str(machine_id) in drift.stdout
    repaired = cli(target, "reconcile")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert repaired.stdout.splitlines()[0] == f"repaired {len(expected)} drifted machine(s)"
    assert cli(target, "drift").returncode == 0
    with target.connect() as conn:
        assert_consistent(conn)
        orphans = [m for m, problem in expected.items() if problem == "orphaned_state"]
        assert conn.execute(
            "SELECT count(*) FROM machine_state WHERE machine_id = ANY(%s)", [orphans]
        ).fetchone() == (0,)
        statuses = conn.execute(
            "SELECT status FROM machines WHERE id = ANY(%s)", [list(expected)]
        ).fetchall()
        assert {s for (s,) in statuses} <= {"idle", "processing", "maintenance", "offline"}


@pytest.fixture
def source(cluster: Cluster) -> Iterator[tuple[Database, dict[str, uuid.UUID]]]:
    db = migrated(cluster)
    try:
        with db.connect() as conn:
            made = populate(conn)
        yield db, made
    finally:
        cluster.drop(db)


@pytest.fixture
def target(cluster: Cluster) -> Iterator[Database]:
    """An empty database of a new project: Supabase's roles, nothing else."""
    with cluster.database("supabase") as db:
        yield db


@pytest.mark.parametrize("drifted", [False, True], ids=["consistent", "drifted-dump"])
def test_full_restore_as_superuser(source, target, tmp_path, drifted):
    """Schema, then data with replica, in one transaction, by a superuser (a
    self-hosted server; Supabase's own restore tooling)."""
    db, made = source
    expected = drift_on_purpose(db, made) if drifted else {}
    schema = pg_dump(db, tmp_path / "schema.sql", "--schema-only")
    data = pg_dump(db, tmp_path / "data.sql", "--data-only")
    ok(restore_supabase_way(target, schema, data, admin=True))
    assert_installed(target, db)
    with target.connect() as conn, db.connect() as original:
        assert rows(conn) == rows(original)
    if drifted:
        assert_reconcile_repairs(target, expected)
    with target.connect() as conn:
        assert_consistent(conn)
        assert_writes_mirrored(conn, made)


def test_restore_as_the_owner_fails_whole_then_works_without_owners(
    source, target, tmp_path, owner_sets_replica
):
    """As Supabase's non-superuser postgres: the plain dump cannot hand the
    mirror's function to its mirror role (that needs the role to have
    CREATE on machine_sync, which a restore grants only at its end), so the
    one-transaction restore stops there and leaves nothing behind. Restored
    without owners and followed by `migrate apply --force`, it works; until
    then `migrate status` names the function."""
    db, made = source
    schema = pg_dump(db, tmp_path / "schema.sql", "--schema-only")
    data = pg_dump(db, tmp_path / "data.sql", "--data-only")
    refused = restore_supabase_way(target, schema, data, admin=False)
    assert refused.returncode == 3, refused.stderr
    assert "permission denied for schema machine_sync" in refused.stderr
    assert target.one("SELECT to_regclass('public.machines') IS NULL") is True

    archive = pg_dump(db, tmp_path / "schema.dump", "--schema-only", "--format=custom")
    restore = tool(target.cluster, "pg_restore")
    ok(run(restore, "--no-owner", "--single-transaction", "--exit-on-error", "-d", target.dsn,
           str(archive)))  # fmt: skip
    ok(restore_supabase_way(target, None, data, admin=False))
    status = cli(target, "migrate", "status")
    assert status.returncode == 1
    assert "function machine_sync.machines_sync() was changed" in status.stdout
    ok(cli(target, "migrate", "apply", "--force"))
    assert_installed(target, db)
    with target.connect() as conn, db.connect() as original:
        assert rows(conn) == rows(original)
        assert_writes_mirrored(conn, made)


@pytest.mark.parametrize("existing", ["emptied", "own-machines"])
@pytest.mark.parametrize("drifted", [False, True], ids=["consistent", "drifted-dump"])
def test_data_only_restore_over_an_install(cluster, source, tmp_path, existing, drifted):
    """The application's data (--schema public), loaded with replica into an
    install whose tables were emptied, or that holds machines of its own."""
    db, made = source
    expected = drift_on_purpose(db, made) if drifted else {}
    data = pg_dump(db, tmp_path / "data.sql", "--data-only", *APPLICATION_DATA)
    target = migrated(cluster)
    try:
        with target.connect() as conn:
            conn.execute(
                "TRUNCATE machines, machine_state, process_executions, machine_components CASCADE"
            )
            own = []
            if existing == "own-machines":
                own = [add_machine(conn, status=s) for s in ("idle", "maintenance", "offline")]
                start(conn, own[0])
            before = rows(conn)
        ok(restore_supabase_way(target, None, data, admin=True))
        with target.connect() as conn, db.connect() as original:
            source_machines, source_states = rows(original)
            machines, states = rows(conn)
            assert sorted(machines) == sorted(source_machines + before[0])
            assert sorted(states) == sorted(source_states + before[1])
            assert {
                (t[1], t[2]) for t in conn.execute(PRODUCT_TRIGGERS).fetchall() if t[2] != "O"
            } == {("zz_machine_sync_applied", "D")}
        if drifted:
            assert_reconcile_repairs(target, expected)
        with target.connect() as conn:
            assert_consistent(conn)
            assert_writes_mirrored(conn, made)
            for machine_id in own:
                conn.execute("UPDATE machines SET status = 'error' WHERE id = %s", [machine_id])
            assert_consistent(conn)
    finally:
        cluster.drop(target)
