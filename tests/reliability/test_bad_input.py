"""Bad input, through every write path (new UPDATE/INSERT, the legacy
machine_state statements, the legacy RPCs): each value is either refused with
one clear error (SQLSTATE and message checked) that changes nothing at all, or
stored verbatim in both tables."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from machine_sync.client import Client
from machine_sync.errors import InvalidArgument, InvalidStatus

from .model import canonical
from .workload import LEGACY_PATHS, RPC_CALLS, legacy_params, snapshot
from conftest import SUPABASE_ROLES, Cluster, Database
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


# ---------------------------------------------------------------------------
# Non-ASCII look-alikes of every status, through every write path, in a C
# database and in one whose collation folds Unicode case.

WORDS = ("idle", "offline", "processing", "error", "maintenance", "running")
UNICODE_SPACES = [
    *"\u00a0\u1680\u180e\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a",
    *"\u2028\u2029\u202f\u205f\u3000\u0085\u200b\u200c\u200d\u2060\ufeff",
]
CONTROLS = [chr(c) for c in (*range(0x01, 0x09), *range(0x0E, 0x20), 0x7F)]
C1_CONTROLS = [chr(c) for c in range(0x80, 0xA0)]
COMBINING = ("\u0301", "\u0307", "\u0308", "\u0338")
FULL_WIDTH = {
    c: chr(ord(c) - 0x20 + 0xFF00) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
}
# Letters whose Unicode case mapping or folding gives an ASCII letter (or
# the other way round): the Turkish dotted capital I and dotless small i, the
# long s (upper case S), the sharp s (upper case SS), the Kelvin sign
# (lower case k), and Cyrillic and Greek look-alikes, which fold to nothing
# ASCII but read the same.
CASE_TRAPS = [
    "\u0130DLE", "\u0131dle", "\u0131DLE", "\u0130dle", "OFFL\u0130NE", "offl\u0131ne",
    "PROCESS\u0130NG", "process\u0131ng", "MA\u0130NTENANCE", "ma\u0131ntenance", "RUNN\u0130NG",
    "runn\u0131ng", "proce\u00dfing", "PROCE\u1e9eING", "proce\u017f\u017fing",
    "PROCE\u017f\u017fING",
    "maintenance\u00df", "PAR\u212aED", "par\u212aed", "\u212aIDLE",
    "\u0456dle", "\u043effline", "\u0435rror", "\u0440rocessing", "m\u0430intenance", "\u03b9dle",
    "\u03bffline", "\u0399DLE", "\u00edle", "\u00f3ffline", "\u00e9rror", "pr\u00f3cessing",
    "\U0001d422\U0001d41d\U0001d425\U0001d41e", "\U0001d408\U0001d403\U0001d40b\U0001d404",
    "o\ufb00line", "o\ufb04ine", "\u24d8dle", "\u026a\u1d05\u029f\u1d07", "\u202eidle",
    "idle\u200e", "\u2066idle\u2069", "idle\ufe0f", "IDLE\u0345",
]  # fmt: skip


def hostile_statuses() -> list[str]:
    """Over 200 distinct values that look like a status to a person or to a
    Unicode-aware lower() and are none: the core folds ASCII only."""
    values: list[str] = []
    for i, space in enumerate(UNICODE_SPACES):
        word = WORDS[i % len(WORDS)]
        values += [space + word, word + space, word.upper() + space]
    for i, control in enumerate(CONTROLS):
        word = WORDS[i % len(WORDS)]
        values += [control + word, word + control]
    values += [WORDS[i % len(WORDS)] + c for i, c in enumerate(C1_CONTROLS)]
    for word in WORDS:
        values += ["".join(FULL_WIDTH[c] for c in text) for text in (word, word.upper())]
        values.append(FULL_WIDTH[word[0].upper()] + word[1:].upper())
        values += [word[0] + mark + word[1:] for mark in COMBINING]
    values += CASE_TRAPS
    distinct = list(dict.fromkeys(values))
    assert all(canonical(value) is None for value in distinct)
    return distinct


HOSTILE_STATUSES = hostile_statuses()

STATUS_WRITES = {
    **STATUS_PATHS,
    "legacy-upsert": "INSERT INTO machine_state (machine_id, current_state) VALUES (%(m)s, %(s)s)"
    " ON CONFLICT (machine_id) DO UPDATE SET current_state = excluded.current_state",
    "insert": "INSERT INTO machines (id, serial_number, location, lab_name, lab_institution,"
    " model, machine_type, install_date, last_maintenance_date, admin_id, status)"
    " VALUES (gen_random_uuid(), 'SN', 'Bay', 'Lab', 'Inst', 'S200', 'ALD', now(), now(),"
    " gen_random_uuid(), %(s)s)",
}


def refused_everywhere(conn: Conn, machine_id: uuid.UUID, value: str) -> None:
    """``value`` as a status on every write path (the new UPDATE, the
    client, the legacy machine_state writes in compat, INSERT, the RPC):
    refused as an unknown status, nothing written, no drift."""
    params = {"m": machine_id, "s": value, "p": None, "f": None, "msg": None}
    for path, statement in STATUS_WRITES.items():
        if path.startswith("legacy") and len(value) > 50:
            refused(conn, statement, params, "22001", "character varying(50)")
            continue
        err = refused(conn, statement, params, "23514", "invalid machine status")
        assert err.diag.constraint_name == "machines_status_allowed", path
        assert "error, idle, maintenance, offline, parked, processing" in str(err)
    before = snapshot(conn)
    with pytest.raises(InvalidStatus) as caught:
        Client(conn).set_status(machine_id, value)
    assert caught.value.sqlstate == "23514"
    assert "invalid machine status" in str(caught.value)
    assert snapshot(conn) == before
    assert_consistent(conn)


def check_hostile_statuses(conn: Conn, subtests: Any) -> None:
    conn.execute("SELECT machine_sync.set_mode_v1('compat')")
    # A status with a k, so that the Kelvin sign has something to pass for.
    conn.execute("INSERT INTO machine_sync.allowed_status VALUES ('parked', 'Parked.')")
    conn.execute(
        "INSERT INTO machine_sync.allowed_transition VALUES ('idle', 'parked'), ('parked', 'idle')"
    )
    machine_id = add_machine(conn, status="idle")
    for value in HOSTILE_STATUSES:
        with subtests.test(status=ascii(value)):
            refused_everywhere(conn, machine_id, value)
    # ASCII case and white space are folded, whatever the database's locale.
    for spelling, expected in (("PARKED", "parked"), ("\tIDLE ", "idle"), ("IDLE", "idle")):
        with subtests.test(status=spelling):
            Client(conn).set_status(machine_id, spelling)
            assert machine(conn, machine_id)["status"] == expected  # type: ignore[index]
            assert_consistent(conn)


def test_unicode_look_alikes_are_refused_on_every_path(conn: Conn, subtests: Any) -> None:
    check_hostile_statuses(conn, subtests)


@pytest.fixture
def unicode_db(cluster: Cluster) -> Iterator[Database]:
    """A migrated database whose default collation maps Unicode case: ICU's
    Turkish (where lower('I') is a dotless i) where the server has ICU, else
    PostgreSQL 18's builtin PG_UNICODE_FAST (full Unicode case mapping).
    Without either (a PostgreSQL 17 or older without ICU) the test fails:
    it must not pass without having run."""
    with psycopg.connect(cluster.server.dsn, autocommit=True) as admin:
        has_icu = admin.execute(
            # initdb imports ICU's locales only where the server has ICU.
            "SELECT count(*) > 0 FROM pg_collation WHERE collname = 'tr-TR-x-icu'"
        ).fetchone() == (True,)
        version = admin.info.server_version // 10000
        if has_icu:
            locale = "LOCALE_PROVIDER icu ICU_LOCALE 'tr-TR' LOCALE 'C.UTF-8'"
        else:
            assert version >= 18, "no ICU and no builtin Unicode collation on this server"
            locale = "LOCALE_PROVIDER builtin BUILTIN_LOCALE 'PG_UNICODE_FAST' LOCALE 'C.UTF-8'"
        name = f"t_{uuid.uuid4().hex[:16]}"
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' " + locale).format(
                sql.Identifier(name)
            )
        )
    db = Database(cluster, name)
    try:
        db.psql(SUPABASE_ROLES, admin=True)
        with db.connect(admin=True) as admin:
            admin.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                    sql.Identifier(name), sql.Identifier(cluster.owner)
                )
            )
        db.migrate()
        yield db
    finally:
        cluster.drop(db)


def test_unicode_look_alikes_are_refused_under_a_unicode_collation(
    unicode_db: Database, subtests: Any
) -> None:
    """The same inputs, the same refusals, in a database whose lower() and
    upper() know Unicode (and, in Turkish, lower-case I to a dotless i):
    normalization does not follow the database's locale."""
    with unicode_db.connect() as conn:
        # The collation really is not C: it maps non-ASCII case.
        assert conn.execute("SELECT lower('\u00c0\u0130')").fetchone() != ("\u00c0\u0130",)
        check_hostile_statuses(conn, subtests)


