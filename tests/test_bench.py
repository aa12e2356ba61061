"""`machine-sync bench`: a tiny run checks the report's shape and that every
workload really wrote what it claims and left the tables agreeing. No timing
is asserted: speed claims come only from the benchmark's own side-by-side runs.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import psycopg
import pytest
import typer
from typer.testing import CliRunner

from machine_sync import bench
from machine_sync.benchmark import BenchConfig, run_benchmark, runner
from machine_sync.benchmark.report import _with_spread, markdown, paired_ratio
from machine_sync.benchmark.runner import PGBENCH_WARM_UP, _pgbench_count
from machine_sync.benchmark.workloads import WORKLOADS

from machines import add_machine, machine

KEYS = [w.key for w in WORKLOADS]
MIRRORED = {
    "legacy-autocommit",
    "legacy-autocommit-rev",
    "legacy-transaction",
    "stored-procedure",
    "machine-sync",
    "minimal-trigger",
}


def _scratch_databases(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'machine_sync_bench_%'"
        ).fetchall()
    return [r[0] for r in rows]


def test_quick_bench_through_the_cli(cluster, tmp_path):
    app = typer.Typer()
    bench.register(app)

    @app.command("other")  # a second command, so `bench` is addressed by name as in cli.py
    def _other() -> None: ...

    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--quick",
            "--dsn",
            cluster.server.dsn,
            "--machines",
            "60",
            "--clients",
            "1,3",
            "--rounds",
            "1",
            "--bulk",
            "1,60",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)

    assert data["meta"]["scratch"].startswith("scratch database machine_sync_bench_")
    assert _scratch_databases(cluster.server.dsn) == []  # dropped afterwards

    cells = data["cells"]
    groups = {(c["section"], c["driver"], c["clients"]) for c in cells}
    assert groups == {
        ("local", "psycopg", 1),
        ("local", "psycopg", 3),
        ("local", "pgbench", 1),
        ("local", "pgbench", 3),
        ("network", "psycopg", 1),
    }
    for group in groups:
        found = [c["workload"] for c in cells if (c["section"], c["driver"], c["clients"]) == group]
        assert found == KEYS
    for cell in cells:
        # Each state change made its row updates (2 tables mirrored, 1 for the floor).
        per_change = 2 if cell["workload"] in MIRRORED else 1
        assert cell["ops"] > 0
        assert cell["rates"][0] > 0
        assert cell["writes_seen"] == cell["writes_expected"] >= cell["ops"] * per_change
        assert cell["stray_writes"] == 0
        assert cell["drift"] == (0 if cell["workload"] in MIRRORED else None)

    # Rounded: psycopg prepares a statement on first use, one extra round trip per connection.
    trips = {c["workload"]: round(c["round_trips"]) for c in cells if c["section"] == "network"}
    assert trips == {
        "legacy-autocommit": 2,
        "legacy-autocommit-rev": 2,
        "legacy-transaction": 4,
        "stored-procedure": 1,
        "machine-sync": 1,
        "minimal-trigger": 1,
        "floor": 1,
    }

    bulk = data["bulk"]
    assert {(b["workload"], b["rows"]) for b in bulk} == {
        (w, n)
        for w in ("legacy-transaction", "machine-sync", "minimal-trigger", "floor")
        for n in (1, 60)
    }
    for cell in bulk:
        assert cell["writes_seen"] == cell["writes_expected"] >= cell["statements"] * cell["rows"]
        assert cell["stray_writes"] == 0
        assert cell["drift"] == (None if cell["workload"] == "floor" else 0)

    # Hot machines: the three workloads at each client count; the real tables agree after.
    hot = data["hot"]
    assert [h["workload"] for h in hot] == ["legacy-compat", "legacy-twins", "machine-sync"]
    for cell in hot:
        assert cell["clients"] == 4
        assert cell["machines"] == 18
        assert cell["ops"] > 0
        assert cell["rates"][0] > 0
        assert cell["drift"] == (None if cell["workload"] == "legacy-twins" else 0)
        assert set(cell["outcomes"]) <= {
            f"{what} {code}"
            for what in ("refused", "retried", "gave up")
            for code in ("MS002", "MS003", "40001", "55P03", "40P01")
        }
    # The client's operations and the legacy code paths refuse the same three in eight.
    ops = data["ops"]
    assert {(o["workload"], o["writers"]) for o in ops} == {
        (w, n) for w in ("client", "legacy-code") for n in (1, 4)
    }
    for cell in ops:
        assert cell["ops"] >= 8 * cell["writers"]  # a whole cycle of eight per writer
        assert cell["refused"] == pytest.approx(cell["ops"] * 3 / 8, abs=3 * cell["writers"])
        assert cell["drift"] == (0 if cell["workload"] == "client" else None)

    report = (out / "report.md").read_text()
    for heading in (
        "## Headline",
        "## Single-row",
        "## Bulk",
        "## Through a delaying proxy",
        "## Round trips",
        "## Hot machines",
        "## The client's own operations",
        "## Checks",
    ):
        assert heading in report
    assert "machine-sync vs stored procedure, 1 client" in report
    assert "minimal trigger mirror vs floor, 1 client" in report
    assert "in 43 of 43 measured cells" in report
    # One round: no middle half to show, and the verdicts are said to mean nothing.
    assert "a smoke test of the benchmark, whose verdicts say nothing" in report
    assert "In brackets" not in report
    assert json.loads((out / "report.json").read_text())["cells"] == cells
    assert (out / "report.png").exists() == ("no chart" not in result.stderr)


def test_a_ratio_is_the_median_of_the_rounds_and_carries_their_middle_half():
    ratio = paired_ratio([2.0, 4.0, 9.0, 8.0, 5.0], [2.0, 2.0, 3.0, 4.0, 1.0])  # 1, 2, 3, 2, 5
    assert ratio == 2.0
    assert (ratio.low, ratio.high) == (1.5, 4.0)
    assert ratio >= 2.0
    assert f"{ratio:.2f}" == "2.00"
    assert _with_spread(ratio) == "2.00x (1.50-4.00)"
    few = paired_ratio([1.0, 3.0], [1.0, 1.0])  # two rounds have no middle half
    assert (few, few.low, few.high) == (2.0, None, None)
    assert _with_spread(few) == "2.00x"
    assert paired_ratio([1.0], [0.0]) != paired_ratio([1.0], [0.0])  # no usable round: NaN


def test_pgbench_runs_are_sized_from_the_round_before(cluster, monkeypatch):
    # Without a fixed count, a run lasts about `seconds` at the rate of the
    # round before, not pgbench's whole seconds nor the warm-up's count.
    assert _pgbench_count(None, 1, 0.5) == PGBENCH_WARM_UP
    assert _pgbench_count(1_000.0, 1, 0.5) == 500
    assert _pgbench_count(1_000.0, 4, 0.5) == 125
    assert _pgbench_count(30.0, 1, 0.5) == PGBENCH_WARM_UP
    calls: list[tuple[str, int, float]] = []
    real = runner.run_pgbench

    def recording(*args, transactions, **kwargs):
        run = real(*args, transactions=transactions, **kwargs)
        calls.append((args[2].key, transactions, run.per_second))
        return run

    monkeypatch.setattr(runner, "run_pgbench", recording)
    config = BenchConfig(
        machines=(50,),
        clients=(2,),
        drivers=("pgbench",),
        workloads=("floor", "machine-sync"),
        rounds=3,
        seconds=0.2,
        bulk_sizes=(),
        latencies_ms=(),
        hot_clients=(),
        ops_writers=(),
    )
    result = run_benchmark(config, dsn=cluster.server.dsn, echo=lambda _line: None)
    assert all(c.writes_ok for c in result.cells)
    for key in ("floor", "machine-sync"):
        runs = [(tx, rate) for k, tx, rate in calls if k == key]
        assert len(runs) == 1 + 3
        assert runs[0][0] == PGBENCH_WARM_UP
        for (_, before), (tx, _) in itertools.pairwise(runs):
            assert tx == _pgbench_count(before, 2, 0.2)


# The migrations' records in the user's database: what its down migration
# restores and what `migrate verify` compares with.
RECORDS = """
    SELECT 'revert' AS kind, t::text FROM machine_sync_revert.privilege AS t
    UNION ALL SELECT 'revert', f::text FROM machine_sync_revert.foreign_key AS f
    UNION ALL SELECT 'revert', d::text FROM machine_sync_revert.column_default AS d
    UNION ALL SELECT 'installed', i::text FROM machine_sync_installed.definition AS i
    ORDER BY 1, 2
