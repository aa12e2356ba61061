"""The benchmark's SQL, loaded by name, and moved into scratch schemas when needed.

All statements live in ``queries.sql`` and ``setup.sql`` beside this module.
They name three schemas: ``public`` and ``machine_sync`` (as the real
migrations do) and ``machine_sync_bench`` (the twins); the migrations name two
more, ``machine_sync_revert`` and ``machine_sync_installed`` (what the down
migration restores, what ``migrate verify`` compares with). In a scratch
database those names are used as they are; in scratch schemas of the user's own
database :func:`relocate` rewrites them, and the migrations too, so that nothing
in the user's ``public`` or ``machine_sync*`` schemas is read or written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from typing import Final, LiteralString

from psycopg import sql

from machine_sync._queries import named

# The schema names the shipped SQL uses, in the form the rewrite matches.
_QUALIFIED_PUBLIC = re.compile(r"\bpublic\.")
_SYNC_SCHEMA = re.compile(r"\bmachine_sync\b")
_BENCH_SCHEMA = re.compile(r"\bmachine_sync_bench\b")
_RECORD_SCHEMA = re.compile(r"\bmachine_sync_(revert|installed)\b")


@dataclass(frozen=True)
class Schemas:
    """Where the benchmark's three groups of objects live."""

    tables: str = "public"  # machines and machine_state, as the migrations make them
    sync: str = "machine_sync"  # the migrations' internal schema
    twins: str = "machine_sync_bench"  # floor and legacy twins, the stored procedure
    revert: str = "machine_sync_revert"  # the migrations' record for the down migration
    installed: str = "machine_sync_installed"  # the migrations' record of their definitions

    @classmethod
    def scratch(cls, prefix: str) -> Schemas:
        """Fresh schema names starting with ``prefix`` (a lowercase identifier)."""
        return cls(
            tables=prefix,
            sync=f"{prefix}_sync",
            twins=f"{prefix}_twins",
            revert=f"{prefix}_revert",
            installed=f"{prefix}_installed",
        )

    @property
    def relocated(self) -> bool:
        """True when the names differ from the ones the shipped SQL uses."""
        return self != Schemas()

    def all(self) -> list[str]:
        """Every schema name, the tables' first."""
        return [self.tables, self.sync, self.revert, self.installed, self.twins]


def relocate(text: str, schemas: Schemas) -> str:
    """Rewrite the shipped schema names in ``text`` to ``schemas``.

    Every object in the migrations and in this package's SQL is schema
    qualified (the functions run with ``search_path = ''``), which is what
    makes a textual rewrite sound. The result is checked: no qualified
    reference to ``public`` or to ``machine_sync`` may survive.
    """
    if not schemas.relocated:
        return text
    # Longest name first: machine_sync_bench contains machine_sync.
    placeholder = "\x00twins\x00"
    out = _BENCH_SCHEMA.sub(placeholder, text)
    records = {"revert": schemas.revert, "installed": schemas.installed}
    out = _RECORD_SCHEMA.sub(lambda found: records[found.group(1)], out)
    out = _SYNC_SCHEMA.sub(schemas.sync, out)
    out = _QUALIFIED_PUBLIC.sub(f"{schemas.tables}.", out)
    out = out.replace(placeholder, schemas.twins)
    leftover = (
        _QUALIFIED_PUBLIC.search(out) or _SYNC_SCHEMA.search(out) or _RECORD_SCHEMA.search(out)
    )
    if leftover is not None:  # pragma: no cover - guards future SQL changes
        raise ValueError(f"cannot relocate SQL safely: {leftover.group(0)!r} remains")
    return out


def _text(name: str) -> str:
    try:
        return named("machine_sync.benchmark", "queries.sql")[name].text
    except KeyError:
        raise KeyError(f"no query named {name!r} in queries.sql") from None


def query(name: str, schemas: Schemas) -> str:
    """The statement called ``name`` in ``queries.sql``."""
    return relocate(_text(name), schemas)


def on_tables(name: str, machines: str, machine_state: str, schemas: Schemas) -> str:
    """Query ``name``, written for the legacy twins, sent to another pair of tables.

    The legacy statements are the same text whichever pair they hit; a query
    that names no legacy twin is returned as it is.
    """
    text = _text(name).replace("machine_sync_bench.legacy_machine_state", machine_state)
    text = text.replace("machine_sync_bench.legacy_machines", machines)
    return relocate(text, schemas)


def on_real_tables(name: str, schemas: Schemas) -> str:
    """Query ``name``, written for the legacy twins, sent to the migrated
    ``machines`` and ``machine_state`` (where compat mode carries them
    through the triggers)."""
    return on_tables(name, "public.machines", "public.machine_state", schemas)


def setup_script(schemas: Schemas) -> str:
    """``setup.sql``: the twin tables and helper functions, as one script."""
    text = files("machine_sync.benchmark").joinpath("setup.sql").read_text(encoding="utf-8")
    return relocate(text, schemas)


# Statements whose only variable part is an identifier we generate (the
# benchmark's and the demo's throwaway databases and schemas); they are
# composed with psycopg.sql.Identifier, never with string formatting.
CREATE_DATABASE: Final = "CREATE DATABASE {}"
DROP_DATABASE: Final = "DROP DATABASE IF EXISTS {} WITH (FORCE)"
DROP_ROLE: Final = "DROP ROLE IF EXISTS {}"
CREATE_SCHEMA: Final = "CREATE SCHEMA {}"
DROP_SCHEMA: Final = "DROP SCHEMA IF EXISTS {} CASCADE"
MIRROR_ROLE: Final = "SELECT {}.mirror_role()"
GRANT_MIRROR_USAGE: Final = "GRANT USAGE ON SCHEMA {} TO {}"


def naming(template: LiteralString, *names: str) -> sql.Composed:
    """``template`` with ``names`` in its ``{}``, in order, quoted as identifiers."""
    return sql.SQL(template).format(*(sql.Identifier(name) for name in names))
