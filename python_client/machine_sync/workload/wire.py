"""Statements and round trips per state change, from libpq's protocol trace."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import psycopg

from .db import ProcessIds, connect
from .events import (
    Conn,
    Event,
    WritePath,
)
from .faults import no_fault

# One fixed recipe script: every event kind, machines end idle.
SCRIPT: Final = (
    Event.START,
    Event.COMPLETE,
    Event.START,
    Event.ERROR,
    Event.RESET,
    Event.START,
    Event.STOP,
    Event.RESET,
)
_TRACE_LINE = re.compile(r"^([FB])\t\d+\t(\w+)")


@dataclass(frozen=True)
class WireCount:
    """Protocol messages per state change, counted from the wire."""

    state_changes: int
    statements: int  # Query and Execute messages the client sent
    round_trips: int  # ReadyForQuery messages: the client waited for the server

    @property
    def statements_per_change(self) -> float:
        """Statements per state change."""
        return self.statements / self.state_changes

    @property
    def round_trips_per_change(self) -> float:
        """Round trips per state change."""
        return self.round_trips / self.state_changes


def play_script(
    conn: Conn, path: WritePath, machine: uuid.UUID, processes: ProcessIds, script: Sequence[Event]
) -> int:
    """Run ``script`` once on ``machine``; return how many events it ran."""
    process = processes.take()
    for kind in script:
        if kind is Event.START:
            process = processes.take()
            path.start(conn, machine, process, no_fault)
        elif kind is Event.RESET:
            path.reset(conn, machine, no_fault)
        else:
            getattr(path, kind.value)(conn, machine, process, no_fault)
    return len(script)


def count_round_trips(
    conninfo: str, path: WritePath, machine: uuid.UUID, *, cycles: int = 3
) -> WireCount | None:
    """Count statements and round trips per state change of ``path``.

    Runs :data:`SCRIPT` a few times untraced (so psycopg has prepared what it
    prepares: steady state), then ``cycles`` times under libpq's trace.
    Returns None when this libpq cannot trace (before 14).
    """
    processes = ProcessIds(conninfo)
    with connect(conninfo, name="machine-sync trace") as conn:
        for _ in range(6):
            play_script(conn, path, machine, processes, SCRIPT)
        fd, name = tempfile.mkstemp(prefix="machine-sync-trace-")
        try:
            try:
                conn.pgconn.trace(fd)
                conn.pgconn.set_trace_flags(
                    psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE
                )
            except psycopg.NotSupportedError:
                return None
            try:
                changes = sum(
                    play_script(conn, path, machine, processes, SCRIPT) for _ in range(cycles)
                )
            finally:
                conn.pgconn.untrace()
            with open(name, encoding="utf-8", errors="replace") as trace:
                messages = [m.groups() for m in map(_TRACE_LINE.match, trace) if m is not None]
        finally:
            os.close(fd)
            os.unlink(name)
    sent = sum(1 for way, kind in messages if way == "F" and kind in ("Query", "Execute"))
    waits = sum(1 for way, kind in messages if way == "B" and kind == "ReadyForQuery")
    return WireCount(changes, sent, waits)
