"""The two write paths: production's two statements and the client's one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Final

import psycopg

from machine_sync.client import Client
from machine_sync.errors import InvalidTransition, translate

from .events import (
    ERROR_DESCRIPTION,
    Conn,
    Refused,
    SecondWrite,
)
from .queries import statement

STARTABLE: Final = frozenset({"idle", "offline"})


def _now() -> datetime:
    return datetime.now(UTC)


class LegacyPath:
    """Production's code: two autocommit statements per event, as it runs today."""

    name = "legacy"

    def start(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """Read status, check it in Python, then write machines, then machine_state.

        On a migrated database the rules are the database's, for this code too:
        when another writer started the machine between the read and the write,
        the write is refused (MS002, busy) and the start counts as refused.
        """
        row = conn.execute(statement("legacy_read_status"), {"machine": machine}).fetchone()
        if row is None or row[0] not in STARTABLE:
            raise Refused(f"machine is {row[0] if row else 'missing'}")
        args = {"machine": machine, "process": process, "now": _now()}
        with _database_refusals():
            conn.execute(statement("legacy_start_machines"), args)
            with second("machine_state"):
                conn.execute(statement("legacy_start_state"), args)

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
        conn.execute(statement("legacy_error_state"), args)
        with second("machines"):
            conn.execute(statement("legacy_error_machines"), args)

    def stop(self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite) -> None:
        """machines loses its process, then machine_state idle.

        Migrated, clearing the process of a processing machine stops it: idle.
        """
        conn.execute(statement("legacy_stop_machines"), {"machine": machine})
        with second("machine_state"):
            conn.execute(statement("legacy_stop_state"), {"machine": machine})

    def reset(self, conn: Conn, machine: uuid.UUID, second: SecondWrite) -> None:
        """The operator's "mark idle" button runs the completion path."""
        self._idle(conn, machine, second)

    @staticmethod
    def _idle(conn: Conn, machine: uuid.UUID, second: SecondWrite) -> None:
        args = {"machine": machine, "now": _now()}
        conn.execute(statement("legacy_complete_machines"), args)
        with second("machine_state"):
            conn.execute(statement("legacy_complete_state"), args)


class ClientPath:
    """machine-sync: :class:`machine_sync.client.Client`, one statement per event.

    Refusals by the database's rules (busy machine, a transition they do not
    allow, a run that is no longer current) become :class:`Refused`; every
    other error is raised as the client raises it.
    """

    name = "client"

    def start(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """Start as the database's rules allow (from idle or offline), decided in the statement."""
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
def _database_refusals() -> Iterator[None]:
    """The database's rules refusing a raw statement (MS002 busy, MS003) as :class:`Refused`."""
    try:
        yield
    except psycopg.Error as exc:
        if isinstance(translate(exc), InvalidTransition):
            raise Refused(str(exc)) from exc
        raise


@contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except InvalidTransition as exc:
        raise Refused(str(exc)) from exc
