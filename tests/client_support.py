"""Helpers for the client tests: count round trips, wait for a blocked backend,
compare an operation's result with what the tables hold afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from machine_sync.client import Machine

from machines import machine, state


@dataclass
class RoundTrips:
    """How many requests the client sent and waited for (filled on exit)."""

    count: int = -1
    statements: tuple[str, ...] = ()


@contextmanager
def round_trips(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
) -> Iterator[RoundTrips]:
    """Count round trips on ``conn`` from libpq's own protocol trace.

    A round trip ends with the client's Sync (extended protocol: parse, bind,
    execute) or a simple Query, after which it waits for ReadyForQuery; the
    server cannot be asked anything else in between.
    """
    counted = RoundTrips()
    with tempfile.TemporaryFile("w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield counted
        finally:
            conn.pgconn.untrace()  # flushes the trace
            trace.seek(0)
            # One line per message (a query's own newlines continue its line).
            sent = [line.rstrip("\n").split("\t") for line in trace if line.startswith("F\t")]
    counted.count = sum(1 for fields in sent if fields[2] in ("Sync", "Query"))
    counted.statements = tuple(fields[3] for fields in sent if fields[2] in ("Parse", "Query"))


def assert_matches_store(conn: psycopg.Connection[Any], result: Machine) -> None:
    """The operation's result is exactly what both tables now hold."""
    stored = machine(conn, result.id)
    mirrored = state(conn, result.id)
    assert stored is not None
    assert mirrored is not None
    assert result.state is not None
    assert (
        result.status,
        result.current_process_id,
        result.failure_description,
        result.failure_component,
        result.updated_at,
        result.serial_number,
    ) == (
        stored["status"],
        stored["current_process_id"],
        stored["failure_description"],
        stored["failure_component"],
        stored["updated_at"],
        stored["serial_number"],
    )
    assert (
        result.state.current_state,
        result.state.process_id,
        result.state.is_failure_mode,
        result.state.failure_description,
        result.state.failure_component,
        result.state.state_since,
    ) == (
        mirrored["current_state"],
        mirrored["process_id"],
        mirrored["is_failure_mode"],
        mirrored["failure_description"],
        mirrored["failure_component"],
        mirrored["state_since"],
    )


@contextmanager
def pgbouncer(dsn: str) -> Iterator[str]:
    """PgBouncer in transaction mode in front of ``dsn``, one server connection
    for all clients; yields a DSN through it. Skips when pgbouncer is absent."""
    binary = shutil.which("pgbouncer")
    if binary is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    target = conninfo_to_dict(dsn)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Run as root, pgbouncer drops to nobody, who must read its files: not
    # under pytest's private tmp_path.
    work_dir = Path(tempfile.mkdtemp(prefix="machine-sync-pgbouncer-"))
    work_dir.chmod(0o755)
    (work_dir / "users.txt").write_text(f'"{target["user"]}" ""\n')
    config = work_dir / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"{target['dbname']} = host={target['host']} port={target['port']}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {work_dir / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 1\nmax_client_conn = 20\n"
    )
    argv = [binary, str(config)]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "nobody"]
    log = (work_dir / "pgbouncer.log").open("w")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    through = make_conninfo(dsn, host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                psycopg.connect(through, connect_timeout=1).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline or process.poll() is not None:
                    log.flush()
                    raise AssertionError((work_dir / "pgbouncer.log").read_text()) from None
                time.sleep(0.05)
        yield through
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        shutil.rmtree(work_dir, ignore_errors=True)
