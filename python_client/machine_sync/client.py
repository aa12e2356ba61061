"""The machine-sync client: every machine state change is one plain UPDATE.

:class:`Client` (psycopg ``Connection`` or ``psycopg_pool.ConnectionPool``) and
:class:`AsyncClient` (``AsyncConnection`` or ``AsyncConnectionPool``) have the
same methods with the same signatures; both are thin carriers around
``machine_sync._core``, which decides what to send and what the answer means,
so the two cannot drift apart (a test compares their signatures too).

The rules live in the database. Each operation is one ``UPDATE
public.machines ... RETURNING`` (queries.sql); the trigger on machines
normalizes the status, checks the transition (machine_sync.allowed_transition),
refuses a busy machine, and writes ``machine_state`` inside the same
statement. A refusal is the database's own error, mapped by SQLSTATE to a
typed exception (errors.py). One round trip on an autocommit connection.

=====================================  ======================  ======================
operation                              the UPDATE writes       refused by
=====================================  ======================  ======================
``start_process(m, P)``                processing, P           the database: MS002
                                                               (:class:`MachineBusy`),
                                                               MS003
``complete_process(m[, P])``,          idle, P (the database   the database: MS005
``stop_process(m[, P])``               ends run P)             (:class:`NotCurrentProcess`),
                                                               MS003; without P:
                                                               WHERE status is
                                                               processing
``fail_process(m, msg, c[, P])``       error, msg, c, P        the database: MS005,
                                                               MS003
``set_status(m, s)``                   s as given              the database: 23514,
                                                               MS003
=====================================  ======================  ======================

Complete, stop and fail name the run they end (``P``, or the current run when
it is omitted); the database ends it when it is the machine's current run and
refuses otherwise, so a late completion of an old run never ends the run that
replaced it. Only an UPDATE that returns no row (no machine this role may
write, or a stop without ``P`` of a machine that is not processing) takes one
small SELECT more to say which: :class:`~machine_sync.errors.UnknownMachine`;
:class:`~machine_sync.errors.InvalidTransition` (not processing; or processing
now, either started by another writer since or past a trigger that skipped the
row, which the SELECT cannot tell apart: ending "the current run" now could end
a run the call never saw);
:class:`~machine_sync.errors.PermissionDenied` (an UPDATE policy narrower than
the SELECT one, or a trigger that skipped the row). That SELECT locks the row
as the UPDATE would, without waiting (so it holds the row until an open
transaction ends): a row another transaction is writing right then gives a
:class:`~machine_sync.errors.ConcurrentUpdate`. Nothing is retried: a
ConcurrentUpdate (``retryable``) is the caller's to send again.

Results: the returned ``machines`` row, and the ``machine_state`` row the
trigger wrote for it, read from that row by the mirror's contract (``state_since``
is ``status_since``). The database sets ``updated_at`` and ``status_since``.

Connections: the client never opens one. Given a connection, it runs on it as
it is: an autocommit connection commits each operation at once; otherwise the
operation joins the open transaction and the caller commits (a refusal, being
the database's error, aborts that transaction: wrap a call that may be refused
in a savepoint, ``conn.transaction()``). In pipeline mode
(``conn.pipeline()``) each call ends with a Sync, so on an autocommit
connection what it returns is committed whatever the pipeline does next; a
call after a failed statement the pipeline has not synced yet raises
:class:`~machine_sync.errors.DatabaseError` and runs nothing. Given a pool, it
borrows a connection per call; create the pool with
``kwargs={"autocommit": True}`` for one round trip per call (without it psycopg
adds ``BEGIN`` and ``COMMIT``). No query sets session state, so PgBouncer in
transaction mode and prepared statements both work.

Privileges: ``SELECT, UPDATE`` on ``public.machines``, ``SELECT`` on
``public.machine_state`` for :meth:`Client.get` and :meth:`Client.list`
(visible through RLS, as for the table owner or Supabase's ``service_role``).
"""

from __future__ import annotations

import builtins
from contextlib import AsyncExitStack, ExitStack
from typing import Any, TypeAlias
from uuid import UUID

import psycopg
from psycopg import pq
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from machine_sync import _core
from machine_sync._core import DriftRow, Machine, MachineState, ModeChange, ReconcileRow
from machine_sync.errors import MachineSyncError, earlier_statement_failed, translate

__all__ = [
    "AsyncClient",
    "AsyncSource",
    "Client",
    "DriftRow",
    "Machine",
    "MachineState",
    "ModeChange",
    "ReconcileRow",
    "Source",
]

#: What :class:`Client` runs on.
Source: TypeAlias = "psycopg.Connection[Any] | ConnectionPool[Any]"
#: What :class:`AsyncClient` runs on.
AsyncSource: TypeAlias = "psycopg.AsyncConnection[Any] | AsyncConnectionPool[Any]"


def _translate(exc: psycopg.Error, request: _core.Request) -> MachineSyncError:
    # Every query the client sends names only machine-sync's objects.
    return translate(
        exc,
        machine_id=request.machine_id,
        process_id=request.process_id,
        component_id=request.component_id,
        operation=request.operation,
        ours=True,
    )


