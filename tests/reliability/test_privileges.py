"""Privileges, with Supabase's roles (anon, authenticated, service_role) and
Row Level Security on machine_state: who may write what, and whether a caller
can hijack the SECURITY DEFINER functions with its own search_path."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from .workload import RPC_CALLS, snapshot
from conftest import SUPABASE_LINTS
from machines import add_machine, assert_consistent, machine, state

Conn = psycopg.Connection[Any]
CLIENT_ROLES = ("anon", "authenticated", "service_role")


def as_role(conn: Conn, role: str, statement: str | sql.Composed, params: Any = None) -> Any:
    """Run one statement as ``role`` in its own transaction; roll back on error."""
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
        return conn.execute(statement, params)


def refused_as(conn: Conn, role: str, statement: str, params: Any, sqlstate: str) -> None:
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        as_role(conn, role, statement, params)
    assert caught.value.sqlstate == sqlstate, f"{role}: {caught.value!r}"
    assert snapshot(conn) == before


def test_supabase_linter_finds_nothing(conn: Conn) -> None:
    assert conn.execute(SUPABASE_LINTS.read_text()).fetchall() == []


# What a project adds once it decides who may write machines (a fresh
# install has RLS on machines and no policy).
STAFF_POLICY = (
    "CREATE POLICY lab_staff ON public.machines FOR ALL TO authenticated"
    " USING (true) WITH CHECK (true)"
)


def test_roles_that_may_write_machines_are_mirrored(conn: Conn, subtests: Any) -> None:
    """authenticated (through a project policy) and service_role (BYPASSRLS)
    write machines; neither may write machine_state, which has RLS on and no
    policy; every write still lands in both tables."""
    assert conn.execute(
        "SELECT relrowsecurity FROM pg_class WHERE oid = 'machine_state'::regclass"
    ).fetchone() == (True,)
    conn.execute(STAFF_POLICY)
    for role in ("authenticated", "service_role"):
        with subtests.test(role=role):
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
                machine_id = add_machine(conn, status="Idle")
                conn.execute(
                    "UPDATE machines SET status = 'error', failure_description = 'x' WHERE id = %s",
                    [machine_id],
                )
            assert state(conn, machine_id)["current_state"] == "error"
            assert state(conn, machine_id)["failure_description"] == "x"
            # Leaving error clears the failure; a process starts from idle.
            as_role(conn, role, RPC_CALLS["complete"], {"m": machine_id})
            assert state(conn, machine_id)["failure_description"] is None
            process = uuid.uuid4()
            as_role(conn, role, RPC_CALLS["processing"], {"m": machine_id, "p": process})
            assert state(conn, machine_id)["process_id"] == process
            assert state(conn, machine_id)["current_state"] == "processing"
            # The cascade runs as the table owner: no DELETE grant on machine_state needed.
            as_role(conn, role, "DELETE FROM machines WHERE id = %s", [machine_id])
            assert state(conn, machine_id) is None
            assert_consistent(conn)


def test_roles_that_may_not_write_machines_change_nothing(conn: Conn, subtests: Any) -> None:
    machine_id = add_machine(conn, status="idle")
    update = "UPDATE machines SET status = 'error' WHERE id = %s"
    for role, statement, sqlstate in (
        ("anon", update, "42501"),
        ("anon", RPC_CALLS["complete"], "42501"),
        ("anon", "DELETE FROM machines WHERE id = %s", "42501"),
    ):
        with subtests.test(role=role, statement=statement.split()[0]):
            params = {"m": machine_id} if "%(m)s" in statement else [machine_id]
            refused_as(conn, role, statement, params, sqlstate)
    with subtests.test(role="authenticated", policy=None):
        # RLS with no policy: the row is invisible, so nothing matches.
        before = snapshot(conn)
        assert as_role(conn, "authenticated", update, [machine_id]).rowcount == 0
        refused_as(conn, "authenticated", RPC_CALLS["complete"], {"m": machine_id}, "MS004")
        with conn.transaction():
            conn.execute("SET LOCAL ROLE authenticated")
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                add_machine(conn, status="idle")
        assert snapshot(conn) == before
    assert_consistent(conn)


@pytest.mark.parametrize("mode", ["compat", "strict"])
def test_direct_writes_to_machine_state_by_role(conn: Conn, subtests: Any, mode: str) -> None:
    machine_id = add_machine(conn, status="idle")
    conn.execute("SELECT machine_sync.set_mode_v1(%s)", [mode])
    update = "UPDATE machine_state SET current_state = 'maintenance' WHERE machine_id = %s"
    insert = (
        "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'maintenance')"
        " ON CONFLICT (machine_id) DO UPDATE SET current_state = excluded.current_state"
    )
    delete = "DELETE FROM machine_state WHERE machine_id = %s"
    truncate = "TRUNCATE machine_state"
    # anon only reads; no API role deletes or truncates machine_state.
    refusals = [("anon", statement, "42501") for statement in (update, insert)]
    for role in CLIENT_ROLES:
        refusals += [(role, delete, "42501"), (role, truncate, "42501")]
    # authenticated keeps its grants, but machine_state has RLS and no policy
    # for it: its upsert is refused (the guard answers first in strict) ...
    refusals.append(("authenticated", insert, "MS001" if mode == "strict" else "42501"))
    for role, statement, sqlstate in refusals:
        with subtests.test(role=role, statement=statement.split()[0]):
            params = [] if statement is truncate else [machine_id]
            refused_as(conn, role, statement, params, sqlstate)
    with subtests.test(role="authenticated", statement="UPDATE"):
        # ... and its UPDATE sees no row, so it changes nothing.
        before = snapshot(conn)
        assert as_role(conn, "authenticated", update, [machine_id]).rowcount == 0
        assert snapshot(conn) == before
    for statement in (update, insert):
        with subtests.test(role="service_role", statement=statement.split()[0]):
            if mode == "strict":
                refused_as(conn, "service_role", statement, [machine_id], "MS001")
            else:
                as_role(conn, "service_role", statement, [machine_id])
                assert machine(conn, machine_id)["status"] == "maintenance"
                conn.execute("UPDATE machines SET status = 'idle' WHERE id = %s", [machine_id])
            assert_consistent(conn)


def test_client_roles_cannot_switch_mode_reconcile_or_bypass(conn: Conn, subtests: Any) -> None:
    add_machine(conn, status="idle")
    attempts = {
        "set_mode": "SELECT machine_sync.set_mode_v1('strict')",
        "reconcile": "SELECT * FROM machine_sync.reconcile_v1()",
        "drift": "SELECT * FROM machine_sync.drift",
        "settings": "UPDATE machine_sync.settings SET mode = 'strict' WHERE singleton",
        "vocabulary": "INSERT INTO machine_sync.allowed_status VALUES ('hacked', 'x')",
        "transitions": "INSERT INTO machine_sync.allowed_transition VALUES ('error', 'processing')",
        "replica": "SET LOCAL session_replication_role = replica",
        "disable-trigger": "ALTER TABLE machines DISABLE TRIGGER zz_machine_sync",
        "drop-trigger": "DROP TRIGGER zz_machine_sync ON machines",
        "disable-guard": "ALTER TABLE machine_state DISABLE TRIGGER machine_state_direct_write",
        "truncate": "TRUNCATE machines CASCADE",
        "mirror-function": "SELECT machine_sync.machines_sync()",
    }
    for role in ("anon", "authenticated"):
        for name, statement in attempts.items():
            with subtests.test(role=role, attempt=name):
                refused_as(conn, role, statement, None, "42501")
    service_refused = (
        "replica",
        "disable-trigger",
        "drop-trigger",
        "disable-guard",
        "vocabulary",
        "transitions",
        "truncate",
        "mirror-function",
    )
    for name in service_refused:
        with subtests.test(role="service_role", attempt=name):
            refused_as(conn, "service_role", attempts[name], None, "42501")
    assert conn.execute("SELECT machine_sync.mode_v1()").fetchone() == ("compat",)
    with subtests.test(role="service_role", attempt="its own tools"):
        # service_role switches the mode (set_mode or its UPDATE(mode) grant),
        # reads drift and reconciles.
        assert as_role(conn, "service_role", attempts["set_mode"]).fetchall() == [("strict",)]
        as_role(
            conn, "service_role", "UPDATE machine_sync.settings SET mode = 'compat' WHERE singleton"
        )
        assert conn.execute("SELECT machine_sync.mode_v1()").fetchone() == ("compat",)
        assert as_role(conn, "service_role", attempts["drift"]).fetchall() == []
        assert as_role(conn, "service_role", attempts["reconcile"]).fetchall() == []
    assert_consistent(conn)


def test_client_roles_cannot_attach_triggers_to_machines(db: Any) -> None:
    with db.connect() as attacker, db.connect() as victim:
        machine_id = add_machine(victim, status="idle")
        attacker.execute("SET ROLE authenticated")
        attacker.execute(
            "CREATE FUNCTION pg_temp.spy() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE NOTICE 'spy runs as %', current_user; RETURN NEW; END $$"
        )
        notices: list[str] = []
        victim.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        try:
            attacker.execute(
                "CREATE TRIGGER a_spy BEFORE UPDATE ON public.machines"
                " FOR EACH ROW EXECUTE FUNCTION pg_temp.spy()"
            )
        except psycopg.errors.InsufficientPrivilege:
            return  # the fixed behaviour
        finally:
            victim.execute("UPDATE machines SET status = 'maintenance' WHERE id = %s", [machine_id])
        pytest.fail(f"authenticated attached a trigger to machines; it ran: {notices}")


# ---------------------------------------------------------------------------
# A hostile search_path.

EVIL = """
CREATE SCHEMA evil;
CREATE TABLE evil.calls (fn text, role text, depth int);
GRANT USAGE ON SCHEMA evil TO PUBLIC;
GRANT INSERT, SELECT ON evil.calls TO PUBLIC;
-- Look-alikes of everything the product's functions use, each logging that it ran.
CREATE TABLE evil.machines (LIKE public.machines);
CREATE TABLE evil.machine_state (LIKE public.machine_state);
GRANT ALL ON evil.machines, evil.machine_state TO PUBLIC;
CREATE FUNCTION evil.log(fn text) RETURNS void LANGUAGE sql AS $$
    INSERT INTO evil.calls VALUES (fn, current_user, pg_catalog.pg_trigger_depth())
