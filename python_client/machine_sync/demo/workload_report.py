"""The workload table of steps 3 and 5: events by kind, what they left, what failed."""

from __future__ import annotations

from rich.table import Table

from machine_sync import workload as wl

from .session import DemoSession


def run_and_report(session: DemoSession, label: str, path: wl.WritePath) -> wl.WorkloadResult:
    """Run the workload through ``path`` with a progress bar; show its table."""
    with session.out.progress(label, session.options.duration) as update:

        def progress(elapsed: float, total: wl.EventStats) -> None:
            update(elapsed, f"{total.applied} changes, {total.left_drift} left drift")

        result = wl.run_workload(
            session.workspace.dsn,
            path,
            session.workload_ids,
            session.workload_config,
            progress=progress,
        )
    _show_table(session, result)
    return result


def _show_table(session: DemoSession, result: wl.WorkloadResult) -> None:
    if not session.legend_shown:
        session.legend_shown = True
        _legend(session)
    columns = (
        ("events", "attempted"),
        ("applied", "applied"),
        ("refused", "refused"),
        ("failed", "failed"),
        ("faulted", "faulted"),
        ("left tables disagreeing", "left_drift"),
        ("... with no fault", "left_drift_unfaulted"),
    )
    total = result.total
    table = Table(show_footer=True)
    table.add_column("event", footer="all")
    for name, attr in columns:
        table.add_column(name, justify="right", footer=str(getattr(total, attr)))
    for kind, stats in result.events.items():
        table.add_row(kind, *(str(getattr(stats, attr)) for _name, attr in columns))
    session.out.table(table)
    faults = ", ".join(f"{k} {v}" for k, v in sorted(result.faults.items())) or "none"
    errors = ", ".join(f"{k} {v}" for k, v in result.errors.most_common()) or "none"
    colour = "red" if result.drifted_machines else "green"
    session.out.say(
        f"  [{colour}]of the workload's {result.machines} machines, disagreeing at the end: "
        f"{result.drifted_machines} ({result.drift_pct:.0f}%)[/]; most disagreeing at once, "
        f"seen by a concurrent reader: {result.peak_reader_drift}; starts that succeeded "
        f"while another run still owned the machine: {result.double_starts}"
    )
    session.out.say(
        f"  [dim]faults injected: {faults} (= faulted); errors callers saw: {errors} (= failed)[/]"
    )
    if result.path == "legacy" and result.schema == "migrated":
        session.out.say(
            "  [dim]The legacy start still reads machines.status, checks it in Python, then "
            "writes; but the rules now live in the database, so when two writers both read "
            "'idle' the second write is refused (SQLSTATE MS002, machine busy) and counts "
            "as refused, not as a double start.[/]"
        )
    elif result.double_starts and result.path == "legacy":
        session.out.say(
            "  [dim]Double starts: the legacy start reads machines.status, checks it in "
            "Python, then writes, so two writers can both read 'idle' and both start. "
            "On the migrated database the trigger refuses the second start (MS002), "
            "whoever writes it.[/]"
        )
    if total.left_drift_unfaulted and result.schema == "legacy":
        session.out.say(
            "  [dim]Even without a fault the legacy paths disagree: error never clears "
            "machine_state.process_id, stop never resets machines.status, and concurrent "
            "writers interleave their statements.[/]"
        )


def _legend(session: DemoSession) -> None:
    options = session.options
    session.out.say(
        f"  [dim]Each row counts events of one kind on the workload's {options.machines} machines. "
        "events: tried; applied: wrote what they meant to; refused: the code declined and "
        "wrote nothing (a start on a machine that is not idle or offline; the client also "
        "refuses finishing a run that is no longer the machine's current one); failed: an "
        "error reached the caller; faulted: those failed events whose second write the "
        "injected fault hit (the other failures are collateral, mostly a statement_timeout "
        "while waiting for a lock a faulted event held); left tables disagreeing: applied "
        "or failed events after which that machine's two rows disagreed; ... with no "
        'fault: of those, events no fault touched. reset is the operator\'s "mark idle", '
        "run after every error and on a machine a start found stuck with no run on it.[/]"
    )
