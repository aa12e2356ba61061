"""What the triggers cost in CPU instructions, counted by valgrind, not timed.

``machine-sync bench`` measures throughput, which on a small or shared machine
moves from run to run and mixes the trigger's CPU with the commit's wait. This
counts the instructions one backend executes per state change, which moves by
a few tenths of a percent from run to run, on a loaded machine too: the
workloads of the benchmark, on its scratch database (the real migrations, the
trigger-less twins, 10 000 machines), each run in a single-user backend under
callgrind, twice (200 and 1 200 state changes; 4 and 24 bulk statements), and
the difference divided by the state changes between them, so that start-up
and the first planning drop out.

Needs valgrind and the demo extra (``pip install '.[demo]'``). Run it from the
repository::

    python python_client/tools/trigger_cost.py

It prints one line per workload: instructions per state change, and the ratio
to the no-trigger floor. A single-row state change is one autocommit
statement, as clients send it (the legacy pair is two); a bulk one is a row
of a 500-row UPDATE.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from machine_sync import server as pgserver
from machine_sync.benchmark.queries import Schemas, query
from machine_sync.benchmark.scratch import load, scratch_place

MACHINES = 10_000
# State changes per run: the two runs of a single-row workload, and of a bulk one.
RUNS = (200, 1_200)
BULK_RUNS = (4, 24)
BULK_ROWS = 500
START = "'processing', gen_random_uuid()"
STOP = "'idle', NULL"
# name: (the benchmark's queries that make one state change, in order; rows it changes)
WORKLOADS: dict[str, tuple[list[str], int]] = {
    "floor (no trigger)": (["update_floor"], 1),
    "machine-sync": (["update_machines"], 1),
    "minimal trigger (reference)": (["update_minimal_machines"], 1),
    "stored procedure": (["call_stored_procedure"], 1),
    "legacy pair": (["update_legacy_machines", "update_legacy_state"], 1),
    "bulk floor (per row)": (["bulk_update_floor"], BULK_ROWS),
    "bulk machine-sync (per row)": (["bulk_update_machines"], BULK_ROWS),
    "bulk minimal trigger (per row)": (["bulk_update_minimal_machines"], BULK_ROWS),
}


def one_line(statement: str) -> str:
    """A named query as one line: a single-user backend ends a statement at a newline."""
    lines = [line for line in statement.splitlines() if not line.lstrip().startswith("--")]
    return re.sub(r"\s+", " ", " ".join(lines)).strip().rstrip(";")


def script(name: str, changes: int, ids: list[str]) -> str:
    """The single-user input for ``changes`` state changes of workload ``name``:
    a start, then the stop of the same machines, spread over them (EXECUTE
    takes no subquery, so machine ids are written out)."""
    queries, rows = WORKLOADS[name]
    out = [f"PREPARE {q} AS {one_line(query(q, Schemas()))};" for q in queries]
    for i in range(changes):
        first = (i // 2 * rows * 7919) % (MACHINES - rows)
        chosen = ids[first : first + rows]
        status = START if i % 2 == 0 else STOP
        # Each query takes the status, the process and the machine (or machines).
        machines = f"'{chosen[0]}'" if rows == 1 else "'{" + ",".join(chosen) + "}'"
        out += [f"EXECUTE {q}({status}, {machines});" for q in queries]
    return "\n".join(out) + "\n"


def as_owner(user: str | None, argv: list[str]) -> list[str]:
    """``argv`` run as the data directory's owner when we are root (postgres refuses root)."""
    return argv if user is None else ["runuser", "-u", user, "--", *argv]


def instructions(bin_dir: Path, data_dir: Path, database: str, text: str, user: str | None) -> int:
    """Instructions a single-user backend executes for ``text``, start-up included."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o777)
        out = Path(tmp) / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        argv += [str(bin_dir / "postgres"), "--single", "-D", str(data_dir)]
        argv += [database]
        done = subprocess.run(
            as_owner(user, argv), input=text, capture_output=True, text=True, cwd="/"
        )
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or found is None or "ERROR:" in done.stdout + done.stderr:
            raise SystemExit(f"single-user run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return int(found.group(1))


def measure() -> dict[str, float]:
    """Instructions per state change of each workload, on a scratch database."""
    with pgserver.embedded_server(fast=True) as server:
        with scratch_place(server.dsn, "database", keep=True) as place:
            load(place, MACHINES)
            database = str(conninfo_to_dict(place.dsn)["dbname"])
            with place.connect() as conn:
                ids = [
                    str(row[0])
                    for row in conn.execute(
                        "SELECT machine_sync_bench.machine_uuid(n)"
                        " FROM generate_series(1, $1) AS n",
                        [MACHINES],
                    )
                ]
        bin_dir, data_dir = server.bin_dir, server.data_dir
        assert bin_dir is not None
        assert data_dir is not None
        user = Path(data_dir).owner() if os.geteuid() == 0 else None
        pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-w"]
        # A single-user backend needs the data directory to itself.
        subprocess.run(as_owner(user, [*pg_ctl, "stop"]), check=True, cwd="/")
        per_change: dict[str, float] = {}
        for name, (_, rows) in WORKLOADS.items():
            runs = RUNS if rows == 1 else BULK_RUNS
            few, many = (
                instructions(bin_dir, data_dir, database, script(name, n, ids), user) for n in runs
            )
            per_change[name] = (many - few) / ((runs[1] - runs[0]) * rows)
        log = str(Path(data_dir) / "restart.log")
        subprocess.run(as_owner(user, [*pg_ctl, "-l", log, "start"]), check=True, cwd="/")
    return per_change


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Takes no options; about 3 minutes.",
    )
    parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind not found: apt-get install valgrind", file=sys.stderr)
        return 2
    per_change = measure()
    print(f"instructions per state change (valgrind callgrind, {MACHINES} machines)")
    for name, count in per_change.items():
        bulk = name.startswith("bulk")
        floor = per_change["bulk floor (per row)" if bulk else "floor (no trigger)"]
        print(f"  {name:30} {count / 1000:8.1f}k  {count / floor:5.2f}x the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
