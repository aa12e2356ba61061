"""A model of what each write means, shared by the property test and the
migration-under-load test: given the rows before a statement, the rows after
it, or the one SQLSTATE it must fail with."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

ALLOWED = ("offline", "idle", "processing", "error", "maintenance")
ALIASES = {"running": "processing"}
TRIM = " \t\n\r\f\v"  # what canonical_status() trims

# SQLSTATEs the model predicts.
CHECK = "23514"  # unknown status
UNIQUE = "23505"
FOREIGN_KEY = "23503"
NOT_NULL_PARAM = "22004"
INVALID_PARAM = "22023"
NO_DATA = "MS004"  # legacy RPC: no such machine (or hidden)
GUARD = "MS001"


class Refused(Exception):
    """The model's prediction that a statement fails with ``sqlstate``."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def canonical(raw: str | None) -> str | None:
    if raw is None:
        return None
    spelling = raw.strip(TRIM).lower()
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


def write_machine(old: Row, **changes: Any) -> Row:
    """UPDATE machines SET ... (machines_before_write, then the mirror)."""
    new = replace(old, **changes)
    if "status" in changes and changes["status"] != old.status:
        new = replace(new, status=normalize(changes["status"]))
    if old.status == "error" and new.status != "error":
        new = replace(new, failure_description=None, failure_component=None)
    return new


def write_state(old: Row, mode: str, **changes: Any) -> Row:
    """A direct UPDATE of machine_state in compat: carried into machines."""
    if mode == "strict":
        raise Refused(GUARD)
    new = replace(old, **changes)
    new = replace(new, status=normalize(new.status))
    if old.status == "error" and new.status != "error":
        new = replace(new, failure_description=None, failure_component=None)
    return new
