"""Step 1: production's schema and data, before machine-sync, loaded with psql."""

from __future__ import annotations

from machine_sync import workload as wl
from machine_sync.resources import fixture

from .session import DemoSession


def load_production(session: DemoSession) -> None:
    """Create the legacy schema and production-shaped data; remember its machines."""
    session.out.step(1, "Production's schema and data, before machine-sync (psql)")
    for path in (fixture("legacy_schema.sql"), fixture("legacy_data.sql")):
        session.psql_file(session.workspace.dsn, path)
    with session.connect() as conn:
        rows = conn.execute(wl.statement("list_machine_ids"))
        session.production_ids = [row[0] for row in rows]
