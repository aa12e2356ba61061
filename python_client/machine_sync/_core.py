"""The one implementation behind :class:`~machine_sync.client.Client` and
:class:`~machine_sync.client.AsyncClient`, free of I/O.

For every operation this module says which query to send with which
parameters (:class:`Request`) and what the answer means (:func:`read_written`
and friends): a result, or, when an UPDATE wrote no row, which query says why
(:func:`classify`) and what its answer means (:func:`refusal`). The
rules themselves are the database's; nothing here decides whether a change is
allowed. The two client classes only carry requests over a connection, sync or
async, so they cannot disagree about results or errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from functools import cache
from typing import Any, Literal
from uuid import UUID

from machine_sync._queries import Query, query
from machine_sync.errors import (
    InvalidArgument,
    InvalidTransition,
    MachineSyncError,
    PermissionDenied,
    UnknownMachine,
)

Row = Mapping[str, Any]
Operation = Literal["start", "complete", "fail", "stop", "set"]


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
    read from the written machines row by the mirror's contract (current_state
    = status, process_id = current_process_id, is_failure_mode = status is
    error, the same failure fields, state_since = status_since): the trigger
    wrote it in the same statement. From :meth:`get` and :meth:`list` it is the
    stored row, or None when the row is missing (drift) or hidden from this
    role by row-level security.
    """

    id: UUID
    serial_number: str
    location: str
    lab_name: str
    status: str
    current_process_id: UUID | None
    failure_description: str | None
    failure_component: UUID | None
    status_since: datetime
    updated_at: datetime
    state: MachineState | None


@dataclass(frozen=True, slots=True)
class DriftRow:
    """One row of ``machine_sync.drift``: a machine whose two rows disagree.

    ``status_since`` (of ``machines``) and ``state_since`` (of ``machine_state``)
    are read beside the view, which compares them without showing them: a
    ``value_mismatch`` may lie in the clocks alone. None where the row is
    missing."""

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
    status_since: datetime | None
    state_since: datetime | None


@dataclass(frozen=True, slots=True)
class ReconcileRow:
    """One row of ``machine_sync.reconcile_v1()``: a drifted machine, repaired or why not."""

    machine_id: UUID
    problem: str
    repaired: bool
    reason: str | None


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
    component_id: UUID | None = None


def as_uuid(value: UUID | str, what: str) -> UUID:
    """``value`` as a UUID, or InvalidArgument naming ``what``."""
    if isinstance(value, UUID):
        return value
    # Python's UUID() takes any Unicode digit ('\u0660' * 32 is the nil
    # UUID); PostgreSQL takes ASCII hex only, and so does the client.
    if isinstance(value, str) and value.isascii():
        try:
            return UUID(value)
        except ValueError:
            pass
    raise InvalidArgument(f"{what} must be a UUID, got {quoted(value)}")


def quoted(value: object) -> str:
    """``value`` for an error message: its repr, at most 40 characters of it."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"


def _text(value: str, what: str) -> str:
    """``value``, or InvalidArgument when PostgreSQL's text cannot hold it (NUL)."""
    if "\x00" in value:
        raise InvalidArgument(
            f"{what} contains a NUL character (0x00), which PostgreSQL text cannot hold:"
            f" {quoted(value)}"
        )
    return value


def _optional_uuid(value: UUID | str | None, what: str) -> UUID | None:
    return None if value is None else as_uuid(value, what)


#: The machines columns a state change returns: the fields of :class:`Machine`.
WRITTEN_COLUMNS = tuple(f.name for f in fields(Machine) if f.name != "state")


@cache
def _returning(name: str) -> Query:
    """State change ``name`` of queries.sql with its RETURNING clause (WRITTEN_COLUMNS)."""
    named = query(name)
    columns = ", ".join(f"m.{column}" for column in WRITTEN_COLUMNS)
    return replace(named, text=f"{named.text}\nRETURNING {columns}")


def _write(
    name: str, operation: Operation, machine: UUID, process: UUID | None, **params: Any
) -> Request:
    named = _returning(name)
    return Request(named, named.bind(machine_id=machine, **params), machine, operation, process)


def start(machine_id: UUID | str, process_id: UUID | str) -> Request:
    """Request for :meth:`Client.start_process`."""
    machine = as_uuid(machine_id, "machine_id")
    process = as_uuid(process_id, "process_id")
    return _write("start_process", "start", machine, process, process_id=process)


def complete(machine_id: UUID | str, process_id: UUID | str | None) -> Request:
    """Request for :meth:`Client.complete_process`."""
    machine = as_uuid(machine_id, "machine_id")
    process = _optional_uuid(process_id, "process_id")
    return _write("end_process", "complete", machine, process, process_id=process)


def stop(machine_id: UUID | str, process_id: UUID | str | None) -> Request:
    """Request for :meth:`Client.stop_process`."""
    machine = as_uuid(machine_id, "machine_id")
    process = _optional_uuid(process_id, "process_id")
    return _write("end_process", "stop", machine, process, process_id=process)


def fail(
    machine_id: UUID | str,
    message: str,
    component: UUID | str | None,
    process_id: UUID | str | None,
) -> Request:
    """Request for :meth:`Client.fail_process`."""
    machine = as_uuid(machine_id, "machine_id")
    if not isinstance(message, str) or not message.strip():
        raise InvalidArgument("fail_process needs a non-empty message saying what failed")
    _text(message, "message")
    process = _optional_uuid(process_id, "process_id")
    failed = _optional_uuid(component, "component")
    request = _write(
        "fail_process",
        "fail",
        machine,
        process,
        process_id=process,
        failure_description=message,
        failure_component=failed,
    )
    return replace(request, component_id=failed)


