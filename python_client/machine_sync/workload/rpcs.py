"""The legacy RPCs, called as PostgREST calls them, checked against both tables."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from .db import machine_drifts
from .events import (
    ERROR_MESSAGE,
    Conn,
)
from .queries import statement

LEGACY_RPCS: Final = (
    "atomic_update_machine_state",
    "atomic_complete_machine_state",
    "atomic_error_machine_state",
    "atomic_processing_machine_state",
)


@dataclass(frozen=True)
class RpcCheck:
    """One legacy RPC call and whether both tables show what it returned."""

    function: str
    ok: bool
    detail: str


def exercise_legacy_rpcs(conn: Conn, machine: uuid.UUID, process: uuid.UUID) -> list[RpcCheck]:
    """Call each legacy RPC as PostgREST would and check the result and the tables."""
    steps: list[tuple[str, str, dict[str, Any], str]] = [
        (
            "atomic_processing_machine_state",
            statement("rpc_processing"),
            {"process": process},
            "processing",
        ),
        ("atomic_complete_machine_state", statement("rpc_complete"), {}, "idle"),
        ("atomic_error_machine_state", statement("rpc_error"), {"message": ERROR_MESSAGE}, "error"),
        ("atomic_update_machine_state", statement("rpc_update"), {"status": "idle"}, "idle"),
    ]
    checks = []
    for function, query, extra, expected in steps:
        try:
            row = conn.execute(query, {"machine": machine, **extra}).fetchone()
        except psycopg.Error as exc:
            checks.append(RpcCheck(function, False, " ".join(str(exc).split())))
            continue
        result: dict[str, Any] = row[0] if row else {}
        state = conn.execute(statement("state_row"), {"machine": machine}).fetchone()
        returned = (result.get("machine_state") or {}).get("current_state")
        ok = (
            result.get("success") is True
            and (result.get("machine") or {}).get("status") == expected
            and returned == expected
            and state is not None
            and state[0] == expected
            and not machine_drifts(conn, "migrated", machine)
        )
        detail = f"success={result.get('success')}, status={returned}, tables agree"
        if not ok:
            detail = f"expected {expected}: returned {result!r}, machine_state {state!r}"
        checks.append(RpcCheck(function, ok, detail))
    return checks
