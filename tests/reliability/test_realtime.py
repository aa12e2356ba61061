"""What Supabase Realtime sees: it decodes the write-ahead log. Through a
logical replication slot, each machines change and its machine_state mirror
arrive in the same transaction, in one commit, and a rolled-back change emits
nothing. Checked with test_decoding (always there) and, where the server has
it, wal2json (Supabase's own plugin) in both its output formats."""

from __future__ import annotations

import itertools
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from .workload import LEGACY_PATHS, RPC_CALLS, legacy_params
from machines import add_machine, assert_consistent

Conn = psycopg.Connection[Any]

CHANGE = re.compile(r"^table public\.(machines|machine_state): (INSERT|UPDATE|DELETE): (.*)$")
KEY = {
    "machines": re.compile(r"\bid\[uuid\]:'([^']+)'"),
    "machine_state": re.compile(r"\bmachine_id\[uuid\]:'([^']+)'"),
}
STATUS = {
    "machines": re.compile(r"\bstatus\[text\]:'([^']*)'"),
    "machine_state": re.compile(r"\bcurrent_state\[character varying\]:'([^']*)'"),
}


@dataclass
class Change:
    table: str
    op: str
    machine_id: uuid.UUID
    status: str | None  # None for a DELETE (only the key is logged)


@dataclass
class Transaction:
    xid: int
    changes: list[Change] = field(default_factory=list)

    def touching(self, machine_id: uuid.UUID) -> list[Change]:
        return [c for c in self.changes if c.machine_id == machine_id]


@dataclass
class Slot:
    conn: Conn
    name: str
    plugin: str  # test_decoding, wal2json-v2 or wal2json-v1

    def transactions(self) -> list[Transaction]:
        """Consume everything decoded so far, grouped by BEGIN ... COMMIT."""
        if self.plugin == "test_decoding":
            options = ["include-xids", "1", "skip-empty-xacts", "1"]
        else:
            options = ["format-version", self.plugin[-1], "include-xids", "1"]
        rows = self.conn.execute(
            "SELECT xid::text::bigint, data FROM pg_logical_slot_get_changes("
            "%s, NULL, NULL, VARIADIC %s::text[])",
            [self.name, options],
        ).fetchall()
        if self.plugin == "wal2json-v1":
            return wal2json_v1(rows)
        if self.plugin == "wal2json-v2":
            return wal2json_v2(rows)
        return decode_test_decoding(rows)


def decode_test_decoding(rows: list[tuple[int, str]]) -> list[Transaction]:
    out: list[Transaction] = []
    current: Transaction | None = None
    for xid, data in rows:
        if data.startswith("BEGIN"):
            assert current is None, "BEGIN inside an open transaction"
            current = Transaction(xid)
        elif data.startswith("COMMIT"):
            assert current is not None
            assert current.xid == xid
            assert data == f"COMMIT {xid}"
            out.append(current)
            current = None
        else:
            assert current is not None, data
            assert current.xid == xid, data
            match = CHANGE.match(data)
            if match is None:
                continue  # another table
            table, op, columns = match.groups()
            key = KEY[table].search(columns)
            status = STATUS[table].search(columns)
            assert key is not None, data
            current.changes.append(
                Change(table, op, uuid.UUID(key.group(1)), status.group(1) if status else None)
            )
    assert current is None, "a transaction was decoded without its COMMIT"
    return out


TABLES = {"machines": ("id", "status"), "machine_state": ("machine_id", "current_state")}
WAL2JSON_OPS = {"I": "INSERT", "U": "UPDATE", "D": "DELETE"}


def wal2json_change(table: str, op: str, values: dict[str, Any]) -> Change:
    key, status = TABLES[table]
    return Change(table, op, uuid.UUID(values[key]), values.get(status))