def set_status(machine_id: UUID | str, status: str) -> Request:
    """Request for :meth:`Client.set_status`."""
    machine = as_uuid(machine_id, "machine_id")
    if not isinstance(status, str):
        raise InvalidArgument(f"status must be a string, got {quoted(status)}")
    _text(status, "status")
    return _write("set_status", "set", machine, None, status=status)


def get(machine_id: UUID | str) -> Request:
    """Request for :meth:`Client.get`."""
    machine = as_uuid(machine_id, "machine_id")
    get_machine = query("get_machine")
    return Request(get_machine, get_machine.bind(machine_id=machine), machine)


def read_request(name: str, **params: Any) -> Request:
    """Request for a query that needs no checks of its own (list, drift, mode...)."""
    named = query(name)
    return Request(named, named.bind(**params))


def set_mode(mode: str) -> Request:
    """Request for :meth:`Client.set_mode`."""
    if not isinstance(mode, str):
        raise InvalidArgument(f"mode must be 'compat' or 'strict', got {quoted(mode)}")
    return read_request("set_mode", mode=_text(mode, "mode"))


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


def _machine(row: Row, state: MachineState | None) -> Machine:
    return Machine(
        id=row["id"],
        serial_number=row["serial_number"],
        location=row["location"],
        lab_name=row["lab_name"],
        status=row["status"],
        current_process_id=row["current_process_id"],
        failure_description=row["failure_description"],
        failure_component=row["failure_component"],
        status_since=row["status_since"],
        updated_at=row["updated_at"],
        state=state,
    )


def machine(row: Row) -> Machine:
    """A :class:`Machine` from a row of get_machine or list_machines (both tables as stored)."""
    return _machine(row, _state(row))


def mirrored(row: Row) -> MachineState:
    """The machine_state row the trigger wrote for this machines row, by the contract."""
    return MachineState(
        current_state=row["status"],
        process_id=row["current_process_id"],
        is_failure_mode=row["status"] == "error",
        failure_description=row["failure_description"],
        failure_component=row["failure_component"],
        state_since=row["status_since"],
    )


def read_get(request: Request, rows: Sequence[Row]) -> Machine:
    """The answer to :func:`get`."""
    if not rows:
        raise UnknownMachine(request.machine_id)
    return machine(rows[0])


def read_written(rows: Sequence[Row]) -> Machine | None:
    """The machine a state change wrote, or None when it wrote no row (then classify)."""
    if not rows:
        return None
    row = rows[0]
    return _machine(row, mirrored(row))


def classify(request: Request) -> Request:
    """The one read that says why ``request`` wrote no row (refusals only)."""
    named = query("classify")
    return Request(
        named,
        named.bind(machine_id=request.machine_id, ends_current=_ends_current(request)),
        request.machine_id,
        request.operation,
        request.process_id,
    )


def _ends_current(request: Request) -> bool:
    """Whether ``request`` completes or stops whatever run is current (no run id)."""
    return request.operation in ("complete", "stop") and request.process_id is None


def refusal(request: Request, rows: Sequence[Row]) -> MachineSyncError:
    """Why a state change wrote no row, from the answer to :func:`classify`."""
    machine_id = request.machine_id
    operation = request.operation
    assert machine_id is not None
    assert operation is not None
    if not rows:
        return UnknownMachine(machine_id)
    status: str = rows[0]["status"]
    current: UUID | None = rows[0]["current_process_id"]
    now = (
        f"its status is {status}, with no current process"
        if current is None
        else f"its status is {status}, with process {current}"
    )
    ends_current = _ends_current(request)
    if ends_current and status != "processing":
        return InvalidTransition(
            f"cannot {operation} the process of machine {machine_id}: {now}, and only a "
            "processing machine has a process to end",
            machine_id=machine_id,
            operation=operation,
            status=status,
            process_id=current,
        )
    if not rows[0]["writable"]:
        return PermissionDenied(
            f"machine {machine_id} was not written ({now}): a row-level security policy lets "
            "this role see it but not update it"
        )
    if ends_current:
        # Processing now, and its UPDATE wrote nothing: it was not processing
        # then (a writer started it in between), or a trigger skipped the
        # write; nothing here tells which. Either way ending "the current
        # run" now could end a run this call never saw: no retry.
        return InvalidTransition(
            f"cannot {operation} the process of machine {machine_id}: nothing was written "
            f"({now}): either it was not processing when this ran, and another writer has "
            "started it since, or a trigger on public.machines skipped the update; pass the "
            "run id to end a particular run",
            machine_id=machine_id,
            operation=operation,
            status=status,
            process_id=current,
        )
    return PermissionDenied(
        f"machine {machine_id} was not written ({now}): a trigger on public.machines "
        "skipped the update"
    )


def drift_row(row: Row) -> DriftRow:
    """A :class:`DriftRow` from a row of the drift query."""
    return DriftRow(**row)


def reconcile_row(row: Row) -> ReconcileRow:
    """A :class:`ReconcileRow` from a row of the reconcile query."""
    return ReconcileRow(**row)
