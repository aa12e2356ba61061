"""Named SQL: every ``.sql`` file of queries in the package, loaded one way.

A file holds queries, each under a ``-- name: <name>`` line followed by a
one-line ``--`` description. Parameters are psycopg's own ``%(name)s`` (the
benchmark's, sent by a RawCursor and turned into pgbench scripts, are
PostgreSQL's ``$1``), so the text goes to psycopg as it is written: nothing
rewrites it. sqlfluff lints the files with the placeholder templater and
``param_style = pyformat`` (``python_client/machine_sync/.sqlfluff``). A query
that takes parameters writes a literal percent sign as psycopg wants it, or
better avoids one (``mod(a, b)`` rather than ``a % b``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any, LiteralString

_HEADER = re.compile(r"^-- name: (?P<name>\w+)\s*$", re.MULTILINE)
_PARAM = re.compile(r"%\((\w+)\)s")


@dataclass(frozen=True)
class Query:
    """One named query: its text for psycopg and the parameters it takes."""

    name: str
    description: str
    text: LiteralString
    params: frozenset[str]

    def bind(self, **values: Any) -> dict[str, Any]:
        """The parameter mapping for this query; refuses missing or unknown names."""
        if set(values) != self.params:
            raise TypeError(f"query {self.name} takes {sorted(self.params)}, got {sorted(values)}")
        return values


def parse(source: str) -> dict[str, Query]:
    """Split a queries file into its named queries (text without the final ``;``)."""
    queries: dict[str, Query] = {}
    headers = list(_HEADER.finditer(source))
    for header, following in zip(headers, [*headers[1:], None], strict=True):
        end = following.start() if following is not None else len(source)
        text = source[header.end() : end].strip().removesuffix(";")
        comment = text.splitlines()[0] if text.startswith("--") else ""
        name = header.group("name")
        if name in queries:
            raise ValueError(f"{name} is defined twice")
        # The text comes from a file shipped inside the package, never from a
        # caller: it is as trusted as a literal in the source code (mypy reads
        # LiteralString as str, so no cast is needed to say so).
        queries[name] = Query(
            name, comment.removeprefix("--").strip(), text, frozenset(_PARAM.findall(text))
        )
    return queries


@cache
def named(package: str, filename: str) -> Mapping[str, Query]:
    """Every query of ``filename`` in ``package``, by name."""
    return parse(files(package).joinpath(filename).read_text(encoding="utf-8"))


def queries() -> Mapping[str, Query]:
    """Every query of the client's and the runner's queries.sql, by name."""
    return named("machine_sync", "queries.sql")


def query(name: str) -> Query:
    """The query called ``name`` in queries.sql."""
    return queries()[name]