def wal2json_v2(rows: list[tuple[int, str]]) -> list[Transaction]:
    """format-version 2: one JSON object per row, B and C around the changes.
    wal2json has no skip-empty-xacts: transactions without changes are dropped."""
    out: list[Transaction] = []
    current: Transaction | None = None
    for xid, data in rows:
        message = json.loads(data)
        action = message["action"]
        if message.get("xid") is not None:
            assert message["xid"] == xid, data
        if action == "B":
            assert current is None, "B inside an open transaction"
            current = Transaction(xid)
        elif action == "C":
            assert current is not None
            assert current.xid == xid
            if current.changes:
                out.append(current)
            current = None
        else:
            assert current is not None, data
            if message.get("schema") != "public" or message.get("table") not in TABLES:
                continue  # another table (or a message)
            assert action in WAL2JSON_OPS, data
            # A DELETE carries only the key (the replica identity).
            columns = message.get("columns") or message.get("identity")
            values = {c["name"]: c["value"] for c in columns}
            current.changes.append(wal2json_change(message["table"], WAL2JSON_OPS[action], values))
    assert current is None, "a transaction was decoded without its commit"
    return out


def wal2json_v1(rows: list[tuple[int, str]]) -> list[Transaction]:
    """format-version 1: one JSON document per transaction."""
    out: list[Transaction] = []
    for xid, data in rows:
        document = json.loads(data)
        assert document["xid"] == xid, data
        tx = Transaction(xid)
        for change in document["change"]:
            if change["schema"] != "public" or change["table"] not in TABLES:
                continue
            if change["kind"] == "delete":
                keys = change["oldkeys"]
                values = dict(zip(keys["keynames"], keys["keyvalues"], strict=True))
            else:
                values = dict(zip(change["columnnames"], change["columnvalues"], strict=True))
            tx.changes.append(wal2json_change(change["table"], change["kind"].upper(), values))
        if tx.changes:
            out.append(tx)
    return out


@pytest.fixture(params=["test_decoding", "wal2json-v2", "wal2json-v1"])
def slot(db: Any, request: pytest.FixtureRequest) -> Iterator[Slot]:
    plugin: str = request.param
    name = f"reliability_{uuid.uuid4().hex[:12]}"
    # Realtime decodes as a role the superuser set up. Where the server
    # approves output plugins by name (output_plugin_libraries, default
    # pgoutput and test_decoding), the superuser approves wal2json for its
    # own session.
    with db.connect(admin=plugin != "test_decoding") as conn:
        if plugin != "test_decoding":
            conn.execute(
                "SELECT set_config(name, setting || ', wal2json', false) FROM pg_settings"
                " WHERE name = 'output_plugin_libraries'"
            )
        try:
            conn.execute(
                "SELECT pg_create_logical_replication_slot(%s, %s)",
                [name, plugin.split("-")[0]],
            )
        except psycopg.errors.UndefinedFile:
            pytest.skip(f"{plugin}: the output plugin is not installed on this server")
        try:
            yield Slot(conn, name, plugin)
        finally:
            # Slots are per cluster and keep WAL forever: never leave one behind.
            conn.execute("SELECT pg_drop_replication_slot(%s)", [name])


def writer(db: Any) -> Conn:
    """A connection whose commits are flushed at once: the test servers run
    with synchronous_commit off, and decoding reads only flushed WAL."""
    conn: Conn = db.connect()
    conn.execute("SET synchronous_commit = on")
    return conn


def machine_status(conn: Conn, machine_id: uuid.UUID) -> str:
    row = conn.execute("SELECT status FROM machines WHERE id = %s", [machine_id]).fetchone()
    assert row is not None
    return str(row[0])


def only_transaction_for(txs: list[Transaction], machine_id: uuid.UUID) -> Transaction:
    matching = [tx for tx in txs if tx.touching(machine_id)]
    assert len(matching) == 1, f"{machine_id} appears in {len(matching)} transactions"
    return matching[0]


