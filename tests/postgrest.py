"""Statements as PostgREST sends them, in its transaction shape.

PostgREST logs in as authenticator and, per request, opens a transaction,
switches role and claims with set_config(..., true), applies the role's
statement_timeout itself (SET ROLE does not apply role settings), runs one
statement whose result is a count and a JSON array of the returned rows,
and commits.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

# The legacy production users: every legacy machine has this admin.
ASSIGNED = uuid.UUID("00000000-0000-4000-b000-000000000001")
LEGACY_MACHINE = "00000000-0000-4000-8000-{:012d}"

KEYS = {"machines": "id", "machine_state": "machine_id"}


@contextmanager
def request(
    conn: psycopg.Connection[Any], role: str = "authenticated", sub: uuid.UUID | None = ASSIGNED
) -> Iterator[psycopg.Connection[Any]]:
    """One PostgREST request: BEGIN, role and claims, the statement(s), COMMIT.

    On an error the transaction is rolled back and the error raised.
    """
    assert not conn.autocommit
    claims = json.dumps({"sub": str(sub) if sub else None, "role": role})
    try:
        conn.execute(
            "SELECT set_config('role', %s, true), set_config('request.jwt.claims', %s, true),"
            " set_config('statement_timeout', '8s', true),"
            " set_config('search_path', '\"public\", \"extensions\"', true)",
            [role, claims],
        )
        yield conn
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


def patch(
    conn: psycopg.Connection[Any], table: str, machine_id: Any, body: dict[str, Any]
) -> list[dict[str, Any]]:
    """PATCH /table?key=eq.machine_id with a JSON body, Prefer: return=representation."""
    columns = ", ".join(f'"{column}" = _."{column}"' for column in body)
    key = KEYS[table]
    row = conn.execute(
        f"""WITH pgrst_source AS (
                UPDATE "public"."{table}" SET {columns}
                FROM (SELECT * FROM json_populate_recordset(NULL::"public"."{table}", %s)) _
                WHERE "public"."{table}"."{key}" = %s
                RETURNING "public"."{table}".*
            )
            SELECT count(pgrst_source), coalesce(json_agg(pgrst_source), '[]')
            FROM pgrst_source""",
        [json.dumps([body], default=str), machine_id],
    ).fetchone()
    assert row is not None
    count, rows = row
    assert count == len(rows)
    return list(rows)


def upsert(conn: psycopg.Connection[Any], table: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST /table with Prefer: resolution=merge-duplicates (an upsert)."""
    names = ", ".join(f'"{column}"' for column in body)
    updates = ", ".join(f'"{column}" = excluded."{column}"' for column in body)
    row = conn.execute(
        f"""WITH pgrst_source AS (
                INSERT INTO "public"."{table}" ({names})
                SELECT {names} FROM json_populate_recordset(NULL::"public"."{table}", %s) _
                ON CONFLICT ("{KEYS[table]}") DO UPDATE SET {updates}
                RETURNING "public"."{table}".*
            )
            SELECT count(pgrst_source), coalesce(json_agg(pgrst_source), '[]')
            FROM pgrst_source""",
        [json.dumps([body], default=str)],
    ).fetchone()
    assert row is not None
    return list(row[1])


def rpc(conn: psycopg.Connection[Any], function: str, **arguments: Any) -> Any:
    """POST /rpc/function with named arguments."""
    named = ", ".join(f'"{name}" := %({name})s' for name in arguments)
    row = conn.execute(
        f'SELECT "public"."{function}"({named})',
        arguments,
    ).fetchone()
    assert row is not None
    return row[0]
