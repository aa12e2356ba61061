"""The errors machine_sync raises: one class per thing a caller can act on.

Everything derives from :class:`MachineSyncError`, so ``except MachineSyncError``
catches all of it. The rules live in the database: a refused write is
PostgreSQL's own error, and :func:`translate` maps it to a class by its
SQLSTATE alone (:data:`BY_SQLSTATE`, the way ``psycopg.errors`` does), never by
message text. Each class keeps the SQLSTATE in ``sqlstate`` and the psycopg
exception as ``__cause__``; its message is the database's.

=============================  ========  =========================================
class                          SQLSTATE  raised when
=============================  ========  =========================================
:class:`DirectWriteRefused`    MS001     a direct write to machine_state (strict)
:class:`MachineBusy`           MS002     a machine running process P given Q
:class:`InvalidTransition`     MS003     the transition rules refuse the change
:class:`UnknownMachine`        MS004     no machine with that id (or RLS hides it)
:class:`NotCurrentProcess`     MS005     complete/stop/fail of a run not current
:class:`InvalidStatus`         23514     a status outside machine_sync.allowed_status
:class:`UnknownProcess`        23503     a process id process_executions lacks
:class:`UnknownComponent`      23503     a failed component machine_components lacks
:class:`InvalidArgument`       22023     a bad argument (not a UUID, empty message,
                                         a NUL character PostgreSQL text cannot hold)
:class:`PermissionDenied`      42501     the role may not do this (or RLS skipped it)
:class:`ConcurrentUpdate`      55P03,    lock wait capped, deadlock, serialization
                               40P01,    failure: the transaction failed, retry it
                                         from its start (``retryable``)
                               40001
:class:`NotInstalled`          42P01,    a machine-sync table, schema, function or
                               3F000,    column is missing: run the migrations
                               42883,
                               42703
:class:`DatabaseUnreachable`   08xxx,    no connection (refused, closed, pool timeout,
                               57P0x,    a session the server ended, the server's
                               25P03,    connection slots all taken)
                               53300
:class:`DatabaseError`         other     any other PostgreSQL error
:class:`MigrationError`        (none)    the migration runner refused or failed
=============================  ========  =========================================

The UnknownMachine of a client operation comes from an UPDATE that found no
row, classified by one SELECT. ``NotInstalled`` needs to know the statement names only
machine-sync's objects (the client's statements do), so it is decided by the
caller of :func:`translate` (``ours=True``), not by parsing the message.
"""

from __future__ import annotations

import re
from typing import ClassVar
from uuid import UUID

import psycopg
import psycopg.errors

__all__ = [
    "BY_SQLSTATE",
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
    "ServerUnavailable",
    "UnknownComponent",
    "UnknownMachine",
    "UnknownProcess",
    "translate",
]


class MachineSyncError(Exception):
    """Base class of every error machine_sync raises on purpose."""

    #: The SQLSTATE when PostgreSQL raised the underlying error, else None.
    sqlstate: str | None = None
    #: Whether sending the same operation again may succeed.
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate


class DatabaseUnreachable(MachineSyncError):
    """Raised when the database cannot be reached: connection refused or lost,
    the server shutting down, too many clients, a pool that timed out, a
    session the server ended (an idle timeout, its database dropped)."""


class InvalidArgument(MachineSyncError, ValueError):
    """Raised for a malformed argument: before any I/O when the client can tell
    (not a UUID, an empty failure message), else by the database (22023, an
    unknown mode)."""

    sqlstate = "22023"


class UnknownMachine(MachineSyncError, LookupError):
    """Raised when no machine has this id, or row-level security hides it from
    this role: by the legacy RPCs (MS004), by :meth:`Client.get`, and by a state
    change whose UPDATE found no row."""

    sqlstate = "MS004"

    def __init__(
        self, machine_id: UUID | None, message: str | None = None, *, sqlstate: str | None = None
    ) -> None:
        super().__init__(
            message or f"machine {machine_id} does not exist (or this role cannot see it)",
            sqlstate=sqlstate,
        )
        self.machine_id = machine_id


