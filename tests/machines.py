"""Small helpers the tests share: make machines, read both tables, check agreement."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row

MIRRORED = (
    "current_state",
    "process_id",
    "is_failure_mode",
    "failure_description",
    "failure_component",
)


def machine_insert(status: str = "idle", **values: Any) -> tuple[str, list[Any]]:
    """The INSERT of one machine with production-like required columns
    (``RETURNING id``), and its parameters: to run alone or inside a CTE."""
    row = {
        "serial_number": f"SN-{uuid.uuid4().hex[:8]}",
        "location": "Bay 1",
        "lab_name": "Lab",
        "lab_institution": "Institute",
        "model": "S200",
        "machine_type": "ALD",
        "install_date": "2024-01-01T00:00:00Z",
        "last_maintenance_date": "2026-01-01T00:00:00Z",
        "admin_id": uuid.uuid4(),
        "status": status,
        **values,
    }
    columns = ", ".join(row)
    placeholders = ", ".join(["%s"] * len(row))
    return (
        f"INSERT INTO public.machines ({columns}) VALUES ({placeholders}) RETURNING id",
        list(row.values()),
    )


def add_machine(conn: psycopg.Connection[Any], status: str = "idle", **values: Any) -> uuid.UUID:
    """Insert one machine with production-like required columns; return its id."""
    result = conn.execute(*machine_insert(status, **values)).fetchone()
    assert result is not None
    machine_id: uuid.UUID = result[0]
    return machine_id


def bypassing_triggers(db: Any, *statements: tuple[str, list[Any]]) -> None:
    """Write as the superuser with triggers off, as a data-only restore does, to
    make drift or a stored non-canonical value (test setup only)."""
    with db.connect(admin=True) as admin:
        admin.execute("SET session_replication_role = replica")
        for statement, params in statements:
            admin.execute(statement, params)


def machine(conn: psycopg.Connection[Any], machine_id: uuid.UUID) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM machines WHERE id = %s", [machine_id]).fetchone()


def state(conn: psycopg.Connection[Any], machine_id: uuid.UUID) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT * FROM machine_state WHERE machine_id = %s", [machine_id]
        ).fetchone()


def disagreements(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """Every machine whose state row is missing or differs, computed here
    independently of machine_sync.drift so the view itself is under test."""
    return conn.execute(
        """
        SELECT coalesce(m.id, s.machine_id), m.status, s.current_state
        FROM machines AS m
        FULL JOIN machine_state AS s ON s.machine_id = m.id
        WHERE m.id IS NULL OR s.machine_id IS NULL
           OR m.status IS DISTINCT FROM s.current_state
           OR m.current_process_id IS DISTINCT FROM s.process_id
           OR (m.status = 'error') IS DISTINCT FROM s.is_failure_mode
           OR m.failure_description IS DISTINCT FROM s.failure_description
           OR m.failure_component IS DISTINCT FROM s.failure_component
        """
    ).fetchall()


def assert_consistent(conn: psycopg.Connection[Any]) -> None:
    """One agreeing machine_state row per machine, and the drift view agrees."""
    assert disagreements(conn) == []
    assert conn.execute("SELECT count(*) FROM machine_sync.drift").fetchone() == (0,)


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait until ``condition()`` holds; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def wait_until_lock_waiting(conn: psycopg.Connection[Any], pid: int, timeout: float = 10.0) -> None:
    """Wait until backend ``pid`` waits for a lock (the race is really on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
        if row is not None and row[0] == "Lock":
            return
        time.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited for a lock")


def start(conn: psycopg.Connection[Any], machine_id: uuid.UUID) -> uuid.UUID:
    """Start a fresh process on a machine (the only way into 'processing'); return its id."""
    process = uuid.uuid4()
    conn.execute(
        "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s",
        [process, machine_id],
    )
    return process


def sqlstate_of(error: BaseException) -> str | None:
    """The SQLSTATE of a psycopg error (machine-sync's MS00x codes have no class)."""
    return getattr(error, "sqlstate", None)
