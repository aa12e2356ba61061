"""`machine-sync bench` (work in progress in this session)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `bench` command to the machine-sync command line."""

    @app.command("bench")
    def _placeholder() -> None:
        raise typer.Exit(code=2)
