"""The errors machine_sync raises: one class per thing a caller can act on.

Everything derives from :class:`MachineSyncError`, so ``except MachineSyncError``
catches all of it. Errors that come from PostgreSQL keep their SQLSTATE in
``sqlstate`` and the psycopg exception as ``__cause__``; :func:`translate` maps
them by SQLSTATE (like psycopg's own ``psycopg.errors``), never by message text.

=============================  ===================================================
class                          raised when
=============================  ===================================================
:class:`DatabaseUnreachable`   no connection (refused, closed, pool timeout), 08xxx
:class:`UnknownMachine`        no machine with that id (or RLS hides it), P0002
:class:`InvalidStatus`         a status outside machine_sync.allowed_status, 23514
:class:`InvalidTransition`     the transition rules refuse the operation
:class:`MachineBusy`           start on a machine that is already processing
:class:`NotCurrentProcess`     complete/stop/fail of a run that is not current
:class:`InvalidArgument`       a bad argument (not a UUID, empty message), 22023
:class:`DirectWriteRefused`    a direct write to machine_state, MS001
:class:`PermissionDenied`      the role may not do this, 42501
:class:`NotInstalled`          machine-sync objects are missing: migrate first
:class:`ConcurrentUpdate`      deadlock, serialization or lock timeout: retry
:class:`DatabaseError`         any other PostgreSQL error
:class:`MigrationError`        the migration runner refused or failed (subclasses)
=============================  ===================================================
"""

from __future__ import annotations

from enum import IntEnum
from uuid import UUID

import psycopg
import psycopg.errors

__all__ = [
    "ChecksumMismatch",
    "ConcurrentUpdate",
    "DatabaseError",
    "DatabaseUnreachable",
    "DirectWriteRefused",
    "InvalidArgument",
    "InvalidStatus",
    "InvalidTransition",
    "MachineBusy",
    "MachineSyncError",
    "MigrationError",
    "MigrationFailed",
    "MigrationLocked",
    "MigrationsNotFound",
    "NotCurrentProcess",
    "NotInstalled",
    "PermissionDenied",
    "UnknownMachine",
    "translate",
]


class MachineSyncError(Exception):
    """Base class of every error machine_sync raises on purpose."""

    #: The SQLSTATE when PostgreSQL raised the underlying error, else None.
    sqlstate: str | None = None

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate


class DatabaseUnreachable(MachineSyncError):
    """The database cannot be reached: connection refused or lost, pool exhausted."""


class InvalidArgument(MachineSyncError, ValueError):
    """An argument is malformed (not a UUID, an empty message, an unknown mode)."""


class UnknownMachine(MachineSyncError, LookupError):
    """No machine has this id (or row-level security hides it from this role)."""

    def __init__(self, machine_id: UUID | None, message: str | None = None) -> None:
        super().__init__(
            message or f"machine {machine_id} does not exist (or this role cannot see it)",
            sqlstate="P0002",
        )
        self.machine_id = machine_id


class InvalidStatus(MachineSyncError, ValueError):
    """A status that is neither canonical nor an alias; the message lists the allowed ones."""

    sqlstate = "23514"


class InvalidTransition(MachineSyncError):
    """The transition rules refuse this operation in the machine's current state.

    ``status`` and ``process_id`` are the machine's current values, read under
    the row lock by the refused statement itself (not a separate read).
    """

    def __init__(
        self,
        message: str,
        *,
        machine_id: UUID,
        operation: str,
        status: str,
        process_id: UUID | None,
    ) -> None:
        super().__init__(message)
        self.machine_id = machine_id
        self.operation = operation
        self.status = status
        self.process_id = process_id


class MachineBusy(InvalidTransition):
    """``start_process`` on a machine that is already processing ``process_id``."""


class NotCurrentProcess(InvalidTransition):
    """``complete/stop/fail_process`` named a run that is not the machine's current one."""


class DirectWriteRefused(MachineSyncError):
    """A direct write to machine_state was refused (SQLSTATE MS001): write machines."""

    sqlstate = "MS001"


