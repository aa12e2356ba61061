"""The one implementation behind :class:`~machine_sync.client.Client` and
:class:`~machine_sync.client.AsyncClient`, free of I/O.

For every operation this module says which query to send with which
parameters (:class:`Request`) and what the answer means (:func:`read_transition`
and friends): a result, a typed error, or "run it again". The two client
classes only carry requests over a connection, sync or async, so they cannot
disagree about rules, results or errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from machine_sync._queries import Query, query
from machine_sync.errors import (
    ConcurrentUpdate,
    InvalidArgument,
    InvalidTransition,
    MachineBusy,
    NotCurrentProcess,
    PermissionDenied,
    UnknownMachine,
)

Row = Mapping[str, Any]
Operation = Literal["start", "complete", "fail", "stop", "set"]

#: How often a transition is sent when concurrent writers keep overtaking it
#: (see the ``stale`` outcome in queries.sql). Twice is the normal worst case.
MAX_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class MachineState:
    """A machine's ``machine_state`` row: the mirror of its ``machines`` row."""

    current_state: str
    process_id: UUID | None
    is_failure_mode: bool
    failure_description: str | None
    failure_component: UUID | None
    state_since: datetime


@dataclass(frozen=True, slots=True)
class Machine:
    """One machine as written (by an operation) or as stored (by get/list).

    ``state`` is the mirrored ``machine_state`` row. After an operation it is
    what the mirror trigger wrote in the same statement. From :meth:`get` and
    :meth:`list` it is the stored row, or None when the row is missing (drift)
    or hidden from this role by row-level security.
    """

    id: UUID
    serial_number: str
    location: str
    lab_name: str
    status: str
    current_process_id: UUID | None
    failure_description: str | None
    failure_component: UUID | None
    updated_at: datetime
    state: MachineState | None


@dataclass(frozen=True, slots=True)
class DriftRow:
    """One row of ``machine_sync.drift``: a machine whose two rows disagree."""

    machine_id: UUID
    problem: str
    status: str | None
    current_state: str | None
    current_process_id: UUID | None
    process_id: UUID | None
    is_failure_mode: bool | None
    failure_description: str | None
    state_failure_description: str | None
    failure_component: UUID | None
    state_failure_component: UUID | None


@dataclass(frozen=True, slots=True)
class ModeChange:
    """The machine-sync mode before and after :meth:`set_mode`."""

    previous: str
    current: str


@dataclass(frozen=True, slots=True)
class Request:
    """One query to send and the parameters to send with it."""

    query: Query
    params: dict[str, Any]
    machine_id: UUID | None = None
    operation: Operation | None = None
    process_id: UUID | None = None


def as_uuid(value: UUID | str, what: str) -> UUID:
    """``value`` as a UUID, or InvalidArgument naming ``what``."""
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            pass
    raise InvalidArgument(f"{what} must be a UUID, got {value!r}")


def _optional_uuid(value: UUID | str | None, what: str) -> UUID | None:
    return None if value is None else as_uuid(value, what)


def _transition(
    operation: Operation,
    machine_id: UUID | str,
    *,
    status: str,
    process_id: UUID | None = None,
    failure_description: str | None = None,
    failure_component: UUID | None = None,
) -> Request:
    machine = as_uuid(machine_id, "machine_id")
    transition = query("transition")
    params = transition.bind(
        operation=operation,
        machine_id=machine,
        status=status,
        process_id=process_id,
        failure_description=failure_description,
        failure_component=failure_component,
    )
    return Request(transition, params, machine, operation, process_id)


def start(machine_id: UUID | str, process_id: UUID | str) -> Request:
    """Request for :meth:`Client.start_process`."""
    process = as_uuid(process_id, "process_id")
    return _transition("start", machine_id, status="processing", process_id=process)


def complete(machine_id: UUID | str, process_id: UUID | str | None) -> Request:
    """Request for :meth:`Client.complete_process`."""
    process = _optional_uuid(process_id, "process_id")
    return _transition("complete", machine_id, status="idle", process_id=process)


def stop(machine_id: UUID | str, process_id: UUID | str | None) -> Request:
    """Request for :meth:`Client.stop_process`."""
    process = _optional_uuid(process_id, "process_id")
    return _transition("stop", machine_id, status="idle", process_id=process)


def fail(
    machine_id: UUID | str,
    message: str,
    component: UUID | str | None,
    process_id: UUID | str | None,
) -> Request:
    """Request for :meth:`Client.fail_process`."""
    if not isinstance(message, str) or not message.strip():
        raise InvalidArgument("fail_process needs a non-empty message saying what failed")
    return _transition(
        "fail",
        machine_id,
        status="error",
        process_id=_optional_uuid(process_id, "process_id"),
        failure_description=message,
        failure_component=_optional_uuid(component, "component"),
    )