"""


def test_scratch_schemas_leave_the_users_tables_alone(db):
    with db.connect() as conn:
        machine_id = add_machine(conn, status="idle")
        before = machine(conn, machine_id)
        records = conn.execute(RECORDS).fetchall()
        assert records
        objects = conn.execute(
            "SELECT c.oid::regclass::text, c.xmin::text FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname IN ('public', 'machine_sync') ORDER BY 1"
        ).fetchall()

    config = BenchConfig(
        machines=(20,),
        clients=(1,),
        drivers=("psycopg",),
        rounds=4,  # the fewest with a middle half of the rounds' ratios
        seconds=0.05,
        bulk_sizes=(20,),
        bulk_rounds=1,
        latencies_ms=(),
        scratch="schemas",
    )
    result = run_benchmark(config, dsn=db.dsn, echo=lambda _line: None)

    assert "scratch schemas msbench_" in result.meta["scratch"]
    assert [c.workload for c in result.cells] == KEYS
    assert all(c.writes_ok and c.writes_expected > 0 for c in [*result.cells, *result.bulk])
    assert all(c.drift in (0, None) for c in [*result.cells, *result.bulk])
    report = markdown(result)
    assert "## Bulk" in report
    assert "In brackets, the middle half" in report
    assert "smoke test" not in report
    with db.connect() as conn:
        assert machine(conn, machine_id) == before
        assert (
            conn.execute(
                "SELECT c.oid::regclass::text, c.xmin::text FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname IN ('public', 'machine_sync') ORDER BY 1"
            ).fetchall()
            == objects
        )
        assert conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'msbench%'"
        ).fetchone() == (0,)
        assert conn.execute(RECORDS).fetchall() == records
        assert conn.execute("SELECT * FROM machine_sync_installed.problems_v1()").fetchall() == []


def test_default_report_folder_is_git_ignored():
    app = typer.Typer()
    bench.register(app)
    command = typer.main.get_command(app)
    (out,) = [p for p in command.params if p.name == "out"]
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert f"{out.default}/" in ignored
