"""Load the named queries of ``queries.sql``.

The file keeps SQL readable and lintable: sqlfluff parses ``:name``
placeholders, not psycopg's ``%(name)s``, so the loader rewrites one into the
other. It skips string literals, quoted identifiers, comments, dollar-quoted
bodies and ``::`` casts, and doubles literal ``%`` signs in queries that take
parameters (psycopg reads ``%`` as the start of a placeholder there).
Not supported, because queries.sql does not use them: ``E'...'`` strings with
backslash escapes and nested block comments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any, LiteralString

_HEADER = re.compile(r"^-- name: (?P<name>[a-z_]+)\s*$", re.MULTILINE)
_TOKEN = re.compile(
    r"""
      '(?:[^']|'')*'                              # string literal
    | "(?:[^"]|"")*"                              # quoted identifier
    | --[^\n]*                                    # line comment
    | /\*.*?\*/                                   # block comment
    | \$\$.*?\$\$                                # dollar-quoted text
    | \$(?P<tag>[A-Za-z_]\w*)\$.*?\$(?P=tag)\$    # ... with a tag
    | ::                                          # cast, not a placeholder
    | :(?P<param>[A-Za-z_]\w*)                    # placeholder
    | %                                           # literal percent sign
    """,
    re.VERBOSE | re.DOTALL,
)


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


def _convert(body: str) -> tuple[str, frozenset[str]]:
    params: set[str] = set()

    def swap(match: re.Match[str]) -> str:
        token = match.group(0)
        if match.group("param"):
            params.add(match.group("param"))
            return f"%({match.group('param')})s"
        return "%%" if token == "%" else token

    converted = _TOKEN.sub(swap, body)
    if not params:
        return body, frozenset()  # sent without parameters: psycopg leaves % alone
    return converted, frozenset(params)


def parse(source: str) -> dict[str, Query]:
    """Split a queries file into its named queries."""
    queries: dict[str, Query] = {}
    headers = list(_HEADER.finditer(source))
    for index, header in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(source)
        block = source[header.end() : end].strip()
        comment = [line for line in block.splitlines() if line.startswith("--")]
        description = comment[0].removeprefix("--").strip() if comment else ""
        text, params = _convert(block)
        name = header.group("name")
        if name in queries:
            raise ValueError(f"queries.sql defines {name} twice")
        # The text comes from a file shipped inside the package, never from a
        # caller: it is as trusted as a literal in the source code (mypy reads
        # LiteralString as str, so no cast is needed to say so).
        queries[name] = Query(name, description, text, params)
    return queries


@cache
def queries() -> Mapping[str, Query]:
    """Every query of the package's queries.sql, by name."""
    return parse(files("machine_sync").joinpath("queries.sql").read_text(encoding="utf-8"))


def query(name: str) -> Query:
    """The query called ``name`` in queries.sql."""
    return queries()[name]