class InvalidStatus(MachineSyncError, ValueError):
    """Raised when a status is neither canonical nor an alias (23514, constraint
    machines_status_allowed); the message lists the allowed ones."""

    sqlstate = "23514"


class InvalidTransition(MachineSyncError):
    """Raised when the database's transition rules refuse a change (MS003):
    a status change outside machine_sync.allowed_transition, processing without
    a process, a new machine with a process and another status.

    ``machine_id`` and ``operation`` say what was refused. ``status`` and
    ``process_id`` are the machine's values where they are known (the
    subclasses, and a refusal the client classified with a read), else None
    (the database's message says what it saw).
    """

    sqlstate: str | None = "MS003"

    def __init__(
        self,
        message: str,
        *,
        machine_id: UUID | None = None,
        operation: str | None = None,
        status: str | None = None,
        process_id: UUID | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message, sqlstate=sqlstate)
        self.machine_id = machine_id
        self.operation = operation
        self.status = status
        self.process_id = process_id


class MachineBusy(InvalidTransition):
    """Raised when a machine running process P is given another process (MS002),
    by ``start_process`` or any other writer; ``process_id`` is P, the run that
    holds the machine, as the database named it."""

    sqlstate = "MS002"


class NotCurrentProcess(InvalidTransition):
    """Raised when a write ends a run that is not the machine's current one
    (MS005): ``complete/stop/fail_process`` of run P, or any writer that
    leaves a machine in a status other than processing with a process id.
    ``status`` and ``process_id`` are what the machine is doing instead, as
    the database's message names them (``status`` is None for a stored status
    outside the vocabulary)."""

    sqlstate = "MS005"


class UnknownProcess(MachineSyncError, LookupError):
    """Raised when a process id is not in process_executions (23503: the legacy
    database's foreign key from machines.current_process_id); ``process_id``
    names it."""

    sqlstate = "23503"

    def __init__(
        self, message: str, *, process_id: UUID | None, sqlstate: str | None = None
    ) -> None:
        super().__init__(message, sqlstate=sqlstate)
        self.process_id = process_id


class UnknownComponent(MachineSyncError, LookupError):
    """Raised when a failure names a component machine_components lacks (23503:
    the legacy database's foreign key from machine_state.failure_component,
    met when the mirror writes the state row); ``component_id`` names it."""

    sqlstate = "23503"

    def __init__(
        self, message: str, *, component_id: UUID | None, sqlstate: str | None = None
    ) -> None:
        super().__init__(message, sqlstate=sqlstate)
        self.component_id = component_id


class DirectWriteRefused(MachineSyncError):
    """Raised when a direct write to machine_state is refused (MS001: strict
    mode, or a DELETE of a machine's state row): write machines instead."""

    sqlstate = "MS001"


class PermissionDenied(MachineSyncError):
    """Raised when the connected role lacks a privilege (42501), or when a
    row-level security policy or another trigger silently skipped the write."""

    sqlstate = "42501"


class NotInstalled(MachineSyncError):
    """Raised when machine-sync's schema, tables, columns or functions are
    missing (42P01, 3F000, 42883, 42703 from a statement that names only
    machine-sync's objects): run the migrations."""


class ConcurrentUpdate(MachineSyncError):
    """Raised when a statement failed because of other writers: a legacy
    write that could not lock its machine in time or a lock_timeout (55P03),
    a deadlock (40P01), a serialization failure (40001). Nothing it did
    stays: in autocommit its transaction was rolled back; in a transaction
    the caller opened, that transaction is aborted and must be rolled back.
    Retryable: the whole transaction, from its start."""

    retryable = True


class DatabaseError(MachineSyncError):
    """Raised for any other error reported by PostgreSQL; ``sqlstate`` says which."""


class MigrationError(MachineSyncError):
    """The migration runner refused to act, or a migration failed."""


class MigrationsNotFound(MigrationError):
    """The migrations folder, or a down file needed to revert, does not exist,
    or one of its files cannot be read as text."""


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