def set_status(machine_id: UUID | str, status: str) -> Request:
    """Request for :meth:`Client.set_status`."""
    if not isinstance(status, str):
        raise InvalidArgument(f"status must be a string, got {status!r}")
    return _transition("set", machine_id, status=status)


def get(machine_id: UUID | str) -> Request:
    """Request for :meth:`Client.get`."""
    machine = as_uuid(machine_id, "machine_id")
    get_machine = query("get_machine")
    return Request(get_machine, get_machine.bind(machine_id=machine), machine)


def simple(name: str, **params: Any) -> Request:
    """Request for a query that needs no checks of its own (list, drift, mode...)."""
    named = query(name)
    return Request(named, named.bind(**params))


def set_mode(mode: str) -> Request:
    """Request for :meth:`Client.set_mode`."""
    if not isinstance(mode, str):
        raise InvalidArgument(f"mode must be 'compat' or 'strict', got {mode!r}")
    return simple("set_mode", mode=mode)


def _state(row: Row) -> MachineState | None:
    if not row["has_state"]:
        return None
    return MachineState(
        current_state=row["current_state"],
        process_id=row["process_id"],
        is_failure_mode=row["is_failure_mode"],
        failure_description=row["state_failure_description"],
        failure_component=row["state_failure_component"],
        state_since=row["state_since"],
    )


def machine(row: Row) -> Machine:
    """A :class:`Machine` from a row of get_machine, list_machines or transition."""
    return Machine(
        id=row["id"],
        serial_number=row["serial_number"],
        location=row["location"],
        lab_name=row["lab_name"],
        status=row["status"],
        current_process_id=row["current_process_id"],
        failure_description=row["failure_description"],
        failure_component=row["failure_component"],
        updated_at=row["updated_at"],
        state=_state(row),
    )


def read_get(request: Request, rows: Sequence[Row]) -> Machine:
    """The answer to :func:`get`."""
    if not rows:
        raise UnknownMachine(request.machine_id)
    return machine(rows[0])


def read_transition(request: Request, rows: Sequence[Row]) -> Machine | None:
    """The answer to a transition: the machine as written, an error, or None to resend."""
    row = rows[0]  # the query always answers one row
    outcome = row["outcome"]
    if outcome == "unknown":
        raise UnknownMachine(request.machine_id)
    if outcome == "refused":
        raise _refusal(request, row)
    if outcome == "stale":
        return None
    if not row["written"]:
        raise PermissionDenied(
            f"machine {request.machine_id} was not written: a row-level security policy or "
            "another trigger on public.machines skipped the update"
        )
    return machine(row)


def gave_up(request: Request) -> ConcurrentUpdate:
    """The error when :data:`MAX_ATTEMPTS` sends all met a concurrent writer."""
    return ConcurrentUpdate(
        f"machine {request.machine_id} was changed by other writers during each of "
        f"{MAX_ATTEMPTS} attempts to {request.operation} it; try again"
    )


def _current(status: str, process_id: UUID | None) -> str:
    if process_id is None:
        return f"it is {status} with no current process"
    return f"it is {status} with process {process_id}"


def _refusal(request: Request, row: Row) -> InvalidTransition:
    status: str = row["previous_status"]
    current_process: UUID | None = row["previous_process_id"]
    machine_id = request.machine_id
    operation = request.operation
    assert machine_id is not None
    assert operation is not None

    def details(error: type[InvalidTransition], message: str) -> InvalidTransition:
        return error(
            message,
            machine_id=machine_id,
            operation=operation,
            status=status,
            process_id=current_process,
        )

    now = _current(status, current_process)
    if operation == "start":
        if status == "processing":
            return details(
                MachineBusy,
                f"machine {machine_id} is busy: it is processing process {current_process}; "
                f"process {request.process_id} was not started",
            )
        return details(
            InvalidTransition,
            f"cannot start process {request.process_id} on machine {machine_id}: {now}, and "
            "a process starts only from idle or offline (set_status(machine_id, 'idle') first)",
        )
    if operation == "set":
        requested = row["requested_status"]
        instead = (
            "start_process(machine_id, process_id)"
            if requested == "processing"
            else "fail_process(machine_id, message)"
        )
        return details(
            InvalidTransition,
            f"set_status cannot set machine {machine_id} to {requested!r}: use {instead}, "
            "which records the process or the failure too",
        )
    if request.process_id is None:
        return details(
            InvalidTransition,
            f"cannot {operation} the process of machine {machine_id}: {now}, and only a "
            "processing machine has a process to end",
        )
    return details(
        NotCurrentProcess,
        f"cannot {operation} process {request.process_id} on machine {machine_id}: it is not the "
        f"machine's current process ({now})",
    )


def drift_row(row: Row) -> DriftRow:
    """A :class:`DriftRow` from a row of the drift query."""
    return DriftRow(**row)
