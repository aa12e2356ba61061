"""Reading the connection string users give in ``--dsn`` or ``DATABASE_URL``."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from machine_sync.errors import InvalidArgument, one_line


def parse_dsn(dsn: str) -> dict[str, Any]:
    """The DSN's parameters; :class:`InvalidArgument` names what is wrong with it."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise InvalidArgument(f"invalid --dsn/DATABASE_URL: {one_line(str(exc))}") from None
    # libpq parses any port text and fails later with a resolver message.
    ports = str(params.get("port") or "").split(",")
    if not all(port.strip().isdigit() for port in ports if port.strip()):
        raise InvalidArgument(
            f"invalid --dsn/DATABASE_URL: port {params['port']!r} is not a number"
        )
    return params


def given_dsn(dsn: str | None) -> str | None:
    """``--dsn`` of a command that starts its own server without one.

    None when it was left out; an empty one is refused rather than read as
    libpq's defaults (which would borrow whatever server they reach).
    """
    if dsn is not None and not dsn.strip():
        raise InvalidArgument(
            "--dsn is empty: give a connection string, or leave --dsn out for the embedded server"
        )
    return dsn
