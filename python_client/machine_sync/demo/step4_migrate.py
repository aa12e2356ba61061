"""Step 4: apply the migrations with psql, one file at a time, as an operator would."""

from __future__ import annotations

import time

from machine_sync import workload as wl
from machine_sync._queries import query
from machine_sync.resources import migrations_dir

from .options import DemoError
from .session import DemoSession


def migrate(session: DemoSession) -> None:
    """Apply every migration with psql; the drift before and after."""
    session.out.step(4, "Apply the migrations with psql")
    files = sorted(migrations_dir().glob("[0-9]*_*.sql"))
    if not files:
        raise DemoError(f"no migrations found in {migrations_dir()}")
    with session.connect() as conn:
        before = {
            "production": sum(wl.drift(conn, "legacy", session.production_ids).values()),
            "workload": sum(wl.drift(conn, "legacy", session.workload_ids).values()),
        }
    applied = []
    for path in files:
        began = time.monotonic()
        output = session.psql_file(session.workspace.dsn, path, csv=True)
        applied.append(
            {"file": path.name, "seconds": round(time.monotonic() - began, 3), "output": output}
        )
    with session.connect() as conn:
        remaining = wl.drift(conn, "migrated")
        row = conn.execute(
            wl.statement("agreeing_machines"), {"ids": session.production_ids}
        ).fetchone()
        agreeing = row[0] if row else 0
        mode_row = conn.execute(query("mode").text).fetchone()
    session.summary["migrations"] = applied
    session.summary["after_migration"] = {
        "machines": len(session.production_ids),
        "agreeing": agreeing,
        "drifted_machines": sum(remaining.values()),
        "mode": mode_row[0] if mode_row else None,
    }
    session.summary["migration_repair"] = {
        "database_machines": len(session.production_ids) + len(session.workload_ids),
        "drifted_before": before,
    }
    _explain_drift(session, before)
    session.out.say(
        f"  After it: machine_sync.drift has {sum(remaining.values())} rows (all "
        f"{len(session.production_ids) + len(session.workload_ids)} machines); production machines "
        f"with an agreeing state row: {agreeing} of {len(session.production_ids)}; mode "
        f"{session.summary['after_migration']['mode']}"
    )


def _explain_drift(session: DemoSession, before: dict[str, int]) -> None:
    production, workload = len(session.production_ids), len(session.workload_ids)
    drifted = before["production"] + before["workload"]
    session.out.say(
        f"  Before it, this database held {production + workload} machines: production's "
        f"{production} ({before['production']} disagreeing) and the workload's {workload} "
        f"from step 3 ({before['workload']} disagreeing), {drifted} disagreeing in all."
    )
