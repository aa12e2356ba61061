"""Bad input, through every write path (new UPDATE/INSERT, the legacy
machine_state statements, the legacy RPCs): each value is either refused with
one clear error (SQLSTATE and message checked) that changes nothing at all, or
stored verbatim in both tables."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from .workload import LEGACY_PATHS, RPC_CALLS, legacy_params, snapshot
from machines import add_machine, assert_consistent, machine, state

Conn = psycopg.Connection[Any]

ALLOWED = "error, idle, maintenance, offline, processing"


def refused(
    conn: Conn, statement: str, params: Any, sqlstate: str | None, message: str
) -> psycopg.Error:
    """Run a statement that must fail with ``sqlstate`` (None: refused by the
    driver before anything is sent) and a message containing ``message``; both
    tables must be exactly as before."""
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(statement, params)
    assert caught.value.sqlstate == sqlstate, f"{caught.value!r}"
    assert message in str(caught.value)
    assert snapshot(conn) == before
    assert_consistent(conn)
    return caught.value


BAD_STATUSES = [
    "busy",
    "",
    "   ",
    "idle!",
    "idle; DROP TABLE machines; --",
    "'idle'",
    "ídle",
    "idle\u00a0",  # a no-break space is not whitespace the trim removes
    "💥",
    "x" * 10_000,
    # Folding is ASCII-only, the same in every locale: none of these is a status.
    "\u0130DLE",  # capital I with dot above (Turkish): not folded to 'idle'
    "\u0131dle",  # small dotless i
    "\u0131DLE",
    "idleß",
    "\uff29\uff24\uff2c\uff25",  # full-width IDLE
    "\u00a0idle",  # no-break space
    "\u2003idle",  # em space
    "\u3000idle",  # ideographic space
    "idle\u200b",  # zero-width space
    "\ufeffidle",  # zero-width no-break space (byte order mark)
    "i\u0307dle",  # combining dot above
    "idle\u0301",  # combining acute accent
    "\u1680idle",  # ogham space mark
    "idle\x85",  # next line (C1), not ASCII white space
    # Letters are never trimmed (E'\v' in a trim set is the letter v before PostgreSQL 16).
    "vidle",
    "idlev",
    "vOffline",
]

# ASCII white space and ASCII case are folded on every path.
GOOD_SPELLINGS = [" IDLE", "\tIdle\n", "\r\f\vidle \v", "iDlE", "MAINTENANCE ", " Offline"]

STATUS_PATHS = {
    "update": "UPDATE machines SET status = %(s)s WHERE id = %(m)s",
    "legacy-state": "UPDATE machine_state SET current_state = %(s)s WHERE machine_id = %(m)s",
    "legacy-insert": "INSERT INTO machine_state (machine_id, current_state) VALUES (%(m)s, %(s)s)",
    "rpc": RPC_CALLS["update"],
}


def test_unknown_statuses_are_refused_on_every_path(conn: Conn, subtests: Any) -> None:
    machine_id = add_machine(conn, status="idle")
    for path, statement in STATUS_PATHS.items():
        for bad in BAD_STATUSES:
            with subtests.test(path=path, status=bad[:20]):
                params = {"m": machine_id, "s": bad, "p": None, "f": None, "msg": None}
                if path.startswith("legacy") and len(bad) > 50:
                    # machine_state.current_state is varchar(50): the type refuses it first.
                    refused(conn, statement, params, "22001", "character varying(50)")
                    continue
                err = refused(conn, statement, params, "23514", "invalid machine status")
                assert ALLOWED in str(err)
                assert err.diag.constraint_name == "machines_status_allowed"


def test_ascii_spellings_are_folded_on_every_path(conn: Conn, subtests: Any) -> None:
    machine_id = add_machine(conn, status="offline")
    for path, statement in STATUS_PATHS.items():
        if path == "legacy-insert":
            continue  # a plain INSERT of an existing state row is a unique violation
        for spelling in GOOD_SPELLINGS:
            with subtests.test(path=path, status=spelling):
                expected = spelling.strip(" \t\n\r\f\v").lower()
                params = {"m": machine_id, "s": spelling, "p": None, "f": None, "msg": None}
                conn.execute(statement, params)
                m, s = machine(conn, machine_id), state(conn, machine_id)
                assert m is not None
                assert s is not None
                assert (m["status"], s["current_state"]) == (expected, expected)
                assert_consistent(conn)


def test_error_messages_quote_at_most_40_characters(conn: Conn, subtests: Any) -> None:
    """A huge bad value makes a short message: 40 characters of it and its length."""
    machine_id = add_machine(conn, status="idle")
    for size in (41, 10_000, 1_000_000):
        value = "y" * size
        for path in ("update", "rpc", "insert"):
            with subtests.test(path=path, size=size):
                params = {"m": machine_id, "s": value, "p": None, "f": None, "msg": None}
                if path == "insert":
                    before = snapshot(conn)
                    with pytest.raises(psycopg.errors.CheckViolation) as caught:
                        add_machine(conn, status=value)
                    assert snapshot(conn) == before
                    err: psycopg.Error = caught.value
                else:
                    err = refused(conn, STATUS_PATHS[path], params, "23514", "invalid machine")
                primary = err.diag.message_primary or ""
                assert f"'{'y' * 40}'... ({size} characters)" in primary
                assert "y" * 41 not in str(err)
                assert len(str(err)) < 1_000
    with subtests.test(path="exactly 40"):
        err = refused(
            conn,
            STATUS_PATHS["update"],
            {"m": machine_id, "s": "z" * 40},
            "23514",
            f"invalid machine status '{'z' * 40}':",
        )
        assert "characters)" not in str(err)


def test_null_status_is_refused_where_it_means_a_status(conn: Conn, subtests: Any) -> None:
    machine_id = add_machine(conn, status="idle")
    for path in ("update", "legacy-state", "legacy-insert"):
        with subtests.test(path=path):
            params = {"m": machine_id, "s": None}
            refused(conn, STATUS_PATHS[path], params, "23514", "invalid machine status NULL")
    with subtests.test(path="insert"):
        before = snapshot(conn)
        with pytest.raises(psycopg.errors.CheckViolation, match="invalid machine status NULL"):
            add_machine(conn, status=None)  # type: ignore[arg-type]
        assert snapshot(conn) == before


def test_nul_bytes_are_refused_by_the_driver(conn: Conn, subtests: Any) -> None:
    """PostgreSQL text cannot hold NUL; psycopg refuses before sending."""
    machine_id = add_machine(conn, status="idle")
    nul = "before\x00after"
    cases = {
        "status": (STATUS_PATHS["update"], {"m": machine_id, "s": nul}),
        "failure": (
            "UPDATE machines SET failure_description = %(msg)s WHERE id = %(m)s",
            {"m": machine_id, "msg": nul},
        ),
        "legacy-error": (LEGACY_PATHS["error"][0][1], legacy_params(machine_id, message=nul)),
        "rpc-error": (RPC_CALLS["error"], {"m": machine_id, "msg": nul}),
    }
    for case, (statement, params) in cases.items():
        with subtests.test(case=case):
            refused(conn, statement, params, None, "NUL")


def test_bad_machine_ids(conn: Conn, subtests: Any) -> None:
    machine_id = add_machine(conn, status="idle")
    unknown = uuid.uuid4()
    cases: list[tuple[str, str, Any, str, str]] = [
        (
            "update-malformed",
            "UPDATE machines SET status = 'idle' WHERE id = %s",
            ["not-a-uuid"],
            "22P02",
            "invalid input syntax for type uuid",
        ),
        (
            "insert-malformed",
            "INSERT INTO machines (id, serial_number, location, lab_name, lab_institution,"
            " model, machine_type, install_date, last_maintenance_date, admin_id)"
            " VALUES (%s, 's', 'l', 'n', 'i', 'm', 't', now(), now(), gen_random_uuid())",
            ["12345"],
            "22P02",
            "invalid input syntax for type uuid",
        ),
        (
            "legacy-insert-unknown",
            "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'idle')",
            [unknown],
            "23503",
            "machine_state_machine_id_fkey",
        ),
        (
            "legacy-upsert-unknown",
            "INSERT INTO machine_state (machine_id, current_state, process_id)"
            " VALUES (%s, 'processing', gen_random_uuid()) ON CONFLICT (machine_id)"
            " DO UPDATE SET current_state = excluded.current_state",
            [unknown],
            "23503",
            "machine_state_machine_id_fkey",
        ),
        (
            "legacy-insert-null",
            "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'idle')",
            [None],
            "23502",
            "machine_id",
        ),
        (
            "legacy-upsert-null",
            "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'IDLE')"
            " ON CONFLICT (machine_id) DO NOTHING",
            [None],
            "23502",
            "machine_id",
        ),
        (
            "legacy-state-malformed",
            "UPDATE machine_state SET current_state = 'idle' WHERE machine_id = %s",
            ["00000000-0000-0000-0000-00000000000Z"],
            "22P02",
            "invalid input syntax for type uuid",
        ),
        (
            "rpc-null",
            RPC_CALLS["complete"],
            {"m": None},
            "22004",
            "p_machine_id must not be null",
        ),
        (
            "rpc-malformed",
            RPC_CALLS["complete"],
            {"m": "not-a-uuid"},
            "22P02",
            "invalid input syntax for type uuid",
        ),
        ("rpc-unknown", RPC_CALLS["complete"], {"m": unknown}, "MS004", str(unknown)),
        (
            "rpc-unknown-error",
            RPC_CALLS["error"],
            {"m": unknown, "msg": "x"},
            "MS004",
            "does not exist",
        ),
        (
            "rpc-integer",
            "SELECT atomic_complete_machine_state(p_machine_id => %s)",
            [42],
            "42883",
            "atomic_complete_machine_state",
        ),
        (
            "machine-id-change",
            "UPDATE machines SET id = gen_random_uuid() WHERE id = %s",
            [machine_id],
            "MS003",
            "machines.id cannot change",
        ),
        (
            "state-machine-id-change",
            "UPDATE machine_state SET machine_id = %s WHERE machine_id = %s",
            [unknown, machine_id],
            "MS001",
            "cannot change",
        ),
    ]
    for case, statement, params, sqlstate, message in cases:
        with subtests.test(case=case):
            refused(conn, statement, params, sqlstate, message)
    with subtests.test(case="unknown-machine-updates-nothing"):
        # Plain SQL semantics: no row matches, nothing happens, no error.
        before = snapshot(conn)
        for statement in (
            "UPDATE machines SET status = 'error' WHERE id = %(m)s",
            LEGACY_PATHS["error"][0][1],
        ):
            cur = conn.execute(statement, legacy_params(unknown))
            assert cur.rowcount == 0
        assert snapshot(conn) == before


def test_bad_process_ids(conn: Conn, subtests: Any) -> None:
    machine_id = add_machine(conn, status="idle")
    update = "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s"
    legacy = LEGACY_PATHS["start"][1][1]
    processing = RPC_CALLS["processing"]
    cases: list[tuple[str, str, Any, str, str]] = [
        ("update-integer", update, [42, machine_id], "42804", "is of type uuid"),
        ("update-text", update, ["abc", machine_id], "22P02", "invalid input syntax"),
        ("update-empty", update, ["", machine_id], "22P02", "invalid input syntax"),
        ("legacy-text", legacy, {**legacy_params(machine_id), "p": "abc"}, "22P02", "uuid"),
        ("legacy-integer", legacy, {**legacy_params(machine_id), "p": 7}, "42804", "uuid"),
        ("rpc-integer", processing, {"m": machine_id, "p": 42}, "42883", "does not exist"),
        ("rpc-text", processing, {"m": machine_id, "p": "abc"}, "22P02", "uuid"),
        ("rpc-null", processing, {"m": machine_id, "p": None}, "22004", "p_process_id"),
    ]
    for case, statement, params, sqlstate, message in cases:
        with subtests.test(case=case):
            refused(conn, statement, params, sqlstate, message)
    with subtests.test(case="rpc-contradictory-process-ids"):
        refused(
            conn,
            "SELECT atomic_update_machine_state(p_machine_id => %s, p_current_process_id => %s,"
            " p_machine_state_process_id => %s)",
            [machine_id, uuid.uuid4(), uuid.uuid4()],
            "22023",
            "disagree",
        )
    with subtests.test(case="rpc-contradictory-failure-mode"):
        refused(
            conn,
            "SELECT atomic_update_machine_state(p_machine_id => %s, p_machine_status => 'idle',"
            " p_is_failure_mode => true)",
            [machine_id],
            "22023",
            "contradicts",
        )


HOSTILE = {
    "quotes": 'O\'Reilly said "stop" `now`',
    "sql-fragment": "'); DROP TABLE machines; --",
    "dollar-quoting": "$$; DROP TABLE machine_state; $$ $x$",
    "backslashes": "C:\\temp\\x00 \\' \\\\",
    "placeholders": "%s %(m)s {0} %% $1 ?",
    "emoji": "💥 chamber 🔥 leak 👩‍🔬",
    "rtl-and-combining": "שגיאה \u202e override e\u0301 \u200b zero-width",
    "control-characters": "\t\n\r\x01\x7f line\nbreaks",
    "null-word": "NULL",
    "empty": "",
    "whitespace-only": "   ",
    "one-megabyte": "ALD " * 262_144,
}


def test_hostile_failure_descriptions_are_stored_verbatim(conn: Conn, subtests: Any) -> None:
    machines_before = conn.execute("SELECT count(*) FROM machines").fetchone()
    for case, text in HOSTILE.items():
        paths: dict[str, tuple[str, Any, str]] = {
            "update": (
                "UPDATE machines SET status = 'error', failure_description = %(msg)s"
                " WHERE id = %(m)s",
                {"msg": text},
                text,
            ),
            "legacy-error": (
                LEGACY_PATHS["error"][0][1],
                {"msg": text},
                "Recipe execution error: " + text,
            ),
            "rpc-error": (RPC_CALLS["error"], {"msg": text}, "Recipe execution error: " + text),
            "rpc-update": (
                "SELECT atomic_update_machine_state(p_machine_id => %(m)s,"
                " p_machine_status => 'error', p_failure_description => %(msg)s)",
                {"msg": text},
                text,
            ),
            "legacy-upsert": (
                "INSERT INTO machine_state (machine_id, current_state, failure_description)"
                " VALUES (%(m)s, 'error', %(msg)s) ON CONFLICT (machine_id) DO UPDATE"
                " SET current_state = excluded.current_state,"
                " failure_description = excluded.failure_description",
                {"msg": text},
                text,
            ),
        }
        for path, (statement, params, stored) in paths.items():
            with subtests.test(case=case, path=path):
                machine_id = add_machine(conn, status="processing", current_process_id=uuid.uuid4())
                conn.execute(statement, {**legacy_params(machine_id), **params})
                m, s = machine(conn, machine_id), state(conn, machine_id)
                assert m is not None
                assert s is not None
                assert m["status"] == "error"
                assert s["is_failure_mode"] is True
                assert m["failure_description"] == stored
                assert s["failure_description"] == stored
                assert_consistent(conn)
    # Nothing was executed as SQL: every machine is still there.
    count = conn.execute("SELECT count(*) FROM machines").fetchone()
    assert count is not None
    assert machines_before is not None
    assert count[0] == machines_before[0] + len(HOSTILE) * 5
