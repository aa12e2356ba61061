"""`machine-sync bench`: what the trigger costs, measured side by side.

Its failures are raised as machine_sync errors; the command line's group
turns each into one line on stderr and the documented exit code.

Compares one UPDATE with the machine-sync trigger against the legacy dual
write (two autocommit statements, both orders, or one transaction), the same
two writes in a stored procedure, the same UPDATE on a table whose one
trigger only copies into a second table (the cheapest trigger mirror, for
reference) and on a table without trigger, on the same data, interleaved,
with psycopg and pgbench clients, in bulk and through a delaying proxy; then
clients sharing a few hot machines (the legacy statements in compat mode
against the legacy tables, and the single UPDATE) and the client's own
operations against the legacy code paths.
The work is in ``machine_sync.benchmark``.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import psycopg
import typer

from .benchmark import QUICK, BenchConfig, BenchError, run_benchmark
from .benchmark.report import headline_text, write
from .benchmark.scratch import ScratchMode
from .cli import DEMO_INSTALL
from .dsn import given_dsn, parse_dsn
from .errors import DatabaseUnreachable, MachineSyncError, one_line


def _numbers(text: str | None, kind: type[int] | type[float], option: str) -> tuple[float, ...]:
    if text is None:
        return ()
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{option}: a comma-separated list of numbers") from None


def _ints(text: str | None, option: str) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(v) for v in _numbers(text, int, option))


def register(app: typer.Typer) -> None:
    """Add the `bench` command to the machine-sync command line."""

    @app.command("bench")
    def bench(
        dsn: Annotated[
            str | None,
            typer.Option(
                # No DATABASE_URL: a run loads its server for about 23 minutes,
                # so only a server named here is ever measured.
                help="Server to measure (a scratch database or scratch schemas are created "
                "and removed; your tables are never touched). Default: an embedded "
                "PostgreSQL started here with durability on. DATABASE_URL is not read.",
                show_default=False,
            ),
        ] = None,
        out: Annotated[
            Path, typer.Option(help="Folder for report.md, report.json and report.png.")
        ] = Path("machine-sync-bench"),
        quick: Annotated[
            bool, typer.Option("--quick", help="A few seconds: small data, short runs.")
        ] = False,
        machines: Annotated[
            str | None, typer.Option(help="Data set sizes, e.g. 1000,10000.")
        ] = None,
        clients: Annotated[
            str | None, typer.Option(help="Concurrent connections, e.g. 1,8,32.")
        ] = None,
        drivers: Annotated[
            str | None, typer.Option(help="psycopg, pgbench or both (comma-separated).")
        ] = None,
        workloads: Annotated[
            str | None,
            typer.Option(
                help="Subset of legacy-autocommit, legacy-autocommit-rev, legacy-transaction, "
                "stored-procedure, machine-sync, minimal-trigger, floor."
            ),
        ] = None,
        rounds: Annotated[
            int | None,
            typer.Option(
                help=f"Interleaved rounds per local group (default {BenchConfig.rounds}, with "
                f"--quick {QUICK.rounds}; more rounds, steadier ratios). By default the proxied "
                f"groups run {BenchConfig.network_rounds} rounds of "
                f"{BenchConfig.network_seconds:g} s, bulk {BenchConfig.bulk_rounds} rounds."
            ),
        ] = None,
        seconds: Annotated[
            float | None,
            typer.Option(
                help=f"Seconds per timed run (default {BenchConfig.seconds:g}, with --quick "
                f"{QUICK.seconds:g}); pgbench's runs are sized to last about as long (with "
                f"--quick: {QUICK.pgbench_transactions} transactions per client)."
            ),
        ] = None,
        bulk: Annotated[
            str | None, typer.Option(help="Rows per bulk statement, e.g. 1,100,10000.")
        ] = None,
        latency_ms: Annotated[
            str | None, typer.Option(help="Added round-trip times through the proxy, e.g. 1,20.")
        ] = None,
        scratch: Annotated[
            str, typer.Option(help="auto, database or schemas: where the scratch tables go.")
        ] = "auto",
        keep: Annotated[
            bool, typer.Option("--keep", help="Leave the scratch database/schemas behind.")
        ] = False,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print the results as JSON on stdout.")
        ] = False,
    ) -> None:
        """Measure what the machine-sync trigger costs against the alternatives."""
        base = QUICK if quick else BenchConfig()
        if scratch not in ("auto", "database", "schemas"):
            raise typer.BadParameter("--scratch: auto, database or schemas")
        mode: ScratchMode = scratch  # type: ignore[assignment]
        try:
            # What the command line does not set stays as the base has it.
            config = dataclasses.replace(
                base,
                machines=_ints(machines, "--machines") or base.machines,
                clients=_ints(clients, "--clients") or base.clients,
                drivers=tuple(d.strip() for d in drivers.split(",")) if drivers else base.drivers,
                workloads=tuple(w.strip() for w in workloads.split(",")) if workloads else (),
                rounds=rounds or base.rounds,
                seconds=seconds or base.seconds,
                bulk_sizes=_ints(bulk, "--bulk") or () if bulk is not None else base.bulk_sizes,
                latencies_ms=(
                    _numbers(latency_ms, float, "--latency-ms")
                    if latency_ms is not None
                    else base.latencies_ms
                ),
                scratch=mode,
                keep=keep,
            )
            config.check()
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None

        def progress(line: str) -> None:
            typer.echo(line, err=True)

        dsn = given_dsn(dsn)
        if dsn is not None:
            parse_dsn(dsn)  # a malformed DSN is bad input (exit 2), not a failed connection
        command = shlex.join(["machine-sync", "bench", *sys.argv[2:]])
        try:
            result = run_benchmark(config, dsn=dsn, echo=progress, command=command)
        except BenchError as err:
            raise MachineSyncError(f"bench: {err}") from None
        except psycopg.OperationalError as err:
            raise DatabaseUnreachable(
                f"bench: cannot reach the database: {one_line(str(err))}"
            ) from None
        paths = write(result, out)
        if as_json:
            typer.echo(json.dumps(result.to_json(), indent=1, default=str))
        else:
            typer.echo(paths["markdown"].read_text())
            typer.echo(headline_text(result))
        written = ", ".join(str(p) for p in paths.values())
        typer.echo(f"written: {written}", err=True)
        if "chart" not in paths:
            typer.echo(f"no chart: install matplotlib ({DEMO_INSTALL})", err=True)
        cells_ok = (
            all(c.writes_ok and not c.drift for c in result.cells)
            and not any(c.drift for c in result.hot)
            and not any(c.drift for c in result.ops)
        )
        if not cells_ok or not all(b.writes_ok and not b.drift for b in result.bulk):
            typer.echo("some runs did not write what they should, or left drift", err=True)
            raise typer.Exit(code=1)
