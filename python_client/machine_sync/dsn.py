"""Reading the connection string users give in ``--dsn`` or ``DATABASE_URL``."""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from machine_sync.errors import InvalidArgument, one_line

# libpq's parse errors quote the text they stumbled on, the whole URI for some:
# where that text may hold a password, the quotes are left out of the message.
_QUOTED = re.compile(r'"[^"]*"')
_URI = re.compile(r"^\s*postgres(?:ql)?://", re.IGNORECASE)


#: Connection parameters that are secrets: never shown.
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def shown(params: dict[str, Any]) -> str:
    """The parameters as a conninfo string to print: without their secrets."""
    return make_conninfo("", **{k: v for k, v in params.items() if k not in SECRET_PARAMETERS})


def _may_hold_password(dsn: str) -> bool:
    """Whether the text names a password: a ``password`` keyword or URI parameter, or
    a URI with user information (``user:secret@``, which libpq splits at the first
    ``@`` and ``/``, so part of a password with those in it lands in host or port)."""
    return "password" in dsn.lower() or (_URI.match(dsn) is not None and "@" in dsn)


def parse_dsn(dsn: str, what: str = "--dsn/DATABASE_URL") -> dict[str, Any]:
    """The DSN's parameters; :class:`InvalidArgument` names what is wrong with it
    (and ``what`` gave it).

    No message quotes text that may be part of a password.
    """
    secret = _may_hold_password(dsn)
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        message = one_line(str(exc))
        if secret:
            message = (
                _QUOTED.sub('"..."', message) + " (quoted text left out: it may hold the password)"
            )
        raise InvalidArgument(f"invalid {what}: {message}") from None
    except UnicodeDecodeError:
        # A percent-encoded byte that is not UTF-8 (psycopg decodes what libpq
        # parsed); the decoder's message would show the byte.
        raise InvalidArgument(
            f"invalid {what}: a percent-encoded value is not UTF-8 once decoded"
        ) from None
    # libpq parses any port text and fails later with a resolver message.
    ports = str(params.get("port") or "").split(",")
    if not all(port.strip().isdigit() for port in ports if port.strip()):
        shown = "" if secret else f" {params['port']!r}"
        raise InvalidArgument(
            f"invalid {what}: port{shown} is not a number"
            + (" (is a ':' or '/' of the password not percent-encoded?)" if secret else "")
        )
    # An '@' of a password that is not percent-encoded: libpq splits user
    # information at the first one, and the rest of the password is the host,
    # which the connection's error would print.
    if _URI.match(dsn) and "@" in str(params.get("host") or ""):
        raise InvalidArgument(
            f"invalid {what}: its host contains '@': percent-encode an '@' in the"
            " user name or password as %40"
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
