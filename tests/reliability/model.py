"""A model of what each write means, shared by the property test and the
migration-under-load test: given the rows before a statement, the rows after
it, or the one SQLSTATE it must fail with.

The rules are the database's (v2), applied to every writer alike: the status
vocabulary and its ASCII-only folding, the transitions table, processing and
a process id going together, the busy rule, a cleared process stopping a
processing machine, leaving error clearing the failure fields. A legacy write
to machine_state (compat) is carried into machines and meets the same rules.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

ALLOWED = ("offline", "idle", "processing", "error", "maintenance")
ALIASES = {"running": "processing"}
TRIM = " \t\n\r\f\v"  # what canonical_status() trims: ASCII white space only

# machine_sync.allowed_transition as seeded: any status may go offline, idle,
# into maintenance or into error; only idle and offline may start processing.
TRANSITIONS = frozenset(
    (a, b)
    for a in ALLOWED
    for b in ALLOWED
    if a != b and (b in ("offline", "idle", "maintenance", "error") or a in ("idle", "offline"))
)

# SQLSTATEs the model predicts.
CHECK = "23514"  # unknown status
UNIQUE = "23505"
FOREIGN_KEY = "23503"
NOT_NULL = "23502"
NOT_NULL_PARAM = "22004"
INVALID_PARAM = "22023"
GUARD = "MS001"  # direct write refused (strict), state row deleted alone
BUSY = "MS002"  # the machine runs another process
RULE = "MS003"  # transition or processing/process rule refused
NOT_CURRENT = "MS005"  # a run named to end is not the machine's current one
NO_DATA = "MS004"  # legacy RPC: no such machine (or hidden)


class Refused(Exception):
    """The model's prediction that a statement fails with ``sqlstate``."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def ascii_lower(text: str) -> str:
    """Lower-case the ASCII letters only (lower(... COLLATE "C"))."""
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


def canonical(raw: str | None) -> str | None:
    if raw is None:
        return None
    spelling = ascii_lower(raw.strip(TRIM))
    if spelling in ALLOWED:
        return spelling
    return ALIASES.get(spelling)


def normalize(raw: str | None) -> str:
    status = canonical(raw)
    if status is None:
        raise Refused(CHECK)
    return status


@dataclass(frozen=True)
class Row:
    """What both tables must say about one machine."""

    status: str
    process_id: uuid.UUID | None = None
    failure_description: str | None = None
    failure_component: uuid.UUID | None = None


def proposed_machine(**values: Any) -> Row:
    """The row an INSERT INTO machines proposes, as its BEFORE INSERT trigger
    leaves it (the status spelled canonically): before the unique index is
    checked, and an upsert's ``excluded`` on a conflict."""
    return Row(**{**values, "status": normalize(values.get("status", "offline"))})


def inserted_machine(new: Row) -> Row:
    """A machine actually inserted (AFTER INSERT): its status and process agree."""
    if (new.status == "processing") == (new.process_id is None):
        raise Refused(RULE)
    return new


def insert_machine(**values: Any) -> Row:
    """INSERT INTO machines of a new machine."""
    return inserted_machine(proposed_machine(**values))


def write_machine(old: Row, **changes: Any) -> Row:
    """UPDATE machines SET ... as machine_sync.machines_sync() decides it.
    ``changes`` holds the columns the statement sets (status as spelled)."""
    new = replace(old, **changes)
    if new == old:
        return old  # no watched column changes: the trigger does not run
    was = old.status
    if "status" in changes:
        new = replace(new, status=normalize(changes["status"]))
    if new.status == "processing":
        if new.process_id is None:
            if was != "processing":
                raise Refused(RULE)
            new = replace(new, status="idle")  # the process was cleared: stopped
        elif was == "processing" and old.process_id not in (None, new.process_id):
            raise Refused(BUSY)
    elif new.process_id is not None:
        if new.process_id != old.process_id:
            raise Refused(NOT_CURRENT)
        new = replace(new, process_id=None)  # the run ends with the status it ran in
    if new.status != was and (was, new.status) not in TRANSITIONS:
        raise Refused(RULE)
    if was == "error" and new.status != "error":
        new = replace(new, failure_description=None, failure_component=None)
    return new


def write_state(old: Row, mode: str, **changes: Any) -> Row:
    """A direct UPDATE of machine_state: refused in strict; in compat its
    status is normalized and, when anything mirrored changes, the whole
    mirrored row is carried into machines, rules included."""
    if mode == "strict":
        raise Refused(GUARD)
    written = replace(old, **changes)
    written = replace(written, status=normalize(written.status))
    if written == old:
        return old  # nothing mirrored changes: machines is not written
    return write_machine(
        old,
        status=written.status,
        process_id=written.process_id,
        failure_description=written.failure_description,
        failure_component=written.failure_component,
    )


# What each statement of the legacy paths (workload.LEGACY_PATHS) writes,
# as changes to the mirrored values; "P" is the path's process id, "M" its
# failure message (the legacy error path prefixes it).
LEGACY_MACHINES_CHANGE: dict[str, dict[str, Any]] = {
    "start": {"status": "processing", "process_id": "P"},
    "complete": {"status": "idle", "process_id": None},
    "error": {"status": "error", "process_id": None},
    "stop": {"process_id": None},
}
LEGACY_STATE_CHANGE: dict[str, dict[str, Any]] = {
    "start": {
        "status": "processing",
        "process_id": "P",
        "failure_description": None,
        "failure_component": None,
    },
    "complete": {"status": "idle", "process_id": None},
    "error": {"status": "error", "failure_description": "M"},
    "stop": {"status": "idle", "process_id": None},
}


def legacy_write(
    old: Row, path: str, table: str, mode: str, process_id: uuid.UUID, message: str
) -> Row:
    """One statement of a legacy path, on an existing machine."""
    effect = (LEGACY_MACHINES_CHANGE if table == "machines" else LEGACY_STATE_CHANGE)[path]
    values = {"P": process_id, "M": "Recipe execution error: " + message}
    changes = {key: values.get(value, value) for key, value in effect.items()}
    if table == "machines":
        return write_machine(old, **changes)
    return write_state(old, mode, **changes)


def rpc_update(
    rows: dict[uuid.UUID, Row],
    machine_id: uuid.UUID | None,
    status: str | None = None,
    process_id: uuid.UUID | None = None,
    state_status: str | None = None,
    state_process_id: uuid.UUID | None = None,
    failure_mode: bool | None = None,
    description: str | None = None,
) -> None:
    """What atomic_update_machine_state does to ``rows``, in the order it
    checks (the other RPCs call it: complete with status idle, error with
    status error and the prefixed message, processing with the process)."""
    if machine_id is None:
        raise Refused(NOT_NULL_PARAM)
    # Two spellings are compared canonically (an unknown one is reported
    # as such, 23514); a single one meets the machines trigger, if the
    # machine exists.
    if (
        status is not None
        and state_status is not None
        and normalize(status) != normalize(state_status)
    ):
        raise Refused(INVALID_PARAM)
    if process_id is not None and state_process_id is not None and process_id != state_process_id:
        raise Refused(INVALID_PARAM)
    if machine_id not in rows:
        raise Refused(NO_DATA)
    old = rows[machine_id]
    raw = status if status is not None else state_status
    new = write_machine(
        old,
        status=old.status if raw is None else raw,
        process_id=process_id if process_id is not None else state_process_id,
        failure_description=description,
    )
    if failure_mode is not None and failure_mode != (new.status == "error"):
        raise Refused(INVALID_PARAM)
    rows[machine_id] = new
