"""Step 5: the same workload and faults through machine_sync.client, then the legacy
code again (compat mode), then the legacy RPCs as PostgREST calls them, then the
legacy code's statements in strict mode, the transition's end."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from rich.markup import escape
from rich.table import Table

from machine_sync import workload as wl
from machine_sync.client import Client
from machine_sync.errors import DirectWriteRefused, translate
from machine_sync.workload.events import ERROR_DESCRIPTION

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
    session.out.say()
    session.summary["strict"] = strict_mode(session)


# The legacy code's statements strict mode is shown with, in the order they
# run: a start's two writes, then an error's first (machine_state first).
STRICT_STATEMENTS: Final = (
    ("legacy_start_machines", "legacy start, 1st write: UPDATE machines"),
    ("legacy_start_state", "legacy start, 2nd write: UPDATE machine_state"),
    ("legacy_error_state", "legacy error, 1st write: UPDATE machine_state"),
)


def strict_mode(session: DemoSession) -> dict[str, Any]:
    """The transition's end: in strict mode the legacy code's writes to
    machine_state are refused (MS001) while its writes to machines, and the
    client, go on; then back to compat, which step 6 measures."""
    session.out.say("  Once no legacy writer is left, [bold]machine-sync mode strict[/]:")
    machine = session.workload_ids[0]
    outcomes: dict[str, str] = {}
    messages: dict[str, str] = {}  # each refusal's message, by SQLSTATE
    with session.connect() as conn:
        client = Client(conn)
        wl.LegacyPath().reset(conn, machine, wl.no_fault)
        client.set_mode("strict")
        try:
            process = wl.ProcessIds(session.workspace.dsn).take()
            args = {
                "machine": machine,
                "process": process,
                "now": datetime.now(UTC),
                "description": ERROR_DESCRIPTION,
            }
            for name, label in STRICT_STATEMENTS:
                try:
                    conn.execute(wl.statement(name), args)
                except psycopg.Error as exc:
                    if not isinstance(translate(exc), DirectWriteRefused):
                        raise
                    outcomes[label] = f"refused ({exc.sqlstate})"
                    messages[str(exc.sqlstate)] = str(exc.diag.message_primary)
                else:
                    outcomes[label] = "ok"
            client.complete_process(machine, process)
            outcomes["client: complete_process (UPDATE machines)"] = "ok"
            drifted = sum(wl.drift(conn, "migrated").values())
        finally:
            client.set_mode("compat")
    table = Table(title="the legacy code's statements in strict mode", title_justify="left")
    table.add_column("statement")
    table.add_column("result")
    for label, outcome in outcomes.items():
        table.add_row(label, f"[green]{outcome}" if outcome == "ok" else f"[yellow]{outcome}")
    session.out.table(table)
    for sqlstate, message in messages.items():
        session.out.say(f"  {sqlstate}: [dim]{escape(message)}[/]")
    session.out.say(
        f"  machine_sync.drift after them: {drifted} rows. Back to compat "
        "(machine-sync mode compat) for step 6, which measures the legacy code in it."
    )
    return {"outcomes": outcomes, "messages": messages, "drifted_machines": drifted}
