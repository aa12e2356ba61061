"""The two write paths: production's two statements and the client's one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Final

from machine_sync.client import Client
from machine_sync.errors import InvalidTransition

from .events import (
    ERROR_DESCRIPTION,
    Conn,
    Refused,
    SecondWrite,
)
from .queries import (
    LEGACY_COMPLETE_MACHINES,
    LEGACY_COMPLETE_STATE,
    LEGACY_ERROR_MACHINES,
    LEGACY_ERROR_STATE,
    LEGACY_READ_STATUS,
    LEGACY_START_MACHINES,
    LEGACY_START_STATE,
    LEGACY_STOP_MACHINES,
    LEGACY_STOP_STATE,
)

STARTABLE: Final = frozenset({"idle", "offline"})


def _now() -> datetime:
    return datetime.now(UTC)


class LegacyPath:
    """Production's code: two autocommit statements per event (legacy-system.md)."""

    name = "legacy"

    def start(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """Read status, check it in Python, then write machines, then machine_state."""
        row = conn.execute(LEGACY_READ_STATUS, {"machine": machine}).fetchone()
        if row is None or row[0] not in STARTABLE:
            raise Refused(f"machine is {row[0] if row else 'missing'}")
        args = {"machine": machine, "process": process, "now": _now()}
        conn.execute(LEGACY_START_MACHINES, args)
        with second("machine_state"):
            conn.execute(LEGACY_START_STATE, args)

    def complete(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """machines idle, then machine_state idle; the process is not checked."""
        self._idle(conn, machine, second)

    def error(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """machine_state first (error + description), then machines."""
        args = {"machine": machine, "description": ERROR_DESCRIPTION}
        conn.execute(LEGACY_ERROR_STATE, args)
        with second("machines"):
            conn.execute(LEGACY_ERROR_MACHINES, args)

    def stop(self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite) -> None:
        """machines loses its process (its status stays), then machine_state idle."""
        conn.execute(LEGACY_STOP_MACHINES, {"machine": machine})
        with second("machine_state"):
            conn.execute(LEGACY_STOP_STATE, {"machine": machine})

    def reset(self, conn: Conn, machine: uuid.UUID, second: SecondWrite) -> None:
        """The operator's "mark idle" button runs the completion path."""
        self._idle(conn, machine, second)

    @staticmethod
    def _idle(conn: Conn, machine: uuid.UUID, second: SecondWrite) -> None:
        args = {"machine": machine, "now": _now()}
        conn.execute(LEGACY_COMPLETE_MACHINES, args)
        with second("machine_state"):
            conn.execute(LEGACY_COMPLETE_STATE, args)


class ClientPath:
    """machine-sync: :class:`machine_sync.client.Client`, one statement per event.

    Refusals by the transition rules (busy machine, a run that is no longer
    current) become :class:`Refused`; every other error is raised as the
    client raises it.
    """

    name = "client"

    def start(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """Start only from idle or offline, decided inside the statement."""
        with second("machine_state"), _refusals():
            Client(conn).start_process(machine, process)

    def complete(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """Complete only the machine's current run."""
        with second("machine_state"), _refusals():
            Client(conn).complete_process(machine, process)

    def error(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """Fail only the machine's current run, with the legacy message."""
        with second("machine_state"), _refusals():
            Client(conn).fail_process(machine, ERROR_DESCRIPTION, process_id=process)

    def stop(self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite) -> None:
        """Stop only the machine's current run."""
        with second("machine_state"), _refusals():
            Client(conn).stop_process(machine, process)

    def reset(self, conn: Conn, machine: uuid.UUID, second: SecondWrite) -> None:
        """An operator override: idle, no process."""
        with second("machine_state"), _refusals():
            Client(conn).set_status(machine, "idle")


@contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except InvalidTransition as exc:
        raise Refused(str(exc)) from exc