# Shutdown, too many clients, and what ends the session: its database dropped
# (57P04) or a timeout (57P05 idle session, 25P03 idle in a transaction).
_UNREACHABLE_STATES = {"57P01", "57P02", "57P03", "53300", "57P04", "57P05", "25P03"}

#: The class for each SQLSTATE PostgreSQL (or machine-sync's SQL) raises.
BY_SQLSTATE: dict[str, type[MachineSyncError]] = {
    "MS001": DirectWriteRefused,
    "MS002": MachineBusy,
    "MS003": InvalidTransition,
    "MS004": UnknownMachine,
    "MS005": NotCurrentProcess,
    "23514": InvalidStatus,
    "23503": UnknownProcess,
    "22023": InvalidArgument,
    "42501": PermissionDenied,
    "55P03": ConcurrentUpdate,
    "40P01": ConcurrentUpdate,
    "40001": ConcurrentUpdate,
}
#: SQLSTATEs that mean an object is missing: NotInstalled when the statement
#: names only machine-sync's objects.
NOT_INSTALLED_STATES = frozenset({"42P01", "3F000", "42883", "42703"})

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)

# What the database's MS005 message says the machine is doing instead: its
# status (when canonical; a status stored outside the vocabulary is quoted,
# and matches the second branch) and its run, read from the whole message.
_DOING_INSTEAD = re.compile(
    # (and "it is S with", as definitions installed before the wording changed say)
    r"^machine \S+ is not running process \S+: (?:its status is|it is)"
    r" (?:([a-z][a-z0-9_]*)|.*),? with"
    rf" (?:process ({_UUID.pattern})|no current process)$",
    re.DOTALL,
)


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server could be found or started (demo, bench, tests); the message says why."""


def one_line(text: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(text.split())


#: How much of a DETAIL :func:`describe` quotes.
DETAIL_LIMIT = 300


def earlier_statement_failed(exc: psycopg.Error) -> DatabaseError:
    """A client call in pipeline mode found that a statement the caller had
    queued before it failed: that error is the caller's, and the call's own
    statement was not sent."""
    if isinstance(exc, psycopg.errors.PipelineAborted):
        # An OperationalError, but the connection is fine: the failure was
        # seen already, and the server skips everything up to the next Sync.
        return DatabaseError(
            "not run: an earlier statement in this pipeline failed, and the server skips"
            " every statement up to the pipeline's next sync (nothing of this call was applied)"
        )
    state = f", SQLSTATE {exc.sqlstate}" if exc.sqlstate else ""
    return DatabaseError(
        f"not run: an earlier statement in this pipeline failed ({describe(exc)}{state});"
        " nothing of this call was applied"
    )


def describe(exc: psycopg.Error, *, detail: bool = False, hint: str | None = None) -> str:
    """PostgreSQL's message plus its hint, on one line; with ``detail``, its
    DETAIL as well (at most :data:`DETAIL_LIMIT` characters), which for a
    failed migration often names what stood in the way; ``hint`` replaces
    PostgreSQL's."""
    diag = exc.diag
    text = diag.message_primary or str(exc) or type(exc).__name__
    more = one_line(diag.message_detail or "") if detail else ""
    if more:
        if len(more) > DETAIL_LIMIT:
            more = more[:DETAIL_LIMIT] + f"... ({len(more)} characters)"
        text = f"{text} ({more})"
    hint = (diag.message_hint if hint is None else hint) or ""
    hint = hint.rstrip(".")
    return one_line(f"{text} (hint: {hint})" if hint else text)


def _uuids(text: str | None) -> list[UUID]:
    return [UUID(found) for found in _UUID.findall(text or "")]


def _missing_key(exc: psycopg.Error, sent: UUID | None) -> UUID | None:
    """The id a foreign key violation (23503) is about: the one sent, else the
    one its DETAIL names ("Key (...)=(id) is not present ...")."""
    if sent is not None:
        return sent
    found = _uuids(exc.diag.message_detail)
    return found[0] if found else None


