"""Faults injected into a writer's second write: a held row lock, then a kill or a timeout."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from enum import StrEnum

import psycopg

from .events import (
    Conn,
)
from .queries import statement


class Fault(StrEnum):
    """What happens to a writer while its second write waits for a row lock."""

    KILLED = "connection_killed"  # pg_terminate_backend: a crash or network drop
    TIMEOUT = "statement_timeout"  # the server gives up on the statement


def no_fault(_table: str) -> AbstractContextManager[None]:
    """A :data:`SecondWrite` that does nothing."""
    return _nothing()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


class FaultInjector:
    """Makes one planned fault happen to a writer's second write.

    A realistic cause: the row the second write needs is locked by another
    session (a long report, a migration, a stuck transaction). The injector
    takes that lock on its own connection, lets the write block on it, and
    then either lets the writer's ``statement_timeout`` fire or terminates the
    writer's backend, as a crashed client or a dropped connection would.
    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._conn: Conn | None = None

    def close(self) -> None:
        """Close the injector's connection."""
        if self._conn is not None:
            self._conn.close()

    def _blocker(self) -> Conn:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(
                self._conninfo, autocommit=False, application_name="machine-sync fault"
            )
            self._conn.execute(statement("set_lock_timeout"), {"value": "1s"})
            self._conn.commit()
        return self._conn

    @contextmanager
    def inject(self, fault: Fault, victim: Conn, machine: uuid.UUID, table: str) -> Iterator[bool]:
        """Hold ``table``'s row of ``machine`` while the body runs; then ``fault``.

        Yields False, and injects nothing, when the row could not be locked
        (another session kept it longer than the injector's lock_timeout).
        """
        blocker = self._blocker()
        lock = (
            statement("lock_state_row")
            if table == "machine_state"
            else statement("lock_machine_row")
        )
        try:
            blocker.execute(lock, {"machine": machine})
        except psycopg.Error:
            with suppress(psycopg.Error):
                blocker.rollback()
            yield False
            return
        done = threading.Event()
        killer: threading.Thread | None = None
        if fault is Fault.KILLED:
            pid = victim.info.backend_pid
            killer = threading.Thread(
                target=self._kill_when_blocked, args=(blocker, pid, done), daemon=True
            )
            killer.start()
        try:
            yield True
        finally:
            done.set()
            if killer is not None:
                killer.join()
            with suppress(psycopg.Error):
                blocker.rollback()

    @staticmethod
    def _kill_when_blocked(blocker: Conn, victim: int, done: threading.Event) -> None:
        # Kill only once the victim waits on our lock, so the statement is in
        # flight; stop looking as soon as the write returned without waiting.
        deadline = time.monotonic() + 2.0
        with suppress(psycopg.Error):  # a lost injector connection only loses the fault
            while not done.is_set() and time.monotonic() < deadline:
                row = blocker.execute(statement("is_blocking"), {"victim": victim}).fetchone()
                if row is not None and row[0]:
                    blocker.execute(statement("terminate"), {"victim": victim})
                    return
                time.sleep(0.001)
