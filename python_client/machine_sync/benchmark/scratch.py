"""The scratch place the benchmark writes to, and the data it loads there.

The benchmark never touches the user's tables. On a server where the role may
``CREATE DATABASE`` it makes a scratch database, applies the real migrations
there (so the real triggers are measured) and drops it at the end. Where it may
not (a managed database, a restricted role), it applies the same migrations
rewritten into scratch schemas of the given database (the migrations' own
records, ``machine_sync_revert`` and ``machine_sync_installed``, included),
checks in the same transaction that the user's ``public`` and ``machine_sync*``
schemas did not change, and drops the scratch schemas at the end.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg.conninfo import make_conninfo

from ..resources import migrations_dir
from . import queries as q
from .queries import Schemas, query

ScratchMode = Literal["auto", "database", "schemas"]
_TRANSACTION_LINE = re.compile(r"^(BEGIN|COMMIT);\s*$", re.MULTILINE)
APPLICATION_NAME = "machine-sync-bench"


class BenchError(RuntimeError):
    """The benchmark cannot run or its results cannot be trusted; the message says why."""


@dataclass(frozen=True)
class Scratch:
    """Where the benchmark's tables are: a database and the schema names in it."""

    dsn: str  # connection string to the database that holds the scratch objects
    schemas: Schemas
    description: str  # for the report: "scratch database x" / "scratch schemas a, b, c in y"

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """An autocommit connection to the scratch database, for $n placeholders."""
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("application_name", APPLICATION_NAME)
        # queries.sql uses PostgreSQL's own $1 placeholders: send them as they are.
        kwargs.setdefault("cursor_factory", psycopg.RawCursor)
        return psycopg.connect(self.dsn, **kwargs)


@contextmanager
def scratch_place(dsn: str, mode: ScratchMode = "auto", *, keep: bool = False) -> Iterator[Scratch]:
    """Yield an installed scratch place on the server of ``dsn``; remove it afterwards."""
    suffix = secrets.token_hex(4)
    with psycopg.connect(dsn, autocommit=True, application_name=APPLICATION_NAME) as admin:
        home = admin.execute(query("database_name", Schemas())).fetchone()
        assert home is not None
        if mode != "schemas":
            name = f"machine_sync_bench_{suffix}"
            try:
                admin.execute(q.naming(q.CREATE_DATABASE, name))
            except psycopg.errors.InsufficientPrivilege as err:
                if mode == "database":
                    raise BenchError(f"cannot create a scratch database: {err}") from None
            else:
                place = Scratch(
                    make_conninfo(dsn, dbname=name), Schemas(), f"scratch database {name}"
                )
                try:
                    install(place)
                    yield place
                finally:
                    if not keep:
                        drop_database(admin, name)
                return
        schemas = Schemas.scratch(f"msbench_{suffix}")
        place = Scratch(
            dsn,
            schemas,
            f"scratch schemas {', '.join(schemas.all())} in database {home[0]} "
            "(this role may not CREATE DATABASE)",
        )
        try:
            install(place)
            yield place
        finally:
            if not keep:
                for schema in reversed(schemas.all()):
                    admin.execute(q.naming(q.DROP_SCHEMA, schema))


def drop_database(admin: psycopg.Connection[Any], name: str) -> None:
    """Drop a throwaway database and the mirror role its migration made for
    it (a role is the cluster's: DROP DATABASE leaves it). A role another
    database uses too, or that this role may not drop, stays."""
    found = psycopg.RawCursor(admin).execute(query("mirror_roles_of_database", Schemas()), [name])
    roles = [row[0] for row in found.fetchall()]
    admin.execute(q.naming(q.DROP_DATABASE, name))
    for role in roles:
        with suppress(
            psycopg.errors.DependentObjectsStillExist, psycopg.errors.InsufficientPrivilege
        ):
            admin.execute(q.naming(q.DROP_ROLE, role))


def _migrations() -> list[Path]:
    return sorted(migrations_dir().glob("[0-9]*_*.sql"))


def install(place: Scratch) -> None:
    """Apply every migration, then the benchmark's own objects (setup.sql)."""
    schemas = place.schemas
    shipped = Schemas()  # the user's own schemas, as the migrations name them
    untouched = [shipped.tables, shipped.sync, shipped.revert, shipped.installed]
    with place.connect() as conn:
        if schemas.relocated:
            with conn.transaction():
                for schema in schemas.all():
                    conn.execute(q.naming(q.CREATE_SCHEMA, schema))
        for path in _migrations():
            # Each migration is one BEGIN ... COMMIT; run its body in a
            # transaction of ours so the check below can still roll it back.
            body, replaced = _TRANSACTION_LINE.subn("", path.read_text())
            if replaced != 2:
                raise BenchError(f"{path.name}: expected one BEGIN; and one COMMIT; line")
            with conn.transaction():
                fingerprint: list[tuple[Any, ...]] = []
                if schemas.relocated:
                    conn.execute(query("set_search_path", schemas), [schemas.tables])
                    fingerprint = conn.execute(
                        query("catalog_fingerprint", schemas), [untouched]
                    ).fetchall()
                conn.execute(q.relocate(body, schemas))
                if (
                    schemas.relocated
                    and fingerprint
                    != conn.execute(query("catalog_fingerprint", schemas), [untouched]).fetchall()
                ):
                    raise BenchError(
                        f"{path.name}, relocated to scratch schemas, changed objects in "
                        "public or machine_sync; rolled back"
                    )
        if schemas.relocated:
            # The mirror runs as the database's mirror role (made by the
            # migrations): it must reach the relocated tables' schema.
            with conn.transaction():
                found = conn.execute(q.naming(q.MIRROR_ROLE, schemas.sync)).fetchone()
                assert found is not None
                conn.execute(q.naming(q.GRANT_MIRROR_USAGE, schemas.tables, found[0]))
        with conn.transaction():
            conn.execute(q.setup_script(schemas))


def load(place: Scratch, machines: int) -> None:
    """Replace the data with ``machines`` idle machines, the same in every table."""
    schemas = place.schemas
    with place.connect() as conn:
        with conn.transaction():
            conn.execute(query("empty_tables", schemas))
            conn.execute(query("populate_machines", schemas), [machines])
            for name in (
                "copy_floor_machines",
                "copy_legacy_machines",
                "copy_legacy_machine_state",
                "copy_minimal_machines",
                "copy_minimal_machine_state",
            ):
                conn.execute(query(name, schemas))
        vacuum(conn, schemas)


def vacuum(conn: psycopg.Connection[Any], schemas: Schemas) -> None:
    """VACUUM (ANALYZE) every benchmark table, so each group starts equal."""
    conn.execute(query("vacuum_tables", schemas))
