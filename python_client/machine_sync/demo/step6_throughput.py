"""Step 6: statements, round trips and throughput of the legacy code (legacy and
migrated schema) and the client, side by side, in interleaved slices."""

from __future__ import annotations

from typing import Any

import psycopg
from rich.table import Table

from machine_sync import workload as wl
from machine_sync.resources import fixture

from .output import writers_label
from .session import DemoSession

AB_ROUNDS = 4


def throughput(session: DemoSession) -> None:
    """Statements, round trips and state changes per second of the three, interleaved."""
    options = session.options
    session.out.step(6, "Statements, round trips and throughput, side by side")
    legacy_db = session.workspace.create_database(f"{session.workspace.database}_legacy")
    session.psql_file(legacy_db, fixture("legacy_schema.sql"))
    with psycopg.connect(legacy_db, autocommit=True) as conn:
        legacy_machines = wl.create_machines(conn, options.writers, prefix="AB-")
    with session.connect() as conn:
        compat_machines = wl.create_machines(conn, options.writers, prefix="AB-COMPAT-")
        client_machines = wl.create_machines(conn, options.writers, prefix="AB-CLIENT-")
    targets = [
        wl.Target("legacy", legacy_db, wl.LegacyPath(), legacy_machines),
        wl.Target("compat", session.workspace.dsn, wl.LegacyPath(), compat_machines),
        wl.Target("client", session.workspace.dsn, wl.ClientPath(), client_machines),
    ]
    wire = {t.label: wl.count_round_trips(t.conninfo, t.path, t.machines[0]) for t in targets}
    # One writer shows what each state change costs a caller; several show
    # what the server sustains (here CPU-bound: client and server share it).
    levels = sorted({1, options.writers})
    per_level = AB_ROUNDS * len(targets)
    slices = per_level * len(levels)
    slice_seconds = max(0.05, 1.5 * options.duration / slices)
    results: dict[int, wl.ThroughputResult] = {}
    with session.out.progress("interleaved A/B", slices) as update:
        finished = 0

        def progress(done: int) -> None:
            update(finished + done, f"slice {finished + done} of {slices}")

        for level in levels:
            results[level] = wl.interleaved_throughput(
                targets,
                rounds=AB_ROUNDS,
                slice_seconds=slice_seconds,
                writers=level,
                progress=progress,
            )
            finished += per_level
    session.out.say(
        "  [dim]legacy: legacy code, legacy schema; compat: legacy code, migrated schema; "
        "client: machine_sync.client, migrated schema. The same script of events for all, "
        "each writer on its own machine; ratio ranges are the per-round spread.[/]"
    )
    table = Table(
        title=f"{AB_ROUNDS} rounds x {len(targets)} targets x {slice_seconds:.2f} s per "
        "concurrency, order rotated each round",
        title_justify="left",
    )
    table.add_column("")
    for column in ("stmts/change", "trips/change"):
        table.add_column(column, justify="right")
    for level in levels:
        table.add_column(f"{writers_label(level)}: changes/s", justify="right")
        table.add_column("vs legacy", justify="right")
    data: dict[str, Any] = {
        "wire": {},
        "by_writers": {str(level): r.to_json("legacy") for level, r in results.items()},
    }
    for target in targets:
        count = wire[target.label]
        cells = [
            f"{count.statements_per_change:.2f}",
            f"{count.round_trips_per_change:.2f}",
        ]
        for level, result in results.items():
            ratios = result.round_ratios(target.label, "legacy")
            spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if target.label != "legacy" else ""
            # The rate as the summary (step 7, --json) has it, so both say the same.
            shown = data["by_writers"][str(level)]["per_second"][target.label]
            cells += [
                f"{shown:,.0f}",
                f"{result.ratio(target.label, 'legacy'):.2f}x{spread}",
            ]
        table.add_row(target.label, *cells)
        data["wire"][target.label] = {
            "state_changes": count.state_changes,
            "statements_per_change": round(count.statements_per_change, 3),
            "round_trips_per_change": round(count.round_trips_per_change, 3),
        }
    session.out.table(table)
    session.out.say(
        "  [dim]Statements are counted at the client, round trips at the wire (through a "
        "proxy, as the benchmark counts them); the legacy start also reads the status. "
        "Client and server share this machine's CPUs and a round trip costs microseconds "
        "here, milliseconds to a hosted database.[/]"
    )
    session.summary["throughput"] = data
