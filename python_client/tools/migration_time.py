"""How long the v1 migration takes on a large, drifted legacy database.

The migration holds ``machines`` and ``machine_state`` locked until it
commits (MIGRATING.md), so its time is how long every reader and writer
waits. This measures it: for each size, a fresh database on a throwaway
embedded server (durability on), production's schema
(``machine_sync/fixtures/legacy_schema.sql``) owned by a role that is not a
superuser (CREATEROLE, as Supabase's ``postgres``), filled by ``legacy_at_scale.sql`` (72% of the
machines without a state row, statuses in mixed case, values that
disagree), then ``machine-sync migrate apply`` run and timed as that role.

Needs the demo extra (``pip install '.[demo]'``). Run it from the repository::

    python python_client/tools/migration_time.py --machines 10000,100000

It prints one line per size: the time of ``migrate apply``, the drifted
machines the migration's notice reports, and the time per drifted machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from machine_sync import server as pgserver
from machine_sync.benchmark.scratch import drop_database

HERE = Path(__file__).resolve().parent
SCHEMA = HERE.parent / "machine_sync" / "fixtures" / "legacy_schema.sql"
DATA = HERE / "legacy_at_scale.sql"
OWNER = "legacy_owner"


def drifted(notice: str) -> int:
    """The drifted machines a migration's notice counts ("72000 missing_state, ...")."""
    found = re.search(r"drift repaired from machines: (.*?);", notice)
    return sum(int(n) for n in re.findall(r"(\d+) \w+", found[1])) if found else 0


def measure(server: pgserver.Server, psql: str, machines: int) -> None:
    name = f"legacy_{machines}"
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [OWNER]).fetchone():
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE").format(sql.Identifier(OWNER)))
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(OWNER)
            )
        )
    with psycopg.connect(make_conninfo(server.dsn, dbname=name), autocommit=True) as db:
        db.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(OWNER)))
    dsn = make_conninfo(server.dsn, dbname=name, user=OWNER)
    for path in (SCHEMA, DATA):
        subprocess.run(
            [psql, dsn, "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path)],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PGOPTIONS": f"-c legacy.machines={machines}"},
        )
    started = time.perf_counter()
    applied = subprocess.run(
        [sys.executable, "-m", "machine_sync", "migrate", "apply", "--dsn", dsn],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if applied.returncode != 0:
        sys.exit(f"{machines} machines: migrate apply failed:\n{applied.stdout}{applied.stderr}")
    repaired = drifted(applied.stdout + applied.stderr)
    per = f", {1000 * seconds / repaired:.3f} ms per drifted machine" if repaired else ""
    print(f"{machines:>9,} machines: migrate apply {seconds:6.1f} s, {repaired:,} drifted{per}")
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        drop_database(admin, name)  # and the mirror role the migration made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", default="10000,100000", help="sizes, comma-separated")
    args = parser.parse_args()
    sizes = [int(n) for n in args.machines.split(",")]
    with pgserver.embedded_server(fast=False) as server:
        psql = pgserver.find_psql(server)
        for machines in sizes:
            measure(server, psql, machines)


if __name__ == "__main__":
    main()
