"""What Supabase Realtime sees: it decodes the write-ahead log. Through a
logical replication slot (test_decoding), each machines change and its
machine_state mirror arrive in the same transaction, in one commit, and a
rolled-back change emits nothing."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from .workload import LEGACY_PATHS, RPC_CALLS, legacy_params
from machines import add_machine

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

    def transactions(self) -> list[Transaction]:
        """Consume everything decoded so far, grouped by BEGIN ... COMMIT."""
        rows = self.conn.execute(
            "SELECT xid::text::bigint, data FROM pg_logical_slot_get_changes("
            "%s, NULL, NULL, 'include-xids', '1', 'skip-empty-xacts', '1')",
            [self.name],
        ).fetchall()
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


@pytest.fixture
def slot(db: Any) -> Iterator[Slot]:
    name = f"reliability_{uuid.uuid4().hex[:12]}"
    with db.connect() as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [name])
        try:
            yield Slot(conn, name)
        finally:
            # Slots are per cluster and keep WAL forever: never leave one behind.
            conn.execute("SELECT pg_drop_replication_slot(%s)", [name])


def writer(db: Any) -> Conn:
    """A connection whose commits are flushed at once: the test servers run
    with synchronous_commit off, and decoding reads only flushed WAL."""
    conn: Conn = db.connect()
    conn.execute("SET synchronous_commit = on")
    return conn


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
        inserted = add_machine(conn, status="Running")
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
            conn.execute("UPDATE machines SET status = 'error' WHERE id = %s", [aborted])
            conn.execute(LEGACY_PATHS["start"][1][1], legacy_params(aborted))
            raise Abort
    txs = slot.transactions()
    assert len(txs) == 1
    assert_mirrored_together(txs[0], kept, "maintenance")
    assert txs[0].touching(undone) == []
    assert all(tx.touching(m) == [] for tx in txs for m in (failed, aborted))
