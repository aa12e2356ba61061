"""Statements and round trips per state change, counted at the wire."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Self

import psycopg

from machine_sync.benchmark.drivers import conninfo_via, proxy_target
from machine_sync.benchmark.proxy import DelayProxy

from .db import ProcessIds
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


@dataclass(frozen=True)
class WireCount:
    """Statements and round trips of a number of state changes."""

    state_changes: int
    statements: int  # statements the client's cursors executed
    round_trips: int  # flights through the proxy: the client waited for the server

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


def _counting_cursor(sent: list[int]) -> type[psycopg.Cursor[Any]]:
    """A cursor class that counts the statements it sends in ``sent[0]``."""

    class Counting(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **options: Any) -> Self:
            sent[0] += 1
            return super().execute(query, params, **options)

    return Counting


def count_round_trips(
    conninfo: str, path: WritePath, machine: uuid.UUID, *, cycles: int = 3
) -> WireCount:
    """Count statements and round trips per state change of ``path``.

    Round trips are the benchmark's: flights through its proxy
    (:class:`~machine_sync.benchmark.proxy.DelayProxy`, no delay added), each
    a burst of bytes from the client after the server last spoke. Statements
    are the ones the connection's cursors execute. Runs :data:`SCRIPT` a few
    times first, so psycopg has prepared what it prepares (steady state),
    then ``cycles`` times counted.
    """
    processes = ProcessIds(conninfo)
    sent = [0]
    with (
        DelayProxy(proxy_target(conninfo), rtt_ms=0) as proxy,
        psycopg.connect(
            conninfo_via(conninfo, proxy),
            autocommit=True,
            application_name="machine-sync trips",
            cursor_factory=_counting_cursor(sent),
        ) as conn,
    ):
        for _ in range(6):
            play_script(conn, path, machine, processes, SCRIPT)
        sent[0], flights = 0, proxy.flights
        changes = sum(play_script(conn, path, machine, processes, SCRIPT) for _ in range(cycles))
        return WireCount(changes, sent[0], proxy.flights - flights)
