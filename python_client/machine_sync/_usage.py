"""The click classes typer builds on (usage errors, commands), wherever typer keeps click.

Newer typer releases carry their own copy of click (``typer._click``); older
ones use the ``click`` package. Either way these are the classes its parser raises.
"""

from __future__ import annotations

try:
    from typer._click.core import Command, Context
    from typer._click.exceptions import (
        ClickException,
        NoArgsIsHelpError,
        NoSuchOption,
        UsageError,
    )
except ImportError:  # typer before it vendored click
    from click.core import Command, Context  # type: ignore[assignment]
    from click.exceptions import (  # type: ignore[assignment]
        ClickException,
        NoArgsIsHelpError,
        NoSuchOption,
        UsageError,
    )

__all__ = [
    "ClickException",
    "Command",
    "Context",
    "NoArgsIsHelpError",
    "NoSuchOption",
    "UsageError",
]