def test_nul_and_bad_ids_get_a_clear_client_error(conn: Conn, subtests: Any) -> None:
    """The client refuses, before sending, what PostgreSQL cannot take or
    what is no UUID, and the database what is no mode, with a short
    InvalidArgument naming the argument."""
    machine_id = add_machine(conn, status="idle")
    client = Client(conn)
    calls: dict[str, tuple[Callable[[], object], str]] = {
        "status-nul": (lambda: client.set_status(machine_id, "idle\x00"), "status"),
        "message-nul": (lambda: client.fail_process(machine_id, "leak\x00 valve"), "message"),
        "message-1mb-nul": (
            lambda: client.fail_process(machine_id, "x" * 2**20 + "\x00"),
            "message",
        ),
        "mode-nul": (lambda: client.set_mode("strict\x00"), "mode"),
        "mode-1mb": (lambda: client.set_mode("s" * 2**20), "mode"),
        "mode-1mb-nul": (lambda: client.set_mode("s" * 2**20 + "\x00"), "mode"),
        "mode-not-text": (lambda: client.set_mode(b"strict" * 2**17), "mode"),  # type: ignore[arg-type]
    }
    bad_ids: list[Any] = ["not-a-uuid", "", "12345", 42, 4.2, None, b"\x00" * 16, ["a"], "\x00"]
    bad_ids += ["00000000-0000-0000-0000-00000000000Z", "\u0660" * 32, str(machine_id) + " "]
    for n, bad in enumerate(bad_ids):
        calls[f"machine-id-{n}"] = (lambda bad=bad: client.set_status(bad, "idle"), "machine_id")
        calls[f"process-id-{n}"] = (
            lambda bad=bad: client.start_process(machine_id, bad),
            "process_id",
        )
    for case, (call, argument) in calls.items():
        with subtests.test(case=case):
            before = snapshot(conn)
            with pytest.raises(InvalidArgument) as caught:
                call()
            assert argument in str(caught.value)
            assert len(str(caught.value)) < 300
            assert snapshot(conn) == before
            assert_consistent(conn)


def test_one_megabyte_values_through_the_client(conn: Conn) -> None:
    """A 1 MB status is refused with a short message; a 1 MB failure
    message is stored verbatim in both tables."""
    machine_id = add_machine(conn, status="idle")
    before = snapshot(conn)
    with pytest.raises(InvalidStatus) as caught:
        Client(conn).set_status(machine_id, "y" * 2**20)
    assert f"'{'y' * 40}'... ({2**20} characters)" in str(caught.value)
    assert len(str(caught.value)) < 1_000
    assert snapshot(conn) == before
    text = "valve \u00df\u0130 " * (2**20 // 9)
    written = Client(conn).fail_process(machine_id, text)
    assert written.failure_description == text
    assert state(conn, machine_id)["failure_description"] == text  # type: ignore[index]
    assert_consistent(conn)
