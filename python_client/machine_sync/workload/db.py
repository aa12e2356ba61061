"""Setup and inspection: connections, machines, process ids and drift."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Sequence

import psycopg

from .events import (
    Conn,
    Schema,
)
from .queries import statement


def connect(conninfo: str, *, statement_timeout_ms: int | None = None, name: str = "") -> Conn:
    """An autocommit connection, as each legacy HTTP request effectively is."""
    conn = psycopg.connect(
        conninfo, autocommit=True, application_name=name or "machine-sync workload"
    )
    if statement_timeout_ms is not None:
        conn.execute(statement("set_statement_timeout"), {"value": f"{statement_timeout_ms}ms"})
    return conn


def create_machines(conn: Conn, count: int, prefix: str = "WL-") -> list[uuid.UUID]:
    """Insert ``count`` idle machines, each with an agreeing ``machine_state`` row."""
    with conn.transaction():
        rows = conn.execute(
            statement("create_machines"), {"prefix": prefix, "count": count}
        ).fetchall()
        ids = [row[0] for row in rows]
        conn.execute(statement("create_missing_state_rows"), {"ids": ids})
    return ids


def schema_of(conn: Conn) -> Schema:
    """``migrated`` once machine-sync's drift view exists, else ``legacy``."""
    row = conn.execute(statement("schema_is_migrated")).fetchone()
    return "migrated" if row is not None and row[0] else "legacy"


class ProcessIds:
    """Process ids for new runs, safe to share between threads.

    On the production schema ``machines.current_process_id`` references
    ``process_executions``, so ids there are real rows, made in batches on a
    connection of their own; elsewhere they are random UUIDs.
    """

    def __init__(self, conninfo: str, batch: int = 512) -> None:
        self._conninfo = conninfo
        self._batch = batch
        self._lock = threading.Lock()
        self._ids: list[uuid.UUID] = []
        with psycopg.connect(conninfo, autocommit=True) as conn:
            row = conn.execute(statement("has_process_table")).fetchone()
        self._table = bool(row and row[0])

    def take(self) -> uuid.UUID:
        """A process id no run has used."""
        if not self._table:
            return uuid.uuid4()
        with self._lock:
            if not self._ids:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    rows = conn.execute(
                        statement("create_processes"), {"count": self._batch}
                    ).fetchall()
                self._ids = [row[0] for row in rows]
            return self._ids.pop()


def drift(conn: Conn, schema: Schema, ids: Sequence[uuid.UUID] | None = None) -> Counter[str]:
    """Drifting machines by problem (all machines, or only ``ids``).

    Before migration this is the module's own query; after, ``machine_sync.drift``.
    """
    query = statement("legacy_drift") if schema == "legacy" else statement("migrated_drift")
    rows = conn.execute(query, {"ids": None if ids is None else list(ids)}).fetchall()
    return Counter(str(row[1]) for row in rows)


def machine_drifts(conn: Conn, schema: Schema, machine: uuid.UUID) -> bool:
    """True when ``machine``'s two rows disagree right now."""
    return bool(drift(conn, schema, [machine]))