$$;
CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.log('now'); RETURN '1999-01-01'; END $$;
CREATE FUNCTION evil.lower(text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.log('lower'); RETURN 'maintenance'; END $$;
CREATE FUNCTION evil.btrim(text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.log('btrim'); RETURN 'maintenance'; END $$;
CREATE FUNCTION evil.btrim(text, text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.log('btrim2'); RETURN 'maintenance'; END $$;
CREATE FUNCTION evil.quote_literal(text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.log('quote_literal'); RETURN 'x'; END $$;
CREATE FUNCTION evil.current_setting(text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.log('current_setting'); RETURN 'origin'; END $$;
CREATE FUNCTION evil.to_json(anyelement) RETURNS json LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.log('to_json'); RETURN '{}'; END $$;
CREATE FUNCTION evil.text_eq(text, text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.log('text ='); RETURN true; END $$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.text_eq);
CREATE FUNCTION evil.text_ne(text, text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.log('text <>'); RETURN false; END $$;
CREATE OPERATOR evil.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.text_ne);
CREATE FUNCTION evil.uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN PERFORM evil.log('uuid ='); RETURN true; END $$;
CREATE OPERATOR evil.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = evil.uuid_eq);
"""

# The caller's own statements name pg_catalog's operator explicitly, so any
# logged call can only come from inside the product's functions.
EQ = "OPERATOR(pg_catalog.=)"


@pytest.fixture
def evil(db: Any) -> Iterator[Conn]:
    with db.connect() as conn:
        conn.execute(EVIL)
        conn.execute(STAFF_POLICY)
        yield conn


def test_hostile_search_path_cannot_hijack_the_functions(evil: Conn, subtests: Any) -> None:
    conn = evil
    machine_id = add_machine(conn, status="idle")
    path = "SET LOCAL search_path = evil, pg_temp, pg_catalog, public"
    hostile = {
        ("authenticated", "update"): (
            "UPDATE public.machines SET status = ' Processing ', current_process_id = %s"
            f" WHERE id {EQ} %s",
            [uuid.uuid4(), machine_id],
        ),
        ("authenticated", "rpc"): (
            "SELECT public.atomic_update_machine_state(p_machine_id => %s,"
            " p_machine_status => 'ERROR', p_failure_description => 'evil?')",
            [machine_id],
        ),
        ("service_role", "legacy-state"): (
            "UPDATE public.machine_state SET current_state = 'Maintenance', process_id = NULL"
            f" WHERE machine_id {EQ} %s",
            [machine_id],
        ),
        ("service_role", "legacy-insert"): (
            "INSERT INTO public.machine_state (machine_id, current_state) VALUES (%s, 'IDLE')"
            " ON CONFLICT (machine_id) DO UPDATE SET current_state = excluded.current_state",
            [machine_id],
        ),
        ("service_role", "set_mode"): ("SELECT machine_sync.set_mode_v1(' Compat ')", None),
        ("service_role", "reconcile"): ("SELECT * FROM machine_sync.reconcile_v1()", None),
        ("service_role", "drift"): ("SELECT count(*) FROM machine_sync.drift", None),
    }
    expected_status = {
        "update": "processing",
        "rpc": "error",
        "legacy-state": "maintenance",
        "legacy-insert": "idle",
    }
    for (role, name), (statement, params) in hostile.items():
        with subtests.test(role=role, statement=name):
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
                conn.execute(path)
                # A temporary look-alike too: pg_temp comes first for tables.
                conn.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS machine_state"
                    " (LIKE public.machine_state) ON COMMIT DROP"
                )
                cur = conn.execute(statement, params)
                result = cur.fetchall() if cur.description is not None else None
            if name in expected_status:
                assert machine(conn, machine_id)["status"] == expected_status[name]
            if name == "rpc":
                assert result is not None
                assert result[0][0]["success"] is True
            if name == "set_mode":
                assert result == [("compat",)]
            if name == "reconcile":
                assert result == []
            if name == "drift":
                assert result == [(0,)]
            assert conn.execute("SELECT * FROM evil.calls").fetchall() == []
            row = machine(conn, machine_id)
            assert row is not None
            assert row["updated_at"].year > 2020
            assert state(conn, machine_id)["state_since"].year > 2020
            assert conn.execute("SELECT count(*) FROM evil.machine_state").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM evil.machines").fetchone() == (0,)
            assert_consistent(conn)
    # The trap is armed: the same path does hijack an unpinned caller.
    with conn.transaction():
        conn.execute("SET LOCAL ROLE authenticated")
        conn.execute(path)
        assert conn.execute("SELECT lower('X') = 'y', now() < '2000-01-01'").fetchone() == (
            True,
            True,
        )
    assert {fn for (fn, _role, _depth) in conn.execute("SELECT * FROM evil.calls")} == {
        "lower",
        "now",
        "text =",
    }


def test_hostile_search_path_during_reconcile_repairs_real_drift(db: Any, evil: Conn) -> None:
    conn = evil
    machine_id = add_machine(conn, status="idle")
    with db.connect(admin=True) as admin, admin.transaction():
        # A data-only restore's way of bypassing the triggers (superuser only).
        admin.execute("SET LOCAL session_replication_role = replica")
        admin.execute("UPDATE machines SET status = 'IDLE ' WHERE id = %s", [machine_id])
        admin.execute("DELETE FROM machine_state WHERE machine_id = %s", [machine_id])
    with conn.transaction():
        conn.execute("SET LOCAL ROLE service_role")
        conn.execute("SET LOCAL search_path = evil, pg_catalog, public")
        repaired = conn.execute(
            "SELECT machine_id, problem, repaired, reason FROM machine_sync.reconcile_v1()"
        ).fetchall()
    assert repaired == [(machine_id, "missing_state", True, None)]
    assert machine(conn, machine_id)["status"] == "idle"
    assert conn.execute("SELECT * FROM evil.calls").fetchall() == []
    assert_consistent(conn)


# ---------------------------------------------------------------------------
# The catalog: v2's triggers and grants, as the database reports them.

V2_TRIGGERS = {
    # name: (table, function, SECURITY DEFINER)
    "zz_machine_sync": ("machines", "machines_sync", True),
    "zz_machine_sync_insert": ("machines", "machines_sync", True),
    "zz_machine_sync_insert_state": ("machines", "machines_sync", True),
    "zz_machine_sync_applied": ("machines", "machines_sync", True),
    "machine_state_direct_write": ("machine_state", "machine_state_direct_write", False),
    "machine_state_carry_update": ("machine_state", "machine_state_carry_to_machines", False),
    "machine_state_carry_insert": ("machine_state", "machine_state_carry_to_machines", False),
    "machine_state_direct_delete": ("machine_state", "machine_state_direct_delete", True),
    "machine_state_truncate_alone": ("machine_state", "machine_state_after_truncate", True),
}


def test_the_v2_triggers_and_who_their_functions_run_as(conn: Conn) -> None:
    found = {
        name: (table, function, definer, owner)
        for name, table, function, definer, owner in conn.execute(
            "SELECT t.tgname, c.relname, p.proname, p.prosecdef, pg_get_userbyid(p.proowner)"
            " FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE c.oid IN ('public.machines'::regclass, 'public.machine_state'::regclass)"
            " AND NOT t.tgisinternal"
        )
    }
    assert {name: row[:3] for name, row in found.items()} == V2_TRIGGERS
    # The mirror's marker is its role: only the mirror function runs as it.
    mirror = conn.execute("SELECT machine_sync.mirror_role()").fetchone()
    assert mirror is not None
    assert {name for name, row in found.items() if row[3] == mirror[0]} == {
        "zz_machine_sync",
        "zz_machine_sync_insert",
        "zz_machine_sync_insert_state",
        "zz_machine_sync_applied",
    }
    # Every trigger is enabled (origin and local), but the one for rows a
    # logical replication subscriber applies, which a subscriber turns on.
    assert conn.execute(
        "SELECT tgname, tgenabled FROM pg_trigger WHERE tgname = ANY(%s) AND tgenabled <> 'O'",
        [list(V2_TRIGGERS)],
    ).fetchall() == [("zz_machine_sync_applied", "D")]


def test_the_v2_grants(conn: Conn, subtests: Any) -> None:
    privileges = ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"]
    version = conn.execute("SHOW server_version_num").fetchone()
    assert version is not None
    if int(version[0]) >= 170000:
        privileges.append("MAINTAIN")
    found = conn.execute("SELECT machine_sync.mirror_role()").fetchone()
    assert found is not None
    mirror = found[0]
    expected = {
        ("anon", "machines"): {"SELECT"},
        ("anon", "machine_state"): {"SELECT"},
        ("authenticated", "machines"): {"SELECT", "INSERT", "UPDATE", "DELETE"},
        ("authenticated", "machine_state"): {"SELECT", "INSERT", "UPDATE"},
        ("service_role", "machines"): {"SELECT", "INSERT", "UPDATE", "DELETE"},
        ("service_role", "machine_state"): {"SELECT", "INSERT", "UPDATE"},
        (mirror, "machines"): set(),  # it reads machines through stored_machine()
        (mirror, "machine_state"): {"SELECT", "INSERT", "UPDATE", "DELETE"},
    }
    for (role, table), allowed in expected.items():
        with subtests.test(role=role, table=table):
            held = {
                privilege
                for privilege in privileges
                if conn.execute(
                    "SELECT has_table_privilege(%s, %s, %s)", [role, f"public.{table}", privilege]
                ).fetchone()
                == (True,)
            }
            assert held == allowed
    functions = {
        "machine_sync.machines_sync()": set(),
        "machine_sync.machine_state_direct_write()": set(),
        "machine_sync.machine_state_carry_to_machines()": set(),
        "machine_sync.machine_state_direct_delete()": set(),
        "machine_sync.stored_machine(uuid)": set(),  # the mirror's alone
        "machine_sync.reconcile_v1()": {"service_role"},
        "machine_sync.set_mode_v1(text)": {"service_role"},
        "machine_sync.mode_v1()": set(CLIENT_ROLES),
        "machine_sync.lock_machine(uuid, text)": set(CLIENT_ROLES),
        "public.atomic_complete_machine_state(uuid)": {"authenticated", "service_role"},
    }
    for function, callers in functions.items():
        with subtests.test(function=function):
            may = {
                role
                for role in CLIENT_ROLES
                if conn.execute(
                    "SELECT has_function_privilege(%s, %s, 'EXECUTE')", [role, function]
                ).fetchone()
                == (True,)
            }
            assert may == callers
