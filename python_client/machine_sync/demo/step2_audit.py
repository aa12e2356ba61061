"""Step 2: the drift a user sees today, in the audit's terms."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from machine_sync import workload as wl

from .output import percent
from .session import DemoSession


def audit(session: DemoSession) -> None:
    """Count missing and disagreeing state rows, the statuses seen, the legacy RPCs."""
    session.out.step(2, "The drift a user sees today (the audit's terms)")
    with session.connect() as conn:
        counts = conn.execute(wl.statement("audit_counts")).fetchone()
        problems = wl.drift(conn, "legacy")
        statuses = conn.execute(wl.statement("audit_statuses")).fetchall()
        rpcs = conn.execute(
            wl.statement("legacy_rpcs_present"), {"names": list(wl.LEGACY_RPCS)}
        ).fetchone()
    machines, state_rows = counts if counts else (0, 0)
    drifted = sum(problems.values())
    found: dict[str, Any] = {
        "machines": machines,
        "state_rows": state_rows,
        "missing_state": problems["missing_state"],
        "status_case": problems["status_case"],
        "value_mismatch": problems["value_mismatch"],
        "agreeing": machines - drifted,
        "drifted_machines": drifted,
        "drift_pct": round(100.0 * drifted / machines, 1) if machines else 0.0,
        "statuses": {f"{source}={value}": n for source, value, n in statuses},
        "legacy_rpcs_installed": rpcs[0] if rpcs else 0,
    }
    session.summary["audit"] = found
    table = Table(title="machines vs machine_state", title_justify="left")
    table.add_column("finding")
    table.add_column("machines", justify="right")
    table.add_column("share", justify="right")
    table.add_row(
        "no machine_state row",
        str(found["missing_state"]),
        percent(found["missing_state"], machines),
    )
    table.add_row(
        "state row differs only in case ('idle' vs 'IDLE')",
        str(found["status_case"]),
        f"{found['status_case']} of {state_rows} rows",
    )
    table.add_row(
        "state row with other values",
        str(found["value_mismatch"]),
        percent(found["value_mismatch"], machines),
    )
    table.add_row("[bold]agreeing", f"[bold]{found['agreeing']}", f"of {machines}")
    session.out.table(table)
    seen = ", ".join(f"{source} {value!r} x{n}" for source, value, n in statuses)
    session.out.say(f"  statuses: {seen}")
    session.out.say(
        f"  legacy RPC functions installed: {found['legacy_rpcs_installed']} of 4 "
        "(production's file never created them; deployed code falls back to two statements)"
    )