def assert_mirrored_together(tx: Transaction, machine_id: uuid.UUID, status: str) -> None:
    """In this one commit: a machines change and a machine_state change, both
    ending at ``status``."""
    changes = tx.touching(machine_id)
    tables = {c.table for c in changes}
    assert tables == {"machines", "machine_state"}, changes
    last = {c.table: c for c in changes}
    assert last["machines"].status == status
    assert last["machine_state"].status == status


def test_every_write_path_commits_both_tables_together(db: Any, slot: Slot) -> None:
    with writer(db) as conn:
        ids = [add_machine(conn, status="idle") for _ in range(8)]
        slot.transactions()  # only what follows counts
        new, legacy_state, rpc, bulk_a, bulk_b, deleted, replaced, upserted = ids
        conn.execute("UPDATE machines SET status = 'maintenance' WHERE id = %s", [new])
        conn.execute(LEGACY_PATHS["error"][0][1], legacy_params(legacy_state, message="leak"))
        conn.execute(RPC_CALLS["processing"], {"m": rpc, "p": uuid.uuid4()})
        conn.execute(
            "UPDATE machines SET status = 'offline' WHERE id = ANY(%s)", [[bulk_a, bulk_b]]
        )
        conn.execute("DELETE FROM machines WHERE id = %s", [deleted])
        conn.execute(
            "INSERT INTO machine_state (machine_id, current_state, failure_description)"
            " VALUES (%s, 'error', 'x') ON CONFLICT (machine_id) DO UPDATE"
            " SET current_state = excluded.current_state,"
            " failure_description = excluded.failure_description",
            [replaced],
        )
        conn.execute(
            "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'maintenance')"
            " ON CONFLICT (machine_id) DO UPDATE SET current_state = excluded.current_state",
            [upserted],
        )
        inserted = add_machine(conn, status="Running", current_process_id=uuid.uuid4())
    txs = slot.transactions()
    assert_mirrored_together(only_transaction_for(txs, new), new, "maintenance")
    assert_mirrored_together(only_transaction_for(txs, legacy_state), legacy_state, "error")
    assert_mirrored_together(only_transaction_for(txs, rpc), rpc, "processing")
    bulk = only_transaction_for(txs, bulk_a)
    assert bulk is only_transaction_for(txs, bulk_b)
    assert_mirrored_together(bulk, bulk_a, "offline")
    assert_mirrored_together(bulk, bulk_b, "offline")
    insert = only_transaction_for(txs, inserted)
    assert_mirrored_together(insert, inserted, "processing")
    assert {c.op for c in insert.changes} == {"INSERT"}
    delete = only_transaction_for(txs, deleted)
    assert sorted((c.table, c.op) for c in delete.changes) == [
        ("machine_state", "DELETE"),
        ("machines", "DELETE"),
    ]
    # Legacy upserts: Realtime sees the state row's change with the machines
    # update, in one commit.
    for machine_id, status in ((replaced, "error"), (upserted, "maintenance")):
        tx = only_transaction_for(txs, machine_id)
        assert_mirrored_together(tx, machine_id, status)
    # Every decoded transaction is one of the writes above: nothing leaked out.
    assert len(txs) == 8


def test_the_state_row_changes_once_per_change_and_not_for_the_clock_alone(
    db: Any, slot: Slot
) -> None:
    """Realtime sees one machine_state change per state change: a status
    change writes the row once; a write that keeps the status writes it only
    where it differs, so the clock alone moves nothing there, and a legacy
    write of the failure text, carried into machines, changes it once."""
    with writer(db) as conn:
        status_change, clock, failure_text = (add_machine(conn, status="idle") for _ in range(3))
        conn.execute(
            "UPDATE machines SET status = 'error', failure_description = 'a' WHERE id = %s",
            [failure_text],
        )
        slot.transactions()  # only what follows counts
        conn.execute("UPDATE machines SET status = 'maintenance' WHERE id = %s", [status_change])
        conn.execute(
            "UPDATE machines SET updated_at = now() - interval '1 day' WHERE id = %s", [clock]
        )
        conn.execute(
            "UPDATE machine_state SET failure_description = 'b' WHERE machine_id = %s",
            [failure_text],
        )
    txs = slot.transactions()

    def tables_changed(machine_id: uuid.UUID) -> list[str]:
        return sorted(c.table for c in only_transaction_for(txs, machine_id).touching(machine_id))

    assert tables_changed(status_change) == ["machine_state", "machines"]
    assert tables_changed(clock) == ["machines"]
    assert tables_changed(failure_text) == ["machine_state", "machines"]
    assert len(txs) == 3


