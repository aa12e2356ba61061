"""What every write path shares: connections, events, refusals and the path protocol."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from enum import StrEnum
from typing import Any, Final, Literal, Protocol

import psycopg

from machine_sync.errors import MachineSyncError

Conn = psycopg.Connection[Any]
Schema = Literal["legacy", "migrated"]
"""``legacy``: production before machine-sync; ``migrated``: after the migrations."""

ERROR_MESSAGE: Final = "chamber pressure out of range"
ERROR_DESCRIPTION: Final = f"Recipe execution error: {ERROR_MESSAGE}"  # the legacy prefix


class Event(StrEnum):
    """One state change of a machine, as the recipe service makes them."""

    START = "start"
    COMPLETE = "complete"
    ERROR = "error"
    STOP = "stop"
    RESET = "reset"  # an operator puts a failed or stuck machine back to idle


class Refused(Exception):
    """The write path declined the event: the machine is not in a state for it."""


SecondWrite = Callable[[str], AbstractContextManager[object]]
"""Wraps the write that must not be lost; the argument names its target table."""


class WritePath(Protocol):
    """The five events written one way. ``second`` wraps the last write of each."""

    name: str

    def start(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """Start ``process`` on ``machine``; raise :class:`Refused` if it is busy."""

    def complete(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """The run finished: back to idle."""

    def error(
        self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite
    ) -> None:
        """The run failed: status error with a description."""

    def stop(self, conn: Conn, machine: uuid.UUID, process: uuid.UUID, second: SecondWrite) -> None:
        """An operator stopped the run."""

    def reset(self, conn: Conn, machine: uuid.UUID, second: SecondWrite) -> None:
        """An operator puts the machine back to idle, whatever it was doing."""


def error_name(exc: BaseException) -> str:
    """The psycopg class of an error (QueryCanceled, AdminShutdown...), through the
    client's translation, so both paths' errors are counted under the same names."""
    cause = exc.__cause__ if isinstance(exc, MachineSyncError) else exc
    return type(cause if isinstance(cause, psycopg.Error) else exc).__name__
