"""A physical hot standby (pg_basebackup -R) of a server under a burst of
writers: the standby shows only whole commits, so every REPEATABLE READ
snapshot taken on it while it replays has machine_state equal to machines,
and once it has replayed everything it equals the primary."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from machine_sync import server as pgserver

from .workload import DEADLOCK, LEGACY_PATHS, REFUSALS, Tx, WriterLog, legacy_params, run_writers
from conftest import Cluster, Database
from machines import add_machine, assert_consistent, disagreements

Conn = psycopg.Connection[Any]

MACHINES = 30
WRITERS = 4


@contextmanager
def hot_standby(cluster: Cluster) -> Iterator[pgserver.Server]:
    """A standby of the cluster's server, streaming through its own slot."""
    primary = cluster.server
    if primary.bin_dir is None or primary.data_dir is None:
        pytest.skip("a standby needs a server this suite started (its binaries and data)")
    # The server's own system user, as it runs the primary (root may not run it).
    user = pwd.getpwuid(primary.data_dir.stat().st_uid).pw_name
    run_as = user if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="machine-sync-standby-"))
    data = base / "data"
    slot = f"standby_{uuid.uuid4().hex[:8]}"
    try:
        if run_as is not None:
            entry = pwd.getpwnam(run_as)
            os.chown(base, entry.pw_uid, entry.pw_gid)
        backup = pgserver._run(
            run_as,
            primary.bin_dir / "pg_basebackup",
            "-D", str(data), "-R", "-X", "stream", "-c", "fast", "-C", "-S", slot,
            "-d", primary.dsn,
        )  # fmt: skip
        assert backup.returncode == 0, backup.stdout
        assert (data / "standby.signal").exists()
        kind = primary.label.split("-")[0]
        with pgserver._local_server(primary.bin_dir, kind, user, data, False, True) as standby:
            yield standby
    finally:
        with psycopg.connect(primary.dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                [slot],
            )
        shutil.rmtree(base, ignore_errors=True)


def burst(machine_ids: list[uuid.UUID]) -> Any:
    """Each operation: a new UPDATE, a start, a legacy two-statement path
    (compat), or two changes in one transaction."""

    def operation(rng: random.Random) -> list[Tx]:
        machine_id = rng.choice(machine_ids)
        choice = rng.randrange(4)
        if choice == 0:
            status = rng.choice(["idle", "maintenance", "offline", "error"])
            statement = "UPDATE machines SET status = %(s)s WHERE id = %(m)s"
            return [Tx("update", [(statement, {"s": status, "m": machine_id})], [])]
        if choice == 1:
            statement = (
                "UPDATE machines SET status = 'processing', current_process_id = %(p)s"
                " WHERE id = %(m)s"
            )
            return [Tx("start", [(statement, {"p": uuid.uuid4(), "m": machine_id})], [])]
        if choice == 2:
            path = rng.choice(sorted(LEGACY_PATHS))
            params = legacy_params(machine_id, message=f"burst {rng.random()}")
            return [Tx(path, [(sql_, params)], []) for _table, sql_ in LEGACY_PATHS[path]]
        pair = [
            ("UPDATE machines SET status = 'maintenance' WHERE id = %(m)s", {"m": machine_id}),
            ("UPDATE machines SET status = 'idle' WHERE id = %(m)s", {"m": machine_id}),
        ]
        return [Tx("pair", pair, [], isolation="READ COMMITTED")]

    return operation


def table_rows(conn: Conn) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    return (
        conn.execute("SELECT * FROM machines ORDER BY id").fetchall(),
        conn.execute("SELECT * FROM machine_state ORDER BY machine_id").fetchall(),
    )


def replayed(conn: Conn) -> str:
    row = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def test_standby_snapshots_show_whole_commits(cluster: Cluster, db: Database, request) -> None:
    ops = 1500 if request.config.getoption("--soak") else 200
    with db.connect() as conn:
        machine_ids = [add_machine(conn, status="idle") for _ in range(MACHINES)]
    with hot_standby(cluster) as standby:
        replica_dsn = make_conninfo(standby.dsn, dbname=db.name)
        # Each commit flushed, as in production (the suite's servers commit
        # asynchronously), so the standby receives commits one by one.
        writers_dsn = make_conninfo(db.dsn, options="-c synchronous_commit=on")
        log: list[WriterLog] = []
        failure: list[BaseException] = []

        def write() -> None:
            try:
                log.append(
                    run_writers(
                        writers_dsn, burst(machine_ids), WRITERS, ops, seed=7,
                        allowed=(*REFUSALS, DEADLOCK),
                    )
                )  # fmt: skip
            except BaseException as err:
                failure.append(err)

        snapshots = 0
        positions: set[str] = set()
        with psycopg.connect(replica_dsn, autocommit=True) as replica:
            assert replica.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            writers = threading.Thread(target=write)
            writers.start()
            while writers.is_alive() or snapshots < 20:
                with replica.transaction():
                    replica.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    positions.add(replayed(replica))
                    # Three statements, one snapshot.
                    assert disagreements(replica) == []
                    drift = replica.execute("SELECT count(*) FROM machine_sync.drift")
                    assert drift.fetchone() == (0,)
                    machines, states = table_rows(replica)
                    assert len(machines) == len(states) == MACHINES
                snapshots += 1
            writers.join()
            assert not failure, failure
            [done] = log
            assert len(done.acked) > WRITERS * ops / 2

            with psycopg.connect(db.admin_dsn, autocommit=True) as primary:
                row = primary.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
                assert row is not None
                target = row[0]
                deadline = time.monotonic() + 60
                caught_up = (False,)
                while time.monotonic() < deadline:
                    caught_up = replica.execute(
                        "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target]
                    ).fetchone()
                    if caught_up == (True,):
                        break
                    time.sleep(0.02)
                assert caught_up == (True,), "the standby did not replay the burst"
            with db.connect() as primary:
                assert_consistent(primary)
                assert table_rows(replica) == table_rows(primary)
            assert_consistent(replica)
    # Snapshots were taken while the standby replayed: it moved between them.
    assert len(positions) > 10, positions
    print(f"standby: {snapshots} snapshots, {len(positions)} replay positions, {done.total} writes")