def _in_pipeline(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    return conn.pgconn.pipeline_status != pq.PipelineStatus.OFF


def _fetch(conn: psycopg.Connection[Any], request: _core.Request) -> list[dict[str, Any]]:
    # In pipeline mode a result arrives before the server has committed it:
    # on an autocommit connection the statements up to the next Sync are one
    # transaction, and a later one's failure would undo what was reported.
    # A nested pipeline block ends with a Sync, so the call returns committed.
    # Entering it first syncs what the caller queued before: an error then is
    # the caller's statement's, not this call's (which was not sent).
    with ExitStack() as stack:
        if _in_pipeline(conn):
            try:
                stack.enter_context(conn.pipeline())
            except psycopg.Error as exc:
                raise earlier_statement_failed(exc) from exc
        cur = stack.enter_context(conn.cursor(row_factory=dict_row))
        cur.execute(request.query.text, request.params or None)
        return cur.fetchall()


async def _afetch(
    conn: psycopg.AsyncConnection[Any], request: _core.Request
) -> list[dict[str, Any]]:
    async with AsyncExitStack() as stack:
        if _in_pipeline(conn):
            try:
                await stack.enter_async_context(conn.pipeline())
            except psycopg.Error as exc:
                raise earlier_statement_failed(exc) from exc
        cur = await stack.enter_async_context(conn.cursor(row_factory=dict_row))
        await cur.execute(request.query.text, request.params or None)
        return await cur.fetchall()


class Client:
    """Machine state changes and reads over a psycopg connection or pool (sync)."""

    def __init__(self, source: Source) -> None:
        """Use ``source`` for every call; the client never opens connections itself."""
        if not isinstance(source, psycopg.Connection | ConnectionPool):
            raise TypeError(
                f"Client needs a psycopg Connection or ConnectionPool, got {type(source).__name__}"
                " (use AsyncClient for async connections and pools)"
            )
        self._source = source

    def _run(self, request: _core.Request) -> list[dict[str, Any]]:
        try:
            if isinstance(self._source, ConnectionPool):
                with self._source.connection() as conn:
                    return _fetch(conn, request)
            return _fetch(self._source, request)
        except psycopg.Error as exc:
            raise _translate(exc, request) from exc

    def _transition(self, request: _core.Request) -> Machine:
        written = _core.read_written(self._run(request))
        if written is None:
            raise _core.refusal(request, self._run(_core.classify(request)))
        return written

    def start_process(self, machine_id: UUID | str, process_id: UUID | str) -> Machine:
        """Start run ``process_id``; returns the machine as written.

        The database decides (default rules: from idle or offline). It raises
        :class:`~machine_sync.errors.MachineBusy` (MS002, naming the running
        process) when another run holds the machine,
        :class:`~machine_sync.errors.InvalidTransition` (MS003) when the rules
        refuse the change, :class:`~machine_sync.errors.UnknownProcess` when a
        legacy database's process_executions lacks the run. Starting the run
        that is already current changes nothing.
        """
        return self._transition(_core.start(machine_id, process_id))

    def complete_process(
        self, machine_id: UUID | str, process_id: UUID | str | None = None
    ) -> Machine:
        """Mark run ``process_id`` finished: the machine goes back to idle.

        The database refuses it with :class:`~machine_sync.errors.NotCurrentProcess`
        (MS005) unless the machine is processing exactly ``process_id``, so a
        late completion of an old run never ends the run that replaced it. Without
        ``process_id`` it ends whatever run is current (refused with
        :class:`~machine_sync.errors.InvalidTransition` unless processing):
        pass the id whenever the caller knows it.
        """
        return self._transition(_core.complete(machine_id, process_id))

    def fail_process(
        self,
        machine_id: UUID | str,
        message: str,
        component: UUID | str | None = None,
        *,
        process_id: UUID | str | None = None,
    ) -> Machine:
        """Put the machine in error with ``message`` (and the failed ``component``).

        The database's rules decide (default: from any status); it ends the
        run. With ``process_id``, only while that run is the machine's current
        process (else :class:`~machine_sync.errors.NotCurrentProcess`, MS005).
        The message is stored as given: legacy code prefixed it with
        ``"Recipe execution error: "``.
        """
        return self._transition(_core.fail(machine_id, message, component, process_id))

    def stop_process(self, machine_id: UUID | str, process_id: UUID | str | None = None) -> Machine:
        """Abort run ``process_id``: the machine goes back to idle.

        Same rule as :meth:`complete_process`: only the machine's current run.
        """
        return self._transition(_core.stop(machine_id, process_id))

    def set_status(self, machine_id: UUID | str, status: str) -> Machine:
        """Set ``status`` (operator override), as any other writer would.

        The database trims, lower-cases and resolves aliases; an unknown status
        raises :class:`~machine_sync.errors.InvalidStatus` (23514) naming the
        allowed ones; a change its rules refuse raises
        :class:`~machine_sync.errors.InvalidTransition` (MS003), processing
        among them (it needs a run: use :meth:`start_process`). Leaving
        processing ends the run; leaving error clears the failure; prefer
        :meth:`fail_process` for error, which records why.
        """
        return self._transition(_core.set_status(machine_id, status))

    def get(self, machine_id: UUID | str) -> Machine:
        """The machine and its stored machine_state row; UnknownMachine if there is none."""
        request = _core.get(machine_id)
        return _core.read_get(request, self._run(request))

    def drift(self) -> builtins.list[DriftRow]:
        """Rows of ``machine_sync.drift``: machines whose two rows disagree (normally none)."""
        return [_core.drift_row(row) for row in self._run(_core.read_request("drift"))]

    def reconcile(self) -> builtins.list[ReconcileRow]:
        """Repair all drift from machines (``machine_sync.reconcile_v1()``).

        One row per drifted machine: ``repaired``, or the ``reason`` it could not
        be (a status outside the vocabulary, say). Empty when nothing drifted.
        """
        return [_core.reconcile_row(row) for row in self._run(_core.read_request("reconcile"))]

    def mode(self) -> str:
        """The machine-sync mode: ``'compat'`` or ``'strict'``."""
        current: str = self._run(_core.read_request("mode"))[0]["mode"]
        return current

    def set_mode(self, mode: str) -> ModeChange:
        """Switch to ``'compat'`` or ``'strict'`` (InvalidArgument otherwise)."""
        row = self._run(_core.set_mode(mode))[0]
        return ModeChange(previous=row["previous_mode"], current=row["current_mode"])

    def list(self) -> builtins.list[Machine]:
        """Every machine with its stored machine_state row, by serial number."""
        return [_core.machine(row) for row in self._run(_core.read_request("list_machines"))]


class AsyncClient:
    """Machine state changes and reads over a psycopg async connection or pool.

    The same methods as :class:`Client`, as coroutines; see there for each one.
    """

    def __init__(self, source: AsyncSource) -> None:
        """Use ``source`` for every call; the client never opens connections itself."""
        if not isinstance(source, psycopg.AsyncConnection | AsyncConnectionPool):
            raise TypeError(
                "AsyncClient needs a psycopg AsyncConnection or AsyncConnectionPool, got "
                f"{type(source).__name__} (use Client for sync connections and pools)"
            )
        self._source = source

    async def _run(self, request: _core.Request) -> list[dict[str, Any]]:
        try:
            if isinstance(self._source, AsyncConnectionPool):
                async with self._source.connection() as conn:
                    return await _afetch(conn, request)
            return await _afetch(self._source, request)
        except psycopg.Error as exc:
            raise _translate(exc, request) from exc

    async def _transition(self, request: _core.Request) -> Machine:
        written = _core.read_written(await self._run(request))
        if written is None:
            raise _core.refusal(request, await self._run(_core.classify(request)))
        return written

    async def start_process(self, machine_id: UUID | str, process_id: UUID | str) -> Machine:
        """See :meth:`Client.start_process`."""
        return await self._transition(_core.start(machine_id, process_id))

    async def complete_process(
        self, machine_id: UUID | str, process_id: UUID | str | None = None
    ) -> Machine:
        """See :meth:`Client.complete_process`."""
        return await self._transition(_core.complete(machine_id, process_id))

    async def fail_process(
        self,
        machine_id: UUID | str,
        message: str,
        component: UUID | str | None = None,
        *,
        process_id: UUID | str | None = None,
    ) -> Machine:
        """See :meth:`Client.fail_process`."""
        return await self._transition(_core.fail(machine_id, message, component, process_id))

    async def stop_process(
        self, machine_id: UUID | str, process_id: UUID | str | None = None
    ) -> Machine:
        """See :meth:`Client.stop_process`."""
        return await self._transition(_core.stop(machine_id, process_id))

    async def set_status(self, machine_id: UUID | str, status: str) -> Machine:
        """See :meth:`Client.set_status`."""
        return await self._transition(_core.set_status(machine_id, status))

    async def get(self, machine_id: UUID | str) -> Machine:
        """See :meth:`Client.get`."""
        request = _core.get(machine_id)
        return _core.read_get(request, await self._run(request))

    async def drift(self) -> builtins.list[DriftRow]:
        """See :meth:`Client.drift`."""
        return [_core.drift_row(row) for row in await self._run(_core.read_request("drift"))]

    async def reconcile(self) -> builtins.list[ReconcileRow]:
        """See :meth:`Client.reconcile`."""
        return [
            _core.reconcile_row(row) for row in await self._run(_core.read_request("reconcile"))
        ]

    async def mode(self) -> str:
        """See :meth:`Client.mode`."""
        current: str = (await self._run(_core.read_request("mode")))[0]["mode"]
        return current

    async def set_mode(self, mode: str) -> ModeChange:
        """See :meth:`Client.set_mode`."""
        row = (await self._run(_core.set_mode(mode)))[0]
        return ModeChange(previous=row["previous_mode"], current=row["current_mode"])

    async def list(self) -> builtins.list[Machine]:
        """See :meth:`Client.list`."""
        return [_core.machine(row) for row in await self._run(_core.read_request("list_machines"))]