@pytest.mark.parametrize("slot", ["test_decoding"], indirect=True)
@pytest.mark.parametrize(
    "first",
    [
        "INSERT",  # the machine is created in the transaction
        "UPDATE machines SET status = 'maintenance' WHERE id = %s",
        "UPDATE machine_state SET current_state = 'maintenance' WHERE machine_id = %s",
    ],
)
def test_a_legacy_status_change_after_another_in_its_transaction_rewrites_nothing_twice(
    db: Any, slot: Slot, first: str
) -> None:
    """A status change earlier in the transaction leaves the machine's
    status_since at now(): a legacy write of a new status, which keeps the
    machine's since, then writes the state row exactly as the mirror would.
    The mirror must not write it again: a rewrite that changes nothing is
    one more change for Realtime (and for an application's own trigger on
    machine_state) with nothing in it."""
    with writer(db) as conn:
        machine_id = None if first == "INSERT" else add_machine(conn, status="idle")
        slot.transactions()
        with conn.transaction():
            if machine_id is None:
                machine_id = add_machine(conn, status="idle")
            else:
                conn.execute(first, [machine_id])
            conn.execute(
                "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'error')"
                " ON CONFLICT (machine_id) DO UPDATE SET current_state = excluded.current_state",
                [machine_id],
            )
            conn.execute(
                "UPDATE machine_state SET current_state = 'offline' WHERE machine_id = %s",
                [machine_id],
            )
        assert_consistent(conn)
    images = [
        data.split(": ", 2)[2]
        for (data,) in slot.conn.execute(
            "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", [slot.name]
        ).fetchall()
        if data.startswith("table public.machine_state: ")
        and f"machine_id[uuid]:'{machine_id}'" in data
    ]
    assert images[-1].startswith(
        f"machine_id[uuid]:'{machine_id}' current_state[character varying]:'offline'"
    )
    repeated = [i for i, (a, b) in enumerate(itertools.pairwise(images)) if a == b]
    assert repeated == [], f"identical consecutive state-row images at {repeated}: {images}"


def test_rolled_back_changes_emit_nothing(db: Any, slot: Slot) -> None:
    with writer(db) as conn:
        kept, undone, failed, aborted = (add_machine(conn, status="idle") for _ in range(4))
        slot.transactions()
        with conn.transaction():
            conn.execute("UPDATE machines SET status = 'maintenance' WHERE id = %s", [kept])
            # A savepoint whose second statement fails: both are undone.
            with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():  # noqa: PT012
                conn.execute("UPDATE machines SET status = 'error' WHERE id = %s", [undone])
                conn.execute("UPDATE machines SET status = 'bogus' WHERE id = %s", [undone])
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "UPDATE machines SET status = CASE WHEN id = %s THEN 'bogus' ELSE 'error' END"
                " WHERE id = ANY(%s)",
                [failed, [failed, kept]],
            )

        class Abort(Exception):
            pass

        with pytest.raises(Abort), conn.transaction():  # noqa: PT012
            conn.execute("UPDATE machines SET status = 'offline' WHERE id = %s", [aborted])
            conn.execute(LEGACY_PATHS["start"][1][1], legacy_params(aborted))
            assert machine_status(conn, aborted) == "processing"
            raise Abort
    txs = slot.transactions()
    assert len(txs) == 1
    assert_mirrored_together(txs[0], kept, "maintenance")
    assert txs[0].touching(undone) == []
    assert all(tx.touching(m) == [] for tx in txs for m in (failed, aborted))
