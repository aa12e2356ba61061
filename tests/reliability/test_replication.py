"""Logical replication of a migrated database to a subscriber that has the
migrated schema too (MIGRATING.md, "Replicas").

* A subscriber of both tables takes every row as the publisher wrote it: its
  apply worker runs with session_replication_role = replica, so neither the
  mirror nor the guard fires there; nothing is mirrored twice and nothing is
  refused, even in strict mode.
* A subscriber of machines alone keeps its own machine_state with the
  trigger zz_machine_sync_applied enabled for replica mode: applied rows are
  mirrored as the publisher wrote them (no rule checked again, no clock
  reset), an applied delete takes its state row though the foreign key's
  cascade does not fire in replica mode, and local writes still go through
  the rules.

Publisher and subscriber are two databases of one server: the slot is made
on the publisher first and the subscription takes it (create_slot = false),
which is what a subscription to the same server needs. Catch-up is awaited
by the publisher's view of the subscriber's confirmed position.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from .workload import LEGACY_PATHS, RPC_CALLS, legacy_params
from conftest import Cluster, Database
from machines import add_machine, assert_consistent, start

Conn = psycopg.Connection[Any]

TABLES = ("public.machines", "public.machine_state")


def rows(conn: Conn, table: str) -> list[tuple[Any, ...]]:
    """Every column of every row, the timestamps included."""
    return conn.execute(sql.SQL("SELECT * FROM {} ORDER BY 1").format(sql.SQL(table))).fetchall()


class Subscription:
    """A publication on ``pub``, its slot, and a subscription on ``sub``."""

    def __init__(self, pub: Database, sub: Database, tables: tuple[str, ...]) -> None:
        self.pub, self.sub = pub, sub
        self.name = f"ms_{uuid.uuid4().hex[:12]}"
        name = sql.Identifier(self.name)
        with pub.connect() as owner:
            owner.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    name, sql.SQL(", ").join(map(sql.SQL, tables))
                )
            )
            owner.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [self.name])
        with sub.connect(admin=True) as admin:
            admin.execute(
                sql.SQL(
                    "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {}"
                    " WITH (create_slot = false, slot_name = {})"
                ).format(name, sql.Literal(pub.dsn), name, sql.Literal(self.name))
            )
        self.wait_for_initial_copy()

    def wait_for_initial_copy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.sub.connect(admin=True) as admin:
            while time.monotonic() < deadline:
                states = admin.execute(
                    "SELECT r.srsubstate FROM pg_subscription_rel AS r"
                    " JOIN pg_subscription AS s ON s.oid = r.srsubid WHERE s.subname = %s",
                    [self.name],
                ).fetchall()
                if states and all(state == "r" for (state,) in states):
                    return
                time.sleep(0.05)
        raise AssertionError(f"initial copy of {self.name} did not finish: {states}")

    def wait_caught_up(self, timeout: float = 60) -> None:
        """Until the subscriber confirms everything the publisher has written."""
        with self.pub.connect(admin=True) as admin:
            # The insert position: with synchronous_commit off the last
            # commits may be past pg_current_wal_lsn(), the write position.
            row = admin.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
            assert row is not None
            target = row[0]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                done = admin.execute(
                    "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    [target, self.name],
                ).fetchone()
                if done == (True,):
                    return
                time.sleep(0.02)
        raise AssertionError(f"subscriber {self.name} did not reach {target}")

    def apply_errors(self) -> int:
        with self.sub.connect(admin=True) as admin:
            row = admin.execute(
                "SELECT apply_error_count + sync_error_count FROM pg_stat_subscription_stats"
                " WHERE subname = %s",
                [self.name],
            ).fetchone()
        return 0 if row is None else int(row[0])

    def drop(self) -> None:
        with self.sub.connect(admin=True) as admin:
            admin.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(self.name)))


@pytest.fixture
def subscriber(cluster: Cluster) -> Iterator[Database]:
    with cluster.database("migrated") as db:
        yield db


@pytest.fixture
def subscriptions() -> Iterator[list[Subscription]]:
    made: list[Subscription] = []
    try:
        yield made
    finally:
        for subscription in made:
            subscription.drop()


def machines_in_every_status(conn: Conn) -> dict[str, uuid.UUID]:
    made = {s: add_machine(conn, status=s) for s in ("offline", "idle", "maintenance")}
    made["processing"] = add_machine(conn, status="idle")
    start(conn, made["processing"])
    made["error"] = add_machine(conn, status="idle")
    conn.execute(
        "UPDATE machines SET status = 'error', failure_description = 'pump' WHERE id = %s",
        [made["error"]],
    )
    return made


def every_kind_of_write(conn: Conn, rounds: int) -> int:
    """New UPDATEs, the four legacy paths (compat), the RPCs, inserts with
    aliases and upper case, an upsert into machine_state, deletes; returns
    the number of statements."""
    done = 0

    def run(statement: str, params: Any = None) -> None:
        nonlocal done
        conn.execute(statement, params)
        done += 1

    for n in range(rounds):
        fresh = add_machine(conn, status=("IDLE", " idle ", "offline")[n % 3])
        other = add_machine(conn, status="idle")
        done += 2
        start(conn, fresh)
        run("UPDATE machines SET status = 'idle' WHERE id = %s", [fresh])
        for path in ("start", "complete", "start", "stop", "error"):
            params = legacy_params(fresh, message=f"round {n}")
            for _table, statement in LEGACY_PATHS[path]:
                run(statement, params)
        run("UPDATE machines SET status = 'offline' WHERE id = %s", [fresh])
        for name in ("processing", "complete", "error"):
            run(RPC_CALLS[name], legacy_params(other, message="rpc"))
        run(
            RPC_CALLS["update"],
            {"m": other, "s": "maintenance", "p": None, "f": False, "msg": None},
        )
        run(
            "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'idle')"
            " ON CONFLICT (machine_id) DO UPDATE SET current_state = excluded.current_state",
            [other],
        )
        with conn.transaction():
            run("UPDATE machines SET status = 'error' WHERE id = %s", [other])
            run("UPDATE machines SET status = 'idle' WHERE id = %s", [other])
        if n % 2:
            run("DELETE FROM machines WHERE id = %s", [other])
    return done


def test_subscriber_of_both_tables_applies_rows_as_written(db, subscriber, subscriptions):
    with db.connect() as conn:
        made = machines_in_every_status(conn)
    # Strict on the subscriber: the guard would refuse any machine_state row
    # the apply worker wrote if it fired there.
    with subscriber.connect() as conn:
        conn.execute("SELECT machine_sync.set_mode_v1('strict')")
    subscription = Subscription(db, subscriber, TABLES)
    subscriptions.append(subscription)
    with db.connect() as conn:
        statements = every_kind_of_write(conn, rounds=6)
        conn.execute("UPDATE machines SET status = 'idle' WHERE id = %s", [made["error"]])
    subscription.wait_caught_up()
    assert statements > 100
    assert subscription.apply_errors() == 0
    with db.connect() as pub, subscriber.connect() as sub:
        assert_consistent(pub)
        assert_consistent(sub)
        for table in TABLES:
            # Every column, the timestamps included: had the mirror fired on
            # the subscriber, updated_at would be the subscriber's clock.
            assert rows(sub, table) == rows(pub, table), table
        count = sub.execute("SELECT count(*) > %s FROM machines", [len(made)]).fetchone()
        assert count == (True,)
        assert sub.execute("SELECT machine_sync.mode_v1()").fetchone() == ("strict",)


def mirror_applied_rows(conn: Conn) -> None:
    conn.execute("ALTER TABLE public.machines ENABLE REPLICA TRIGGER zz_machine_sync_applied")


def test_subscriber_of_machines_alone_mirrors_with_the_applied_row_trigger(
    db, subscriber, subscriptions
):
    with db.connect() as conn:
        made = machines_in_every_status(conn)
    with subscriber.connect() as conn:
        mirror_applied_rows(conn)
        enabled = conn.execute(
            "SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = 'public.machines'::regclass"
            " AND tgname LIKE 'zz\\_machine\\_sync%' ORDER BY 1"
        ).fetchall()
        assert enabled == [
            ("zz_machine_sync", "O"),
            ("zz_machine_sync_applied", "R"),
            ("zz_machine_sync_insert", "O"),
            ("zz_machine_sync_insert_state", "O"),
        ]
    subscription = Subscription(db, subscriber, ("public.machines",))
    subscriptions.append(subscription)
    with subscriber.connect() as sub:
        assert_consistent(sub)  # the initial copy was mirrored
    with db.connect() as conn:
        every_kind_of_write(conn, rounds=6)
        conn.execute("UPDATE machines SET status = 'idle' WHERE id = %s", [made["error"]])
    subscription.wait_caught_up()
    assert subscription.apply_errors() == 0
    with db.connect() as pub, subscriber.connect() as sub:
        assert_consistent(sub)
        assert rows(sub, "public.machines") == rows(pub, "public.machines")
        assert rows(sub, "public.machine_state") == rows(pub, "public.machine_state")
    # Local writes on the subscriber still go through the rules and the mirror.
    with subscriber.connect() as sub:
        machine_id = add_machine(sub, status="idle")
        start(sub, machine_id)
        assert_consistent(sub)
        status = subscriber.one("SELECT count(*) FROM machine_sync_installed.problems_v1()")
        assert status == 0


def test_rows_loaded_in_replica_mode_by_anything_but_a_subscription_are_not_mirrored(db):
    """A subscriber's dump restores the applied-row trigger enabled for
    replica mode, and a restore loads its data in replica mode, machine_state
    included: only a subscription's own workers may be mirrored, or the
    restore would write each state row twice (23505)."""
    with db.connect() as conn:
        mirror_applied_rows(conn)
        machine_id = add_machine(conn, status="idle")
        start(conn, machine_id)
        machine_row = conn.execute("SELECT * FROM machines WHERE id = %s", [machine_id]).fetchone()
        state_row = rows(conn, "public.machine_state")
        conn.execute("DELETE FROM machines WHERE id = %s", [machine_id])
        conn.commit()
    with db.connect(admin=True) as conn:
        conn.execute("SET session_replication_role = replica")
        assert machine_row is not None
        conn.execute(
            sql.SQL("INSERT INTO machines VALUES ({})").format(
                sql.SQL(", ").join(sql.Placeholder() * len(machine_row))
            ),
            machine_row,
        )
        for state in state_row:
            conn.execute(
                sql.SQL("INSERT INTO machine_state VALUES ({})").format(
                    sql.SQL(", ").join(sql.Placeholder() * len(state))
                ),
                state,
            )
        conn.commit()
        assert rows(conn, "public.machine_state") == state_row  # as loaded, not rewritten
        conn.execute("SET session_replication_role = origin")
        assert_consistent(conn)
