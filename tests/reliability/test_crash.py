"""The server dies (``pg_ctl stop -m immediate``: no checkpoint, backends
killed) in the middle of a burst of writes and is restarted. After crash
recovery the tables agree and every acknowledged commit is there.

This needs a server of its own with durability on (the suite's servers run
with fsync and synchronous_commit off, which loses acknowledged commits on a
crash by design), so it runs once, on the embedded server, not on every
server kind: the crash-recovery path is PostgreSQL's, the mirror under test is
the same SQL on both.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from machine_sync import server as pgserver

from .workload import LEGACY_PATHS, RPC_CALLS, legacy_params
from conftest import Cluster, Database
from machines import add_machine, assert_consistent

WRITERS = 6
# The crash comes once every writer has had this many writes acknowledged:
# every write path (new UPDATE, legacy start, legacy state write, RPC) ten times.
WRITES_BEFORE_CRASH = 40


def pg_ctl(server: pgserver.Server, *args: str) -> None:
    """Run pg_ctl on the server's data directory (as its owner when we are root)."""
    assert server.bin_dir is not None
    assert server.data_dir is not None
    argv = [str(server.bin_dir / "pg_ctl"), "-D", str(server.data_dir), *args]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", Path(server.data_dir).owner(), "--", *argv]
    subprocess.run(argv, check=True, capture_output=True, cwd="/", timeout=120)


@pytest.fixture(scope="module")
def durable_db() -> Iterator[tuple[pgserver.Server, Database]]:
    with pgserver.embedded_server(fast=False) as server:
        with psycopg.connect(server.dsn) as conn:
            row = conn.execute("SELECT current_user").fetchone()
        assert row is not None
        # The tables' owner is not the superuser, as in the suite's clusters.
        owner = "postgres" if row[0] != "postgres" else "app_owner"
        cluster = Cluster(server, pgserver.find_psql(server), owner)
        yield server, cluster.create("migrated")


def marker(writer: int, n: int) -> uuid.UUID:
    """The value write ``n`` of ``writer`` leaves behind (a process id)."""
    return uuid.UUID(int=(writer + 1) << 64 | n)


def decode(value: uuid.UUID | None) -> int | None:
    return None if value is None else value.int & ((1 << 64) - 1)


@dataclass
class Owner:
    """One writer and the machine only it writes; its client-side log."""

    index: int
    machine_id: uuid.UUID
    acked: int = 0  # the last write number the server acknowledged
    attempted: int = 0  # the last write number sent (it may or may not have committed)
    stopped: int = 0  # the last write number whose stop (its first step) was acknowledged
    kinds: dict[str, int] = field(default_factory=dict)
    failure: psycopg.Error | None = None  # a write the database refused

    def possible(self) -> set[int | None]:
        """What the machine may hold after the crash: the last acknowledged
        write, unless the one in flight got further (its stop, or all of it)."""
        if self.attempted == self.acked:
            return {self.acked or None}
        if self.stopped == self.attempted:
            return {None, self.attempted}  # stopped; the start in flight
        return {self.acked or None, None}  # the stop in flight


# Each write ends the run before (a machine running a process is busy), by
# one of the ways a run ends, and then starts the next.
STOPS: list[list[str]] = [
    ["UPDATE machines SET status = 'idle' WHERE id = %(m)s"],
    [text for _table, text in LEGACY_PATHS["complete"]],
    [text for _table, text in LEGACY_PATHS["stop"]],
    [RPC_CALLS["complete"]],
]


def write_forever(dsn: str, owner: Owner, stop: threading.Event) -> None:
    """Write numbered process ids until the connection dies. Every write of
    number n ends the previous run (new UPDATE, legacy complete or stop path,
    RPC) and leaves current_process_id = marker(n) in both tables, through a
    different path each time: new UPDATE, legacy start path (two statements,
    each acknowledged separately), legacy machine_state write, RPC."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            n = 0
            while not stop.is_set():
                n += 1
                process = marker(owner.index, n)
                kind = ("new", "legacy-start", "legacy-state", "rpc")[n % 4]
                if kind == "new":
                    statements = [
                        (
                            "UPDATE machines SET status = 'processing', current_process_id = %(p)s"
                            " WHERE id = %(m)s",
                            {"m": owner.machine_id, "p": process},
                        )
                    ]
                elif kind == "legacy-start":
                    params = legacy_params(owner.machine_id, process)
                    statements = [(text, params) for _table, text in LEGACY_PATHS["start"]]
                elif kind == "legacy-state":
                    params = legacy_params(owner.machine_id, process)
                    statements = [(LEGACY_PATHS["start"][1][1], params)]
                else:
                    statements = [(RPC_CALLS["processing"], {"m": owner.machine_id, "p": process})]
                owner.attempted = n
                for text in STOPS[(n // 4) % len(STOPS)]:
                    conn.execute(text, legacy_params(owner.machine_id, process))
                owner.stopped = n
                for text, params in statements:
                    conn.execute(text, params)
                owner.acked = n
                owner.kinds[kind] = owner.kinds.get(kind, 0) + 1
    except psycopg.OperationalError:
        return  # the server went away: expected
    except psycopg.Error as err:
        owner.failure = err  # refused: the test fails


def test_crash_during_a_burst_loses_no_acknowledged_commit(
    durable_db: tuple[pgserver.Server, Database],
) -> None:
    server, db = durable_db
    with db.connect() as conn:
        owners = [Owner(i, add_machine(conn, status="idle")) for i in range(WRITERS)]
    stop = threading.Event()
    threads = [
        threading.Thread(target=write_forever, args=(db.dsn, owner, stop)) for owner in owners
    ]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    deadline = began + 60
    while not all(owner.acked >= WRITES_BEFORE_CRASH for owner in owners):
        if any(owner.failure is not None for owner in owners) or time.monotonic() > deadline:
            stop.set()
            break  # the assertions below say what went wrong
        time.sleep(0.01)
    crashed_at = time.monotonic()
    pg_ctl(server, "-m", "immediate", "-w", "stop")
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    # pg_ctl restart reuses the options the server was started with (postmaster.opts).
    pg_ctl(server, "-w", "-t", "60", "-l", str(Path(str(server.data_dir)) / "log"), "restart")
    recovered_in = time.monotonic() - crashed_at

    with db.connect() as conn:
        assert_consistent(conn)
        rows: dict[uuid.UUID, Any] = dict(
            conn.execute("SELECT id, current_process_id FROM machines").fetchall()
        )
    assert [owner.failure for owner in owners if owner.failure is not None] == []
    writes = sum(owner.acked for owner in owners)
    for owner in owners:
        assert owner.acked >= WRITES_BEFORE_CRASH, "the burst wrote too little before the crash"
        found = decode(rows[owner.machine_id])
        # The last acknowledged write is there; the one in flight may or may not be.
        assert found in owner.possible(), (
            f"writer {owner.index}: acknowledged {owner.acked}, stopped {owner.stopped},"
            f" in flight {owner.attempted}, found {found}"
        )
    kinds: dict[str, int] = {}
    for owner in owners:
        for kind, count in owner.kinds.items():
            kinds[kind] = kinds.get(kind, 0) + count
    print(
        f"\ncrash: {writes} acknowledged writes by {WRITERS} writers in"
        f" {crashed_at - began:.2f}s"
        f" {kinds}, in flight at the crash {sum(o.attempted - o.acked for o in owners)},"
        f" stop + recovery + restart {recovered_in:.2f}s"
    )
