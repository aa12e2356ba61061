"""A comparable snapshot of every catalog object machine-sync owns."""

from __future__ import annotations

from typing import Any

import psycopg


# An ACL as a sorted array: the order of its items depends on the order of
# the GRANTs that made it, not on what it grants. NULL is the object's default
# ACL spelled out: a GRANT that restores the default leaves it explicit, a
# restore (pg_dump writes no GRANT for a default ACL) leaves it NULL.
def _acl(column: str, default: str | None = None) -> str:
    value = column if default is None else f"coalesce({column}, {default})"
    return f"(SELECT array_agg(i::text ORDER BY i::text) FROM unnest({value}) AS i)"


# Tables the product owns or reshapes. Foreign keys from them to tables outside
# the product (process_executions, machine_components) and RLS policies belong to
# the application and are left out, as are row-level security flags.
SNAPSHOT_QUERIES = {
    "schemas": """
        SELECT nspname, {nspacl}, obj_description(oid, 'pg_namespace')
        FROM pg_namespace WHERE nspname = 'machine_sync'""",
    "relations": """
        SELECT c.oid::regclass::text, c.relkind, {relacl}, c.reloptions::text,
               obj_description(c.oid, 'pg_class')
        FROM pg_class c
        WHERE c.relnamespace = 'machine_sync'::regnamespace
           OR c.oid IN ('public.machines'::regclass, 'public.machine_state'::regclass)""",
    "columns": """
        SELECT a.attrelid::regclass::text, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, pg_get_expr(d.adbin, d.adrelid), col_description(a.attrelid, a.attnum),
               {attacl}
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v')
          AND (c.relnamespace = 'machine_sync'::regnamespace
               OR c.oid IN ('public.machines'::regclass, 'public.machine_state'::regclass))""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint
        WHERE (connamespace = 'machine_sync'::regnamespace
               OR conrelid IN ('public.machines'::regclass, 'public.machine_state'::regclass))
          AND (contype <> 'f' OR confrelid IN ('public.machines'::regclass,
                                               'public.machine_state'::regclass)
               OR confrelid::regclass::text LIKE 'machine_sync.%%')""",
    "indexes": """
        SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid)
        FROM pg_index
        WHERE indrelid IN ('public.machines'::regclass, 'public.machine_state'::regclass)
           OR indrelid IN (SELECT oid FROM pg_class
                           WHERE relnamespace = 'machine_sync'::regnamespace)""",
    "functions": """
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid), {proacl},
               obj_description(p.oid, 'pg_proc')
        FROM pg_proc p
        WHERE p.pronamespace = 'machine_sync'::regnamespace
           OR (p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'atomic\\_%%')""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid), tgenabled
        FROM pg_trigger
        WHERE NOT tgisinternal
          AND tgrelid IN ('public.machines'::regclass, 'public.machine_state'::regclass)""",
    "views": """
        SELECT c.oid::regclass::text, pg_get_viewdef(c.oid)
        FROM pg_class c
        WHERE c.relkind = 'v' AND c.relnamespace = 'machine_sync'::regnamespace""",
}

SNAPSHOT_QUERIES = {
    name: query.replace("{nspacl}", _acl("nspacl", "acldefault('n'::\"char\", nspowner)"))
    .replace(
        "{relacl}",
        _acl(
            "c.relacl",
            "acldefault((CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END)::\"char\", c.relowner)",
        ),
    )
    .replace("{attacl}", _acl("a.attacl"))
    .replace("{proacl}", _acl("p.proacl", "acldefault('f'::\"char\", p.proowner)"))
    for name, query in SNAPSHOT_QUERIES.items()
}


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Each part sorted, so two databases compare equal exactly when they match
    (the mirror role, one per database, written as MIRROR_ROLE)."""
    if conn.execute("SELECT to_regnamespace('machine_sync') IS NULL").fetchone() == (True,):
        raise AssertionError("machine-sync is not installed in this database")
    found = conn.execute("SELECT machine_sync.mirror_role()").fetchone()
    assert found is not None
    mirror = found[0]

    def general(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(mirror, "MIRROR_ROLE")
        if isinstance(value, list):
            return [general(item) for item in value]
        return value

    return {
        name: sorted(
            (tuple(general(v) for v in row) for row in conn.execute(query).fetchall()), key=repr
        )
        for name, query in SNAPSHOT_QUERIES.items()
    }


def data(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the product's tables, for idempotency checks."""
    tables = [
        "public.machines",
        "public.machine_state",
        "machine_sync.allowed_status",
        "machine_sync.status_alias",
        "machine_sync.settings",
    ]
    return {table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() for table in tables}
