"""Step 5: the same workload and faults through machine_sync.client, then the legacy
code again (compat mode), then the legacy RPCs as PostgREST calls them."""

from __future__ import annotations

from rich.table import Table

from machine_sync import workload as wl

from .session import DemoSession
from .workload_report import run_and_report


def new_workloads(session: DemoSession) -> None:
    """The client and the unchanged legacy code on the migrated database; the legacy RPCs."""
    session.out.step(5, "The same workload and faults through machine_sync.client")
    client = run_and_report(session, "client, one statement", wl.ClientPath())
    session.summary["client"] = client.to_json()
    session.out.say()
    session.out.say("  The legacy code, unchanged, against the migrated database (compat mode):")
    compat = run_and_report(session, "legacy code, compat mode", wl.LegacyPath())
    session.summary["compat"] = compat.to_json()
    session.out.say()
    with session.connect() as conn:
        machine = session.workload_ids[0]
        wl.LegacyPath().reset(conn, machine, wl.no_fault)
        process = wl.ProcessIds(session.workspace.dsn).take()
        checks = wl.exercise_legacy_rpcs(conn, machine, process)
    table = Table(title="legacy RPCs, called as PostgREST calls them", title_justify="left")
    table.add_column("function")
    table.add_column("works")
    table.add_column("detail")
    for check in checks:
        table.add_row(check.function, "[green]yes" if check.ok else "[red]no", check.detail)
    session.out.table(table)
    session.summary["rpcs"] = {
        "ok": all(check.ok for check in checks),
        "calls": {check.function: check.ok for check in checks},
    }