def _running_process(exc: psycopg.Error, machine_id: UUID | None) -> UUID | None:
    """The run holding a busy machine: the id the database's MS002 message names.

    The message names the machine and its running process; the DETAIL names
    the refused one. The running process is the id in the message that is
    neither the machine nor the refused process.
    """
    others = {machine_id, *_uuids(exc.diag.message_detail)}
    running = [found for found in _uuids(exc.diag.message_primary) if found not in others]
    return running[-1] if running else None


def translate(
    exc: psycopg.Error,
    *,
    machine_id: UUID | None = None,
    process_id: UUID | None = None,
    component_id: UUID | None = None,
    operation: str | None = None,
    ours: bool = False,
    privileged: str = "the table owner or service_role",
) -> MachineSyncError:
    """Map a psycopg error to the machine_sync error a caller can act on.

    The class comes from the SQLSTATE alone (:data:`BY_SQLSTATE`). The
    keywords say what was attempted, to fill the error's fields: the machine,
    the process and the failed component sent, the operation; ``ours`` says
    the statement names only machine-sync's objects, so that a missing
    object means NotInstalled;
    ``privileged`` names who may do it, for a PermissionDenied.
    """
    state = exc.sqlstate
    message = describe(exc)
    if isinstance(exc, psycopg.errors.PipelineAborted):
        return earlier_statement_failed(exc)
    if (
        isinstance(exc, psycopg.InterfaceError)
        or state in _UNREACHABLE_STATES
        or (isinstance(exc, psycopg.OperationalError) and (state is None or state.startswith("08")))
    ):
        # libpq's connection messages span lines and name host and port only
        # (never the password), so they are safe and useful to show.
        return DatabaseUnreachable(f"cannot reach the database: {one_line(str(exc))}")
    if ours and state in NOT_INSTALLED_STATES:
        # (Without PostgreSQL's hint, a guess such as "Perhaps you meant to
        # reference the column s.failure_description": not what to do.)
        return NotInstalled(
            f"{describe(exc, hint='')}: machine-sync is not installed here (or not up to date); "
            "run `machine-sync migrate apply`",
            sqlstate=state,
        )
    error = BY_SQLSTATE.get(state or "", DatabaseError)
    if issubclass(error, InvalidTransition) and exc.diag.message_detail:
        message = one_line(f"{message} ({exc.diag.message_detail})")
    if issubclass(error, MachineBusy):
        return MachineBusy(
            message,
            machine_id=machine_id,
            operation=operation,
            status="processing",
            process_id=_running_process(exc, machine_id),
            sqlstate=state,
        )
    if issubclass(error, NotCurrentProcess):
        doing = _DOING_INSTEAD.match(exc.diag.message_primary or "")
        return NotCurrentProcess(
            message,
            machine_id=machine_id,
            operation=operation,
            status=doing[1] if doing else None,
            process_id=UUID(doing[2]) if doing and doing[2] else None,
            sqlstate=state,
        )
    if issubclass(error, InvalidTransition):
        return error(message, machine_id=machine_id, operation=operation, sqlstate=state)
    if issubclass(error, UnknownMachine):
        return UnknownMachine(machine_id, message, sqlstate=state)
    if issubclass(error, UnknownProcess) and exc.diag.table_name == "machines":
        named = _missing_key(exc, process_id)
        return UnknownProcess(
            f"process {named} is not in process_executions: start a run that exists ({message})",
            process_id=named,
            sqlstate=state,
        )
    if issubclass(error, UnknownProcess) and exc.diag.table_name == "machine_state":
        named = _missing_key(exc, component_id)
        return UnknownComponent(
            f"component {named} is not in machine_components: name a component that exists,"
            f" or none ({message})",
            component_id=named,
            sqlstate=state,
        )
    if issubclass(error, PermissionDenied):
        return PermissionDenied(
            f"{message}: connect as a role with this privilege ({privileged})",
            sqlstate=state,
        )
    if issubclass(error, ConcurrentUpdate):
        return ConcurrentUpdate(
            f"{message}; the transaction failed: roll it back if it is still open,"
            " then retry it from its start",
            sqlstate=state,
        )
    if error in (DatabaseError, UnknownProcess):
        return DatabaseError(f"{message} (SQLSTATE {state})", sqlstate=state)
    return error(message, sqlstate=state)
