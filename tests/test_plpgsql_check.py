"""plpgsql_check over every PL/pgSQL function a migrated database has.

sqlfluff lints the SQL around the functions but not what runs inside their
bodies; plpgsql_check compiles each body against the real catalog and reports
unknown columns, wrong types, dead code and the like. Trigger functions are
checked with the table of each trigger that calls them, as plpgsql_check needs.
It runs on Debian's PostgreSQL 15 with ``postgresql-15-plpgsql-check`` (which
``.ci/run`` installs when apt can).
"""

from __future__ import annotations

from typing import Any

import pytest

from conftest import Cluster, Database

SCHEMAS = ["machine_sync", "public"]

# (function, SQLSTATE, message) -> why this finding is accepted.
ALLOWED: dict[tuple[str, str, str], str] = {}

FUNCTIONS = """
SELECT
    p.oid,
    p.oid::regprocedure::text AS function,
    p.prorettype = 'trigger'::regtype AS is_trigger,
    t.tgrelid,
    t.tgrelid::regclass::text AS relation
FROM pg_proc AS p
INNER JOIN pg_namespace AS n ON p.pronamespace = n.oid
INNER JOIN pg_language AS l ON p.prolang = l.oid
LEFT JOIN pg_trigger AS t
    ON p.oid = t.tgfoid AND NOT t.tgisinternal AND p.prorettype = 'trigger'::regtype
WHERE
    n.nspname = ANY(%s)
    AND l.lanname = 'plpgsql'
    AND NOT EXISTS (
        SELECT FROM pg_depend AS d
        WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
    )
ORDER BY function, relation
"""

CHECK = """
SELECT level, sqlstate, message, lineno, statement, detail, hint
FROM plpgsql_check_function_tb(
    %s::regprocedure, %s::regclass,
    fatal_errors => FALSE,
    other_warnings => TRUE,
    extra_warnings => TRUE,
    performance_warnings => TRUE,
    security_warnings => TRUE
)
"""


def _require_plpgsql_check(cluster: Cluster, db: Database) -> None:
    if not cluster.label.startswith("debian-15"):
        pytest.skip(
            f"plpgsql_check runs on Debian's PostgreSQL 15, not {cluster.label} "
            "(apt-get install postgresql-15 postgresql-15-plpgsql-check; then --pg pg15)"
        )
    available = db.one("SELECT count(*) FROM pg_available_extensions WHERE name = 'plpgsql_check'")
    if not available:
        pytest.skip(
            "the plpgsql_check extension is not installed for Debian's PostgreSQL 15: "
            "apt-get install postgresql-15-plpgsql-check"
        )


def test_every_plpgsql_function_passes_plpgsql_check(cluster: Cluster, db: Database) -> None:
    _require_plpgsql_check(cluster, db)
    findings: list[str] = []
    used: set[tuple[str, str, str]] = set()
    checked: list[tuple[str, Any]] = []
    # CREATE EXTENSION plpgsql_check needs the server's superuser, not the owner.
    with db.connect(admin=True) as conn:
        conn.execute("CREATE EXTENSION plpgsql_check")
        for oid, function, is_trigger, relid, relation in conn.execute(
            FUNCTIONS, [SCHEMAS]
        ).fetchall():
            if is_trigger and relid is None:
                findings.append(f"{function}: a trigger function no trigger uses (cannot check)")
                continue
            checked.append((function, relation))
            for level, sqlstate, message, lineno, statement, detail, hint in conn.execute(
                CHECK, [oid, relid or 0]
            ).fetchall():
                key = (function, sqlstate, message)
                if key in ALLOWED:
                    used.add(key)
                    continue
                where = f" on {relation}" if relation else ""
                findings.append(
                    f"{function}{where} line {lineno} ({statement}): {level} {sqlstate} "
                    f"{message}; {detail or ''} {hint or ''}".rstrip()
                )
    # It really looked: the mirror trigger on machines and a plain function were checked.
    assert ("machine_sync.machines_sync()", "machines") in checked
    assert ("machine_sync.machine_state_direct_write()", "machine_state") in checked
    assert ("machine_sync.reconcile_v1()", None) in checked
    assert findings == [], "\n".join(findings)
    stale = [f"{key}: {why}" for key, why in ALLOWED.items() if key not in used]
    assert stale == [], "allowed findings that no longer occur: remove them"
