"""Step 7: the summary, before and after, for production's machines and the workload."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.table import Table

from .output import percent, writers_label
from .session import DemoSession


def summary(session: DemoSession) -> None:
    """The before/after tables of the whole run; the JSON summary's headline figures."""
    found = session.summary
    runs = {label: found[label] for label in ("legacy", "client", "compat")}
    wire = found["throughput"]["wire"]
    by_writers = found["throughput"]["by_writers"]
    audit, after = found["audit"], found["after_migration"]

    def each(cell: Callable[[str], str]) -> tuple[str, str, str]:
        return cell("legacy"), cell("client"), cell("compat")

    def events(label: str) -> str:
        left, wrote = runs[label]["events_left_drift"], _writing_events(runs[label])
        return f"{percent(left, wrote)} ({left} of {wrote})"

    def machines(label: str) -> str:
        run = runs[label]
        return f"{run['drift_pct']:.0f}% ({run['drifted_machines']} of {run['machines']})"

    def wired(key: str) -> Callable[[str], str]:
        return lambda label: f"{wire[label][key]:.2f}"

    def rate(level: str) -> Callable[[str], str]:
        def cell(label: str) -> str:
            shown = f"{by_writers[level]['per_second'][label]:,.0f}"
            ratio = by_writers[level]["ratio_vs_legacy"][label]
            return shown if label == "legacy" else f"{shown} ({ratio:.2f}x)"

        return cell

    workload_machines = runs["legacy"]["machines"]
    rows = [
        (
            "events that wrote or tried to (not refused) after which the machine's "
            "two rows disagreed",
            *each(events),
        ),
        (
            f"of the workload's {workload_machines} machines, disagreeing at its end",
            *each(machines),
        ),
        (
            f"most of the {workload_machines} disagreeing at once (a concurrent reader)",
            *each(lambda k: str(runs[k]["peak_reader_drift"])),
        ),
        (
            "starts that succeeded while another run owned the machine",
            *each(lambda k: str(runs[k]["double_starts"])),
        ),
        ("statements per state change (step 6)", *each(wired("statements_per_change"))),
        ("round trips per state change (step 6)", *each(wired("round_trips_per_change"))),
    ]
    rows += [
        (
            f"state changes / s, {writers_label(int(level))}, each on its own machine (step 6)",
            *each(rate(level)),
        )
        for level in by_writers
    ]
    found["summary"] = {
        **{f"{k}_events_left_drift_pct": _left_drift_pct(run) for k, run in runs.items()},
        **{f"{k}_drift_pct": run["drift_pct"] for k, run in runs.items()},
        "audit_drift_pct_before": audit["drift_pct"],
        "audit_agreeing_after": after["agreeing"],
        "throughput_ratio_client_vs_legacy": {
            level: r["ratio_vs_legacy"]["client"] for level, r in by_writers.items()
        },
        "throughput_ratio_compat_vs_legacy": {
            level: r["ratio_vs_legacy"]["compat"] for level, r in by_writers.items()
        },
    }
    production = Table(
        title=f"Production's {audit['machines']} machines (steps 2 and 4)", title_justify="left"
    )
    production.add_column("")
    production.add_column("before: legacy schema", justify="right")
    production.add_column("after: the migration", justify="right")
    production.add_row(
        "machines whose state row is missing or disagrees",
        f"{audit['drifted_machines']} of {audit['machines']} ({audit['drift_pct']:.0f}%)",
        f"{after['drifted_machines']} of {after['machines']} "
        f"({percent(after['drifted_machines'], after['machines'])})",
    )
    table = Table(
        title=f"The workload (steps 3 and 5, the same events and faults on "
        f"{workload_machines} machines) and the A/B run (step 6)",
        title_justify="left",
    )
    table.add_column("")
    table.add_column("before: legacy code, legacy schema", justify="right")
    table.add_column("after: client", justify="right")
    table.add_column("after: legacy code, compat", justify="right")
    for row in rows:
        table.add_row(*row)
    session.out.step(7, "Summary")
    session.out.table(production)
    session.out.table(table)
    if runs["compat"]["double_starts"]:
        session.out.say(
            "  [dim]compat's double starts: starts the database's busy rule (MS002) did "
            "not catch (step 5).[/]"
        )


def _writing_events(run: dict[str, Any]) -> int:
    """Events that wrote or tried to (refused ones only read, or wrote nothing)."""
    return int(run["events"] - run["refused"])


def _left_drift_pct(run: dict[str, Any]) -> float:
    wrote = _writing_events(run)
    return round(100.0 * run["events_left_drift"] / wrote, 1) if wrote else 0.0
