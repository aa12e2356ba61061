"""The migration runner against a real PostgreSQL: history, adoption of psql
installs, checksum refusal, definition check, down/up, the deployers' lock and
busy tables."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from machine_sync._queries import query
from machine_sync.errors import (
    ChecksumMismatch,
    InvalidArgument,
    MigrationError,
    MigrationFailed,
    MigrationLocked,
    MigrationsNotFound,
    PermissionDenied,
)
from machine_sync.resources import migrations_dir
from machine_sync.runner import RESTORE_COMMAND, FileState, Runner, transaction_body

from catalog import data, snapshot
from machines import add_machine, assert_consistent, wait_for

SHIPPED = sorted(p.name for p in migrations_dir().glob("[0-9]*_*.sql"))


def runner(conn: psycopg.Connection[Any], directory: Path | None = None, **options: Any) -> Runner:
    options.setdefault("lock_wait", 5)
    return Runner(conn, directory, **options)


def history(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT migration, sha256 FROM machine_sync_migrations.applied ORDER BY migration"
    ).fetchall()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_migrations(tmp_path: Path) -> Path:
    target = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), target)
    return target


def write_migrations(tmp_path: Path, files: dict[str, str]) -> Path:
    """A migrations folder of our own, for behaviour the shipped files cannot show."""
    folder = tmp_path / "custom"
    (folder / "down").mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


# -- apply, record, adopt ---------------------------------------------------


def test_apply_runs_the_text_it_checked_and_records(empty_db, tmp_path):
    """A file edited while apply waits for the lock (a checkout of another
    version): what runs is the text whose checksum is recorded, the one read
    and checked before the wait."""
    folder = write_migrations(tmp_path, {"1_a.sql": "CREATE TABLE planned ();\n"})
    read = sha256(folder / "1_a.sql")
    lines: list[str] = []
    failures: list[BaseException] = []
    with empty_db.connect() as holder, empty_db.connect() as conn:
        assert holder.execute(query("try_migration_lock").text).fetchone() == (True,)

        def deploy() -> None:
            try:
                runner(conn, folder, echo=lines.append, lock_wait=60).apply()
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        worker = threading.Thread(target=deploy)
        worker.start()
        try:
            wait_for("apply to wait for the lock", lambda: any("waiting" in x for x in lines))
            (folder / "1_a.sql").write_text("CREATE TABLE edited ();\n")
        finally:
            holder.execute(query("release_migration_lock").text)
            worker.join(60)
        assert not failures, failures
        assert history(conn) == [("1_a.sql", read)]
        tables = conn.execute(
            "SELECT relname FROM pg_class WHERE relname IN ('planned', 'edited')"
        ).fetchall()
        assert tables == [("planned",)]


def test_apply_on_an_empty_database_records_every_file(empty_db):
    lines: list[str] = []
    with empty_db.connect() as conn:
        plan = runner(conn, echo=lines.append).apply()
        assert [s.migration.name for s in plan.steps] == SHIPPED
        assert {s.action for s in plan.steps} == {"apply"}
        assert history(conn) == [(n, sha256(migrations_dir() / n)) for n in SHIPPED]
        assert any(line.startswith(f"[1/{len(SHIPPED)}] apply {SHIPPED[0]}") for line in lines)
        assert sum("done in" in line for line in lines) == len(SHIPPED)
        status = runner(conn).status()
        assert status.up_to_date
        assert [f.state for f in status.files] == [FileState.APPLIED] * len(SHIPPED)
        again: list[str] = []
        assert runner(conn, echo=again.append).apply().steps == []
        assert again == ["nothing to apply: every migration is applied"]
        assert_consistent(conn)


SCHEMAS = "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'"


def test_runner_and_psql_install_the_same_catalog(db, empty_db):
    with empty_db.connect() as by_runner:
        runner(by_runner).apply()
        installed = snapshot(by_runner)
        runner_schemas = set(by_runner.execute(SCHEMAS).fetchall())
    with db.connect() as by_psql:
        assert installed == snapshot(by_psql)
        psql_schemas = set(by_psql.execute(SCHEMAS).fetchall())
    # The runner's bookkeeping lives beside machine_sync, not in it.
    assert runner_schemas - psql_schemas == {("machine_sync_migrations",)}
    assert psql_schemas <= runner_schemas


def test_adopts_a_database_migrated_with_psql(db, conn):
    add_machine(conn, status="processing", current_process_id=uuid.uuid4())
    before = data(conn)
    status = runner(conn).status()
    assert status.adoptable
    # psql ran the same files: they recorded what they installed, so the
    # database is up to date though the runner has no history of it.
    assert [f.state for f in status.files] == [FileState.INSTALLED] * len(SHIPPED)
    assert status.up_to_date
    assert status.definitions_recorded
    assert status.definition_problems == []
    lines: list[str] = []
    plan = runner(conn, echo=lines.append).apply()
    assert plan.adopting
    assert [s.action for s in plan.steps] == ["adopt"] * len(SHIPPED)
    assert "adopting" in lines[0]
    assert [name for name, _ in history(conn)] == SHIPPED
    assert data(conn) == before
    assert runner(conn).status().up_to_date


def test_adoption_restores_a_function_edited_before(db, conn):
    shipped = conn.execute(
        "SELECT pg_get_functiondef('machine_sync.mode_v1()'::regprocedure)"
    ).fetchone()
    conn.execute(
        "CREATE OR REPLACE FUNCTION machine_sync.mode_v1() RETURNS text "
        "LANGUAGE sql AS $$SELECT 'compat'$$"
    )
    runner(conn).apply()
    restored = conn.execute(
        "SELECT pg_get_functiondef('machine_sync.mode_v1()'::regprocedure)"
    ).fetchone()
    assert restored == shipped


def test_psql_and_the_runner_can_be_mixed(empty_db, tmp_path):
    full = copy_migrations(tmp_path)
    first_only = tmp_path / "first"
    (first_only / "down").mkdir(parents=True)
    shutil.copy(full / SHIPPED[0], first_only / SHIPPED[0])
    with empty_db.connect() as conn:
        runner(conn, first_only).apply()
        assert [f.state for f in runner(conn, full).status().files] == [
            FileState.APPLIED,
            *[FileState.PENDING] * (len(SHIPPED) - 1),
        ]
        empty_db.psql(*(full / name for name in SHIPPED[1:]))  # a colleague used psql
        assert [f.state for f in runner(conn, full).status().files] == [
            FileState.APPLIED,
            *[FileState.INSTALLED] * (len(SHIPPED) - 1),
        ]
        # What psql installed is verified too, and no revert starts below it.
        assert [v.name for v in runner(conn, full).verify()] == SHIPPED
        with pytest.raises(MigrationError, match="ran here with psql"):
            runner(conn, full).down()
        plan = runner(conn, full).apply()
        assert [(s.migration.name, s.action) for s in plan.steps] == [
            (name, "apply") for name in SHIPPED[1:]
        ]
        assert [name for name, _ in history(conn)] == SHIPPED
        assert runner(conn, full).status().up_to_date


def test_the_legacy_database_is_migrated_by_the_runner(legacy_db):
    with legacy_db.connect() as conn:
        machines_before = conn.execute("SELECT count(*) FROM machines").fetchone()
        (missing,) = conn.execute(
            "SELECT count(*) FROM machines AS m"
            " WHERE NOT EXISTS (SELECT FROM machine_state AS s WHERE s.machine_id = m.id)"
        ).fetchone()
        assert missing > 0
        # Its tables predate machine-sync: that is not a psql install to adopt.
        assert not runner(conn).status().adoptable
        assert {step.action for step in runner(conn).plan().steps} == {"apply"}
        said: list[str] = []
        runner(conn, echo=said.append).apply()
        assert conn.execute("SELECT count(*) FROM machines").fetchone() == machines_before
        assert_consistent(conn)
        # The migration says what it repaired, in machine_sync.drift's terms;
        # PostgreSQL's own notices ("already exists, skipping") are not shown.
        (report,) = [line for line in said if "drift repaired" in line]
        assert f" {missing} missing_state" in report
        assert report.endswith(f"all {machines_before[0]} machines agree")
        assert not [line for line in said if "skipping" in line]
        said.clear()
        runner(conn, echo=said.append).apply(force=True)
        (again,) = [line for line in said if "drift repaired" in line]
        assert "drift repaired from machines: none;" in again
        assert "another status): 0;" in again


def test_another_role_than_the_tables_owner_is_refused_before_the_history_is_made(legacy_db):
    """A superuser trying first would otherwise leave the runner's history
    behind, its own, with the baseline recorded: the owner could then neither
    read nor apply."""
    owner = legacy_db.cluster.owner
    with legacy_db.connect(admin=True) as admin:
        superuser = admin.execute("SELECT current_user").fetchone()[0]
        # Its plan (and apply --dry-run) says so too, rather than list files
        # that apply then refuses to run.
        for planned in (runner(admin).plan, partial(runner(admin).apply, dry_run=True)):
            with pytest.raises(PermissionDenied, match=f"not by {superuser}"):
                planned()
        with pytest.raises(PermissionDenied) as caught:
            runner(admin).apply()
        assert caught.value.sqlstate == "42501"
        assert f"not by {superuser}" in str(caught.value)
        assert f"public.machines (owned by {owner})" in str(caught.value)
        assert admin.execute("SELECT to_regnamespace('machine_sync_migrations')").fetchone() == (
            None,
        )
    with legacy_db.connect() as conn:
        assert {step.action for step in runner(conn).plan().steps} == {"apply"}
        runner(conn).apply()
        assert [name for name, _ in history(conn)] == SHIPPED
        assert_consistent(conn)


def test_a_migration_the_data_refuses_is_named_with_its_hint(legacy_db):
    broken = "00000000-0000-4000-8000-000000000017"
    with legacy_db.connect() as conn:
        conn.execute("UPDATE machines SET status = 'broken' WHERE id = %s", [broken])
        with pytest.raises(MigrationFailed) as caught:
            runner(conn).apply()
        message = str(caught.value)
        assert caught.value.migration == SHIPPED[-1]
        assert caught.value.sqlstate == "23514"
        assert broken in message
        assert "'broken'" in message
        assert "hint: INSERT the status into machine_sync.allowed_status" in message
        assert [name for name, _ in history(conn)] == SHIPPED[:-1]
        assert conn.execute("SELECT to_regnamespace('machine_sync')").fetchone() == (None,)


def test_a_statement_timeout_names_itself_and_how_to_raise_it(empty_db, tmp_path):
    """A role-level statement_timeout (as on Supabase) ending a long migration
    is reported as such, with how to run it again, and nothing is recorded."""
    folder = write_migrations(tmp_path, {"1_slow.sql": "SELECT pg_sleep(1);\n"})
    with empty_db.connect() as conn:
        conn.execute("SET statement_timeout = '100ms'")
        with pytest.raises(MigrationFailed) as caught:
            runner(conn, folder, retries=0).apply()
        assert caught.value.sqlstate == "57014"
        assert "statement_timeout ended it" in str(caught.value)
        assert "PGOPTIONS='-c statement_timeout=0'" in str(caught.value)
        assert history(conn) == []


def test_a_nondeterministic_collation_on_a_status_column_is_refused_before_anything_changes(
    legacy_db,
):
    with legacy_db.connect(admin=True) as admin:
        try:
            admin.execute(
                "CREATE COLLATION public.case_blind"
                " (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
            )
        except psycopg.errors.FeatureNotSupported as exc:
            # Only ICU collations can be nondeterministic: without ICU a
            # server cannot have the column this refuses.
            pytest.skip(f"this server cannot have a nondeterministic collation: {exc}")
        admin.execute(
            "ALTER TABLE public.machines ALTER COLUMN status TYPE text COLLATE case_blind"
        )
    with legacy_db.connect() as conn:
        # Under it 'IDLE' = 'idle': the rules could not tell spellings apart.
        assert (
            conn.execute(
                "SELECT count(*) FROM machines WHERE status = 'IDLE' COLLATE case_blind"
            ).fetchone()
            == conn.execute("SELECT count(*) FROM machines WHERE lower(status) = 'idle'").fetchone()
        )
        with pytest.raises(MigrationFailed) as caught:
            runner(conn).apply()
        assert caught.value.sqlstate == "0A000"
        assert "public.machines.status (collation case_blind)" in str(caught.value)
        assert 'COLLATE "default"' in str(caught.value)
        assert [name for name, _ in history(conn)] == SHIPPED[:-1]
        assert conn.execute("SELECT to_regnamespace('machine_sync')").fetchone() == (None,)


def test_dry_run_changes_nothing(empty_db):
    with empty_db.connect() as conn:
        plan = runner(conn).apply(dry_run=True)
        assert [s.migration.name for s in plan.steps] == SHIPPED
        assert conn.execute(
            "SELECT to_regnamespace('machine_sync_migrations'), to_regclass('public.machines')"
        ).fetchone() == (None, None)


# -- edited files and edited definitions ------------------------------------


def test_an_edited_applied_file_is_refused_by_name(empty_db, tmp_path):
    folder = copy_migrations(tmp_path)
    with empty_db.connect() as conn:
        runner(conn, folder).apply()
        recorded = history(conn)
        edited = folder / SHIPPED[-1]
        edited.write_text(edited.read_text() + "\n-- a late fix\n")
        for attempt in (lambda: runner(conn, folder).apply(), lambda: runner(conn, folder).plan()):
            with pytest.raises(ChecksumMismatch) as caught:
                attempt()
            assert caught.value.names == [SHIPPED[-1]]
            assert SHIPPED[-1] in str(caught.value)
            assert RESTORE_COMMAND in str(caught.value)
        assert history(conn) == recorded
        status = runner(conn, folder).status()
        assert [f.state for f in status.files][-1] == FileState.CHANGED
        assert not status.up_to_date
        plan = runner(conn, folder).apply(force=True)
        assert [s.action for s in plan.steps] == ["reapply"] * len(SHIPPED)
        assert dict(history(conn))[SHIPPED[-1]] == sha256(edited)
        assert runner(conn, folder).status().up_to_date


def test_line_endings_do_not_count_as_an_edit(empty_db, tmp_path):
    folder = copy_migrations(tmp_path)
    with empty_db.connect() as conn:
        runner(conn, folder).apply()
        for name in SHIPPED:
            path = folder / name
            path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
        assert runner(conn, folder).status().up_to_date


def test_hand_edited_definitions_are_reported_and_restored(db, conn):
    runner(conn).apply()
    conn.execute(
        "CREATE OR REPLACE FUNCTION machine_sync.mode_v1() RETURNS text "
        "LANGUAGE sql SET search_path = '' AS $$SELECT 'compat'$$"
    )
    conn.execute("ALTER TABLE machines DISABLE TRIGGER zz_machine_sync")
    conn.execute("DROP TRIGGER machine_state_truncate_alone ON machine_state")
    status = runner(conn).status()
    problems = {(p.kind, p.name, p.problem) for p in status.definition_problems}
    assert problems == {
        ("function", "machine_sync.mode_v1()", "changed"),
        ("trigger", "zz_machine_sync on public.machines", "disabled"),
        ("trigger", "machine_state_truncate_alone on public.machine_state", "missing"),
    }
    assert not status.up_to_date
    assert status.to_json()["definitions"]["restore_command"] == RESTORE_COMMAND
    # The plan, with nothing pending, says so too rather than look all clear.
    for planned in (runner(conn).plan(), runner(conn).apply(dry_run=True)):
        assert planned.steps == []
        assert set(planned.definition_problems) == set(status.definition_problems)
        assert planned.to_json()["definition_problems"][0].keys() == {"kind", "name", "problem"}
    lines: list[str] = []
    runner(conn, echo=lines.append).apply()  # nothing pending: nothing restored, only said
    assert lines[-1].startswith("warning: function machine_sync.mode_v1() was changed")
    assert RESTORE_COMMAND in lines[-1]
    runner(conn).apply(force=True)
    assert runner(conn).status().up_to_date
    assert conn.execute(
        "SELECT tgenabled FROM pg_trigger WHERE tgname = 'zz_machine_sync'"
    ).fetchone() == ("O",)
    assert_consistent(conn)


def test_a_later_migration_does_not_pass_off_a_hand_edit_as_shipped(db, conn, tmp_path):
    folder = copy_migrations(tmp_path)
    runner(conn, folder).apply()
    conn.execute(
        "CREATE OR REPLACE FUNCTION machine_sync.mode_v1() RETURNS text "
        "LANGUAGE sql SET search_path = '' AS $$SELECT 'compat'$$"
    )
    (folder / "29990101000000_comment.sql").write_text(
        "BEGIN;\nCOMMENT ON TABLE public.machines IS 'machines';\nCOMMIT;\n"
    )
    runner(conn, folder).apply()
    assert [(p.name, p.problem) for p in runner(conn, folder).status().definition_problems] == [
        ("machine_sync.mode_v1()", "changed")
    ]


def test_a_view_pointed_at_a_look_alike_function_is_reported(db, conn):
    """The digests leave out oids (a restore changes them) and name what a
    view refers to instead: a look-alike function elsewhere is a change."""
    conn.execute("CREATE SCHEMA evil")
    conn.execute(
        "CREATE FUNCTION evil.canonical_status(raw text) RETURNS text LANGUAGE sql"
        " AS $$SELECT lower(raw)$$"
    )
    definition = conn.execute("SELECT pg_get_viewdef('machine_sync.drift'::regclass)").fetchone()
    assert "machine_sync.canonical_status(" in definition[0]
    conn.execute(
        "CREATE OR REPLACE VIEW machine_sync.drift AS "
        + definition[0].replace("machine_sync.canonical_status(", "evil.canonical_status(")
    )
    assert [(p.kind, p.name, p.problem) for p in runner(conn).status().definition_problems] == [
        ("view", "machine_sync.drift", "changed")
    ]


def test_a_function_added_by_hand_is_reported(db, conn):
    conn.execute(
        "CREATE FUNCTION machine_sync.extra() RETURNS int "
        "LANGUAGE sql SET search_path = '' AS $$SELECT 1$$"
    )
    assert [(p.name, p.problem) for p in runner(conn).status().definition_problems] == [
        ("machine_sync.extra()", "unexpected")
    ]


RELATIONS = """
    SELECT c.oid::regclass::text,
           CASE WHEN c.relnamespace = 'public'::regnamespace
                THEN 'ACCESS EXCLUSIVE' ELSE 'EXCLUSIVE' END
    FROM pg_class AS c
    WHERE c.relkind IN ('r', 'p')
      AND (c.relnamespace::regnamespace::text LIKE 'machine\\_sync%%'
           OR c.oid IN ('public.machines'::regclass, 'public.machine_state'::regclass))"""


def test_status_and_verify_only_look(db, conn):
    """They take nothing stronger than ACCESS SHARE, and replay nothing.

    Another session holds EXCLUSIVE (which conflicts with every lock but ACCESS
    SHARE) on every table of ours, and, while status runs, ACCESS EXCLUSIVE on
    machines and machine_state; with a short lock_timeout, any stronger lock
    (or, for status, any lock on the two tables) fails with 55P03 rather than
    waiting.
    """
    runner(conn).apply()
    conn.execute("ALTER TABLE machines DISABLE TRIGGER zz_machine_sync")
    with db.connect(autocommit=False) as holder:
        relations = holder.execute(RELATIONS).fetchall()
        assert ("machines", "ACCESS EXCLUSIVE") in relations
        for relation, mode in relations:
            holder.execute(f"LOCK TABLE {relation} IN {mode} MODE")
        conn.execute("SET lock_timeout = '2s'")
        status = runner(conn).status()
        holder.rollback()
        # verify reads the baseline's tables (SELECT ... WHERE FALSE): ACCESS SHARE.
        for relation, _ in relations:
            holder.execute(f"LOCK TABLE {relation} IN EXCLUSIVE MODE")
        verified = runner(conn).verify()
        holder.rollback()
    assert [(p.name, p.problem) for p in status.definition_problems] == [
        ("zz_machine_sync on public.machines", "disabled")
    ]
    assert [(v.name, v.ok) for v in verified] == [(SHIPPED[0], True), (SHIPPED[1], False)]
    assert "zz_machine_sync on public.machines: disabled" in verified[1].message


def test_status_locks_only_with_access_share(db, conn, monkeypatch):
    """Seen from inside: every lock status holds while it runs is ACCESS SHARE."""
    runner(conn).apply()
    seen: list[tuple[str, str]] = []
    looked = Runner._definition_problems

    def spy(self: Runner) -> Any:
        found = looked(self)
        seen.extend(
            conn.execute(
                "SELECT relation::regclass::text, mode FROM pg_locks "
                "WHERE pid = pg_backend_pid() AND locktype = 'relation'"
            ).fetchall()
        )
        return found

    monkeypatch.setattr(Runner, "_definition_problems", spy)
    assert runner(conn).status().up_to_date
    assert seen
    assert {mode for _, mode in seen} == {"AccessShareLock"}
    assert not {name for name, _ in seen} & {"machines", "machine_state"}


def test_verify_files_run_with_plain_psql(db, conn):
    verify = migrations_dir() / "verify"
    assert sorted(p.name for p in verify.glob("*.sql")) == SHIPPED
    db.psql(*(verify / name for name in SHIPPED))  # ON_ERROR_STOP: passes when all verify
    conn.execute(
        "CREATE OR REPLACE FUNCTION machine_sync.mode_v1() RETURNS text "
        "LANGUAGE sql SET search_path = '' AS $$SELECT 'compat'$$"
    )
    failed = db.psql(verify / SHIPPED[1], check=False)
    assert failed.returncode != 0
    assert "machine_sync.mode_v1(): changed" in failed.stderr
    conn.execute("ALTER TABLE machines DROP COLUMN virtual_config")
    failed = db.psql(verify / SHIPPED[0], check=False)
    assert failed.returncode != 0
    assert "virtual_config" in failed.stderr


def test_verify_without_a_migration_applied(empty_db):
    with empty_db.connect() as conn:
        results = runner(conn).verify()
        assert [v.ok for v in results] == [False, False]
        assert "machine_sync_installed" in results[1].message


def test_definition_names_do_not_depend_on_search_path(db, conn):
    runner(conn).apply()
    conn.execute("SET search_path = machine_sync")
    assert runner(conn).status().up_to_date


# -- down ---------------------------------------------------------------------


def test_down_then_up_keeps_data_and_catalog(db, conn):
    runner(conn).apply()
    machine_id = add_machine(conn, status="idle")
    catalog_before = snapshot(conn)
    lines: list[str] = []
    assert runner(conn, echo=lines.append).down() == [SHIPPED[-1]]
    assert lines[0] == f"[1/1] revert {SHIPPED[-1]} ..."
    assert conn.execute("SELECT to_regnamespace('machine_sync')").fetchone() == (None,)
    assert [name for name, _ in history(conn)] == SHIPPED[:-1]
    status = runner(conn).status()
    assert [f.state for f in status.files] == [FileState.APPLIED, FileState.PENDING]
    # The revert dropped v1's record with its objects: nothing stale is "dropped".
    assert status.definition_problems == []
    assert not status.definitions_recorded
    assert [v.ok for v in runner(conn).verify()] == [True]
    runner(conn).apply()
    assert snapshot(conn) == catalog_before
    assert conn.execute("SELECT status FROM machines WHERE id = %s", [machine_id]).fetchone() == (
        "idle",
    )
    assert_consistent(conn)


def test_a_revert_with_psql_shows_as_reverted_and_apply_installs_it_again(db, conn):
    runner(conn).apply()
    machine_id = add_machine(conn, status="idle")
    catalog_before = snapshot(conn)
    db.psql(migrations_dir() / "down" / SHIPPED[-1])  # reverted by hand, not by the runner
    status = runner(conn).status()
    assert [f.state for f in status.files] == [FileState.APPLIED, FileState.REVERTED]
    assert not status.up_to_date
    assert status.to_json()["files"][-1]["state"] == "reverted"
    plan = runner(conn).apply()
    assert [(s.migration.name, s.action) for s in plan.steps] == [(SHIPPED[-1], "reinstall")]
    assert snapshot(conn) == catalog_before
    assert runner(conn).status().up_to_date
    assert [v.ok for v in runner(conn).verify()] == [True, True]
    assert conn.execute("SELECT status FROM machines WHERE id = %s", [machine_id]).fetchone() == (
        "idle",
    )
    assert_consistent(conn)


def test_down_everything_on_an_empty_install(empty_db):
    with empty_db.connect() as conn:
        runner(conn).apply()
        assert runner(conn).down(steps=len(SHIPPED)) == SHIPPED[::-1]
        assert history(conn) == []
        assert conn.execute("SELECT to_regclass('public.machines')").fetchone() == (None,)


def test_down_stops_at_a_revert_that_refuses(db, conn):
    runner(conn).apply()
    add_machine(conn, status="idle")
    with pytest.raises(MigrationFailed) as caught:
        runner(conn).down(steps=2)
    assert caught.value.migration == SHIPPED[0]
    assert "hold rows" in str(caught.value)
    assert [name for name, _ in history(conn)] == SHIPPED[:1]  # the v1 revert committed


def test_a_failed_revert_says_what_stood_in_the_way(db, conn):
    """PostgreSQL names what blocks a DROP in its DETAIL: here a publication
    whose column list holds a column the revert drops."""
    runner(conn).apply()
    publication = f"t_pub_{uuid.uuid4().hex[:8]}"
    with db.connect(admin=True) as admin:
        admin.execute(
            f"CREATE PUBLICATION {publication}"
            " FOR TABLE public.machines (id, status, failure_description)"
        )
    try:
        with pytest.raises(MigrationFailed) as caught:
            runner(conn).down()
        assert caught.value.sqlstate == "2BP01"
        assert f"publication {publication} depends on column failure_description" in str(
            caught.value
        )
        # Not PostgreSQL's "Use DROP ... CASCADE": the file is not the user's to edit.
        assert "CASCADE" not in str(caught.value)
        assert "ALTER PUBLICATION" in str(caught.value)
        assert [name for name, _ in history(conn)] == SHIPPED  # rolled back
        assert conn.execute("SELECT to_regnamespace('machine_sync')").fetchone() != (None,)
    finally:
        with db.connect(admin=True) as admin:
            admin.execute(f"DROP PUBLICATION {publication}")


def test_down_dry_run(db, conn):
    runner(conn).apply()
    assert runner(conn).down(dry_run=True) == [SHIPPED[-1]]
    assert [name for name, _ in history(conn)] == SHIPPED


def test_down_refusals(db, conn, tmp_path):
    with pytest.raises(MigrationError, match="nothing to revert"):
        runner(conn).down()
    folder = copy_migrations(tmp_path)
    runner(conn, folder).apply()
    with pytest.raises(InvalidArgument, match="at least 1"):
        runner(conn, folder).down(steps=0)
    with pytest.raises(InvalidArgument, match="only 2 are applied"):
        runner(conn, folder).down(steps=3)
    (folder / "down" / SHIPPED[-1]).unlink()
    with pytest.raises(MigrationsNotFound, match=f"no revert file for .*{SHIPPED[-1]}"):
        runner(conn, folder).down()


# -- failures -----------------------------------------------------------------


def test_a_failing_file_is_rolled_back_and_named(empty_db, tmp_path):
    folder = write_migrations(
        tmp_path,
        {
            "1_good.sql": "BEGIN;\nCREATE TABLE good (id int);\nCOMMIT;\n",
            "2_bad.sql": "BEGIN;\nCREATE TABLE bad (id int);\nSELECT 1 / 0;\nCOMMIT;\n",
        },
    )
    with empty_db.connect() as conn:
        with pytest.raises(MigrationFailed) as caught:
            runner(conn, folder).apply()
        assert caught.value.migration == "2_bad.sql"
        assert "2_bad.sql failed and was rolled back: division by zero" in str(caught.value)
        assert caught.value.sqlstate == "22012"
        assert [name for name, _ in history(conn)] == ["1_good.sql"]
        assert conn.execute("SELECT to_regclass('bad')").fetchone() == (None,)


def test_file_shapes(empty_db, tmp_path):
    folder = write_migrations(
        tmp_path,
        {
            "1_plain.sql": "-- no transaction of its own\nCREATE TABLE plain (id int);\n",
            "2_midway.sql": "CREATE TABLE early (id int);\nCOMMIT;\nCREATE TABLE late (id int);\n",
        },
    )
    with empty_db.connect() as conn:
        with pytest.raises(MigrationError, match=r"2_midway\.sql ends its transaction"):
            runner(conn, folder).apply()
        assert [name for name, _ in history(conn)] == ["1_plain.sql"]
    (folder / "3_open.sql").write_text("BEGIN;\nCREATE TABLE x (id int);\n")
    with pytest.raises(MigrationError, match=r"3_open\.sql opens a transaction"):
        transaction_body("3_open.sql", (folder / "3_open.sql").read_text())


def test_transaction_body_keeps_everything_between_begin_and_commit():
    text = (
        "-- header\n\nbegin;\nSET LOCAL lock_timeout = '5s';\n"
        "DO $$ BEGIN END $$;\nCOMMIT;\n-- end\n"
    )
    assert (
        transaction_body("x.sql", text)
        == "-- header\n\n\nSET LOCAL lock_timeout = '5s';\nDO $$ BEGIN END $$;\n"
    )
    plain = "DO $$ BEGIN PERFORM 1; END $$;\n"
    assert transaction_body("y.sql", plain) == plain


def test_missing_or_empty_migrations_folder(conn, tmp_path):
    with pytest.raises(MigrationsNotFound, match="does not exist"):
        runner(conn, tmp_path / "nowhere").status()
    with pytest.raises(MigrationsNotFound, match="no migrations in"):
        runner(conn, tmp_path).apply()


def test_runner_needs_autocommit(db):
    with db.connect(autocommit=False) as conn, pytest.raises(InvalidArgument, match="autocommit"):
        Runner(conn)


# -- concurrency: the deployers' lock and busy tables ------------------------


GATED = {
    "1_gated.sql": (
        "BEGIN;\nLOCK TABLE gate IN ACCESS EXCLUSIVE MODE;\nINSERT INTO runs VALUES (1);\nCOMMIT;\n"
    )
}


def test_two_runners_at_once_one_waits_or_fails_never_both(empty_db, tmp_path):
    folder = write_migrations(tmp_path, GATED)
    with empty_db.connect() as setup:
        setup.execute("CREATE TABLE gate (); CREATE TABLE runs (n int)")
    outcomes: dict[str, Any] = {}
    waiting_lines: list[str] = []

    def deploy(name: str, **options: Any) -> None:
        with empty_db.connect(application_name=f"deployer {name}") as conn:
            try:
                outcomes[name] = runner(conn, folder, **options).apply()
            except MigrationLocked as exc:
                outcomes[name] = exc

    with empty_db.connect(autocommit=False) as holder:
        holder.execute("LOCK TABLE gate IN ACCESS EXCLUSIVE MODE")  # first deployer stalls
        first = threading.Thread(target=deploy, args=("first",), kwargs={"lock_timeout": "30s"})
        first.start()
        deadline = time.monotonic() + 10
        while holder.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        ).fetchone() != (1,):
            assert time.monotonic() < deadline, "the first runner never took the lock"
            time.sleep(0.01)
        deploy("impatient", lock_wait=0.2)
        patient = threading.Thread(
            target=deploy, args=("patient",), kwargs={"lock_wait": 30, "echo": waiting_lines.append}
        )
        patient.start()
        while not waiting_lines:
            assert time.monotonic() < deadline, "the second runner never waited"
            time.sleep(0.01)
        holder.rollback()  # let the first deployer finish
        first.join()
        patient.join()
    assert isinstance(outcomes["impatient"], MigrationLocked)
    assert "deployer first" in str(outcomes["impatient"])
    assert "gave up after 0.2 s" in str(outcomes["impatient"])
    assert [s.migration.name for s in outcomes["first"].steps] == ["1_gated.sql"]
    assert outcomes["patient"].steps == []  # found it applied once the lock was free
    assert "waiting for the migration lock held by backend pid" in waiting_lines[0]
    with empty_db.connect() as check:
        assert check.execute("SELECT count(*) FROM runs").fetchone() == (1,)


BUSY = {
    "1_busy.sql": (
        "BEGIN;\nSET LOCAL lock_timeout = '50ms';\nLOCK TABLE gate IN SHARE MODE;\n"
        "INSERT INTO runs VALUES (1);\nCOMMIT;\n"
    )
}


def test_a_busy_table_is_retried_then_applied(empty_db, tmp_path):
    folder = write_migrations(tmp_path, BUSY)
    with empty_db.connect() as conn, empty_db.connect(autocommit=False) as holder:
        conn.execute("CREATE TABLE gate (); CREATE TABLE runs (n int)")
        holder.execute("LOCK TABLE gate IN ACCESS EXCLUSIVE MODE")
        lines: list[str] = []

        def echo(line: str) -> None:
            lines.append(line)
            if "a table is busy" in line:
                holder.rollback()  # the long transaction ends during the back-off

        runner(conn, folder, retries=2, retry_delay=0.01, echo=echo).apply()
        assert any("a table is busy" in line and "retry 1/2" in line for line in lines), lines
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (1,)
        assert [name for name, _ in history(conn)] == ["1_busy.sql"]


CROSSED = {
    "1_crossed.sql": (
        "BEGIN;\nLOCK TABLE first_gate IN ACCESS EXCLUSIVE MODE;\n"
        "LOCK TABLE second_gate IN ACCESS EXCLUSIVE MODE;\nINSERT INTO runs VALUES (1);\nCOMMIT;\n"
    )
}


def test_a_file_that_loses_a_deadlock_is_retried_then_applied(empty_db, tmp_path):
    """The server aborts one transaction of a lock cycle (40P01); when that is
    the migration's, it was rolled back whole and is simply run again."""
    folder = write_migrations(tmp_path, CROSSED)
    # Each waiter's deadlock check runs once, deadlock_timeout after its wait
    # began: the migration's late enough (3 s) for the cycle to be closed by
    # then however slow the machine, the other's never first.
    with empty_db.connect(admin=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} SET deadlock_timeout = '3s'").format(
                sql.Identifier(empty_db.name)
            )
        )
    with (
        empty_db.connect() as conn,
        empty_db.connect(admin=True, autocommit=False, options="-c deadlock_timeout=60s") as other,
    ):
        conn.execute("CREATE TABLE first_gate (); CREATE TABLE second_gate ();")
        conn.execute("CREATE TABLE runs (n int)")
        other.execute("LOCK TABLE second_gate IN ACCESS EXCLUSIVE MODE")
        other_pid = other.info.backend_pid

        def close_the_cycle() -> None:
            # Once the migration holds first_gate and waits for second_gate,
            # take first_gate too: the migration waited first, so its own
            # deadlock check finds the cycle and it is the one aborted.
            with empty_db.connect() as watcher:
                wait_for(
                    "the migration waits for second_gate",
                    lambda: (
                        watcher.execute(
                            "SELECT EXISTS (SELECT FROM pg_locks WHERE NOT granted"
                            " AND %s = ANY (pg_blocking_pids(pid)))",
                            [other_pid],
                        ).fetchone()
                        == (True,)
                    ),
                )
            other.execute("LOCK TABLE first_gate IN ACCESS EXCLUSIVE MODE")
            other.rollback()

        closer = threading.Thread(target=close_the_cycle)
        closer.start()
        lines: list[str] = []
        try:
            runner(conn, folder, retries=2, retry_delay=0.01, echo=lines.append).apply()
        finally:
            closer.join()
        assert any("deadlock detected" in line and "retry 1/2" in line for line in lines), lines
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (1,)
        assert [name for name, _ in history(conn)] == ["1_crossed.sql"]


def test_a_table_that_stays_busy_gives_up_cleanly(empty_db, tmp_path):
    folder = write_migrations(tmp_path, BUSY)
    with empty_db.connect() as conn, empty_db.connect(autocommit=False) as holder:
        conn.execute("CREATE TABLE gate (); CREATE TABLE runs (n int)")
        holder.execute("LOCK TABLE gate IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(MigrationFailed) as caught:
            runner(conn, folder, retries=1, retry_delay=0.01).apply()
        assert caught.value.sqlstate == "55P03"
        assert "stayed busy through 2 attempts" in str(caught.value)
        assert caught.value.migration == "1_busy.sql"
        assert history(conn) == []
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)