class PermissionDenied(MachineSyncError):
    """The connected role lacks a privilege this operation needs (SQLSTATE 42501)."""

    sqlstate = "42501"


class NotInstalled(MachineSyncError):
    """machine-sync's schema, view or functions are missing: run the migrations."""


class ConcurrentUpdate(MachineSyncError):
    """A deadlock, serialization failure, lock timeout or endless contention: retry."""


class DatabaseError(MachineSyncError):
    """Any other error reported by PostgreSQL; ``sqlstate`` says which."""


class MigrationError(MachineSyncError):
    """The migration runner refused to act, or a migration failed."""


class MigrationsNotFound(MigrationError):
    """The migrations folder, or a down file needed to revert, does not exist."""


class MigrationLocked(MigrationError):
    """Another runner held the migration lock for longer than the wait allowed."""


class ChecksumMismatch(MigrationError):
    """An applied migration file was edited since; ``names`` lists the files."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


class MigrationFailed(MigrationError):
    """A migration file raised an error; it was rolled back, earlier files stay applied."""

    def __init__(self, message: str, *, migration: str, sqlstate: str | None) -> None:
        super().__init__(message, sqlstate=sqlstate)
        self.migration = migration


_UNREACHABLE_STATES = {"57P01", "57P02", "57P03", "53300"}  # shutdown, too many clients
# undefined table, schema, function, column
_NOT_INSTALLED_STATES = {"42P01", "3F000", "42883", "42703"}


class ExitCode(IntEnum):
    """What ``machine-sync`` exits with (every command, the demo and bench too)."""

    OK = 0
    FINDING = 1  # drift exists / migrations not up to date
    BAD_INPUT = 2  # also what typer uses for usage errors
    UNREACHABLE = 3
    FAILED = 4
    INTERRUPTED = 130  # the shell's code for SIGINT


def one_line(text: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(text.split())


def describe(exc: psycopg.Error) -> str:
    """PostgreSQL's message plus its hint, on one line."""
    diag = exc.diag
    primary = diag.message_primary or str(exc) or type(exc).__name__
    hint = diag.message_hint
    return one_line(f"{primary} (hint: {hint})" if hint else primary)


def translate(exc: psycopg.Error, *, machine_id: UUID | None = None) -> MachineSyncError:
    """Map a psycopg error to the machine_sync error a caller can act on."""
    state = exc.sqlstate
    message = describe(exc)
    if isinstance(exc, psycopg.InterfaceError) or (
        isinstance(exc, psycopg.OperationalError)
        and (state is None or state.startswith("08") or state in _UNREACHABLE_STATES)
    ):
        # libpq's connection messages span lines and name host and port only
        # (never the password), so they are safe and useful to show.
        return DatabaseUnreachable(f"cannot reach the database: {one_line(str(exc))}")
    if state == "23514" and exc.diag.constraint_name == "machines_status_allowed":
        return InvalidStatus(message, sqlstate=state)
    if state == "P0002":
        return UnknownMachine(machine_id, message)
    if state == "MS001":
        return DirectWriteRefused(message, sqlstate=state)
    if state == "42501":
        return PermissionDenied(
            f"{message}: connect as a role with this privilege (the table owner or service_role)",
            sqlstate=state,
        )
    primary = exc.diag.message_primary or ""
    if state in _NOT_INSTALLED_STATES and (
        "machine_sync" in message
        # A legacy database lacks machines' new columns; an empty one, the tables.
        or any(table in primary for table in ("machines", "machine_state", "failure_"))
    ):
        return NotInstalled(
            f"{primary or message}: machine-sync is not installed here; "
            "run `machine-sync migrate apply`",
            sqlstate=state,
        )
    if state == "22023":
        return InvalidArgument(message, sqlstate=state)
    # Deadlock, serialization failure, or a lock wait capped by lock_timeout
    # (compat caps a legacy write's waits): all rolled back, all retryable.
    if state in ("40001", "40P01", "55P03"):
        return ConcurrentUpdate(
            f"{message}; the transaction was rolled back, retry it", sqlstate=state
        )
    return DatabaseError(f"{message} (SQLSTATE {state})", sqlstate=state)
