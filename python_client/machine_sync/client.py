"""The machine-sync client: every machine state change is one statement.

:class:`Client` (psycopg ``Connection`` or ``psycopg_pool.ConnectionPool``) and
:class:`AsyncClient` (``AsyncConnection`` or ``AsyncConnectionPool``) have the
same methods with the same signatures; both are thin carriers around
``machine_sync._core``, which decides what to send and what the answer means,
so the two cannot drift apart (a test compares their signatures too).

Each operation is one ``UPDATE public.machines ... RETURNING`` inside one
statement (queries.sql, ``transition``): the row is locked, the transition
rules are checked against the locked row, the update is made, the mirror
trigger writes ``machine_state`` in the same statement, and the result carries
both. One round trip on an autocommit connection; no read-then-write.
When another writer commits to the same machine while the statement waits for
its row lock and the new write keeps the status unchanged, the statement writes
nothing and is sent once more (see ``stale`` in queries.sql).

Allowed transitions (anything else raises :class:`InvalidTransition`):

==================================  ===========================================  =================
operation                           allowed when the machine is                  writes
==================================  ===========================================  =================
``start_process(m, P)``             idle or offline (processing:                 processing, P
                                    :class:`MachineBusy`)
``complete_process(m, P)``          processing with current process P            idle, no process
``stop_process(m, P)``              processing with current process P            idle, no process
``fail_process(m, msg, c)``         any status                                   error, msg, c
``fail_process(..., process_id=P)`` current process is P                         error, msg, c
``set_status(m, s)``                any status; s may not be processing or       s, no process
                                    error (they need a process or a message)
==================================  ===========================================  =================

Every write also clears the failure fields except ``fail_process``, and the
database sets ``updated_at`` (and ``state_since`` when the status changes).

Connections: the client never opens one. Given a connection, it runs on it as
it is: an autocommit connection commits each operation at once; otherwise the
operation joins the open transaction and the caller commits. Given a pool, it
borrows a connection per call; create the pool with
``kwargs={"autocommit": True}`` for one round trip per call (without it psycopg
adds ``BEGIN`` and ``COMMIT``). No query sets session state, so PgBouncer in
transaction mode and prepared statements both work.

Privileges: ``SELECT, UPDATE`` on ``public.machines``, ``SELECT`` on
``public.machine_state`` (visible through RLS, as for the table owner or
Supabase's ``service_role``), ``EXECUTE`` on ``machine_sync.normalize_status``
and ``canonical_status`` (granted to everyone by the migrations).
"""

from __future__ import annotations

import builtins
from typing import Any, TypeAlias
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from machine_sync import _core
from machine_sync._core import DriftRow, Machine, MachineState, ModeChange
from machine_sync.errors import translate

__all__ = [
    "AsyncClient",
    "AsyncSource",
    "Client",
    "DriftRow",
    "Machine",
    "MachineState",
    "ModeChange",
    "Source",
]

#: What :class:`Client` runs on.
Source: TypeAlias = "psycopg.Connection[Any] | ConnectionPool[Any]"
#: What :class:`AsyncClient` runs on.
AsyncSource: TypeAlias = "psycopg.AsyncConnection[Any] | AsyncConnectionPool[Any]"


def _fetch(conn: psycopg.Connection[Any], request: _core.Request) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(request.query.text, request.params or None)
        return cur.fetchall()


async def _afetch(
    conn: psycopg.AsyncConnection[Any], request: _core.Request
) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
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
            raise translate(exc, machine_id=request.machine_id) from exc

    def _transition(self, request: _core.Request) -> Machine:
        for _attempt in range(_core.MAX_ATTEMPTS):
            written = _core.read_transition(request, self._run(request))
            if written is not None:
                return written
        raise _core.gave_up(request)

    def start_process(self, machine_id: UUID | str, process_id: UUID | str) -> Machine:
        """Start run ``process_id`` on an idle or offline machine; returns it as written.

        Raises :class:`~machine_sync.errors.MachineBusy` (naming the running
        process) when it is processing, :class:`~machine_sync.errors.InvalidTransition`
        from error or maintenance, :class:`~machine_sync.errors.UnknownMachine`.
        """
        return self._transition(_core.start(machine_id, process_id))

    def complete_process(
        self, machine_id: UUID | str, process_id: UUID | str | None = None
    ) -> Machine:
        """Mark run ``process_id`` finished: the machine goes back to idle.

        Refused with :class:`~machine_sync.errors.NotCurrentProcess` unless the
        machine is processing exactly ``process_id``, so a late completion of an
        old run never ends the run that replaced it. Without ``process_id`` it
        ends whatever run is current (refused with
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

        Allowed from any status. With ``process_id``, only while that run is the
        machine's current process (else :class:`~machine_sync.errors.NotCurrentProcess`).
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
        """Set any status but processing and error (operator override); clears the process.

        ``status`` is trimmed, lower-cased and aliases are resolved by the
        database; an unknown one raises :class:`~machine_sync.errors.InvalidStatus`
        naming the allowed statuses.
        """
        return self._transition(_core.set_status(machine_id, status))

    def get(self, machine_id: UUID | str) -> Machine:
        """The machine and its stored machine_state row; UnknownMachine if there is none."""
        request = _core.get(machine_id)
        return _core.read_get(request, self._run(request))

    def drift(self) -> builtins.list[DriftRow]:
        """Rows of ``machine_sync.drift``: machines whose two rows disagree (normally none)."""
        return [_core.drift_row(row) for row in self._run(_core.simple("drift"))]

    def reconcile(self) -> int:
        """Repair all drift from machines (``machine_sync.reconcile()``); how many were fixed."""
        repaired: int = self._run(_core.simple("reconcile"))[0]["repaired"]
        return repaired

    def mode(self) -> str:
        """The machine-sync mode: ``'compat'`` or ``'strict'``."""
        current: str = self._run(_core.simple("mode"))[0]["mode"]
        return current

    def set_mode(self, mode: str) -> ModeChange:
        """Switch to ``'compat'`` or ``'strict'`` (InvalidArgument otherwise)."""
        row = self._run(_core.set_mode(mode))[0]
        return ModeChange(previous=row["previous_mode"], current=row["current_mode"])

    def list(self) -> builtins.list[Machine]:
        """Every machine with its stored machine_state row, by serial number."""
        return [_core.machine(row) for row in self._run(_core.simple("list_machines"))]


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
            raise translate(exc, machine_id=request.machine_id) from exc

    async def _transition(self, request: _core.Request) -> Machine:
        for _attempt in range(_core.MAX_ATTEMPTS):
            written = _core.read_transition(request, await self._run(request))
            if written is not None:
                return written
        raise _core.gave_up(request)

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
        return [_core.drift_row(row) for row in await self._run(_core.simple("drift"))]

    async def reconcile(self) -> int:
        """See :meth:`Client.reconcile`."""
        repaired: int = (await self._run(_core.simple("reconcile")))[0]["repaired"]
        return repaired

    async def mode(self) -> str:
        """See :meth:`Client.mode`."""
        current: str = (await self._run(_core.simple("mode")))[0]["mode"]
        return current

    async def set_mode(self, mode: str) -> ModeChange:
        """See :meth:`Client.set_mode`."""
        row = (await self._run(_core.set_mode(mode)))[0]
        return ModeChange(previous=row["previous_mode"], current=row["current_mode"])

    async def list(self) -> builtins.list[Machine]:
        """See :meth:`Client.list`."""
        return [_core.machine(row) for row in await self._run(_core.simple("list_machines"))]
