"""Build the machine-sync migration from ``sql/``, the one source of every object.

``sql/`` holds each object once, in readable files applied in name order; the
migration that installs them is those files, in that order, in one
transaction. It is generated so that the two can never disagree, and it is
committed (plain SQL, so that psql, the Supabase CLI and the runner apply it
as it is). ``python python_client/tools/build_migration.py`` rewrites it;
``--check`` exits 1 when the committed file is not what this would write (CI
runs it).

The migration ends with ``record_definitions.sql`` (next to this script) and a
call that records, in the catalog, an md5 of every function, trigger and view
it installed: ``machine-sync migrate status`` and ``migrations/verify/`` compare
the live catalog with that record instead of replaying anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SQL = ROOT / "sql"
TARGET = ROOT / "migrations" / "20261125170100_machine_sync_v1.sql"
RECORD = Path(__file__).resolve().parent / "record_definitions.sql"

HEADER = """\
-- machine-sync v1: machines becomes the single write target; machine_state
-- follows it in the same transaction, and the state rules hold for every
-- writer. Takes the baseline (an empty install or the legacy production
-- database, with its data) to the schema described in sql/. Idempotent:
-- applying it again changes nothing.
--
-- Generated from sql/ by python_client/tools/build_migration.py: edit the
-- files there and run it; CI fails when this file is out of date.

-- squawk-ignore-file require-statement-timeout
-- (squawk) No statement_timeout: the lock_timeout below caps the only long
-- wait these statements have, another session's lock; their own work is
-- bounded by one row per lab machine.

BEGIN;
SET LOCAL lock_timeout = '5s';
-- Names resolve in pg_catalog alone (everything else here is schema
-- qualified): a function created in a schema on the caller's search_path
-- (public is writable by every role in a database made before PostgreSQL
-- 15) can neither stand in for a built-in one nor run as the migrating role.
SET LOCAL search_path = pg_catalog, pg_temp;
"""


def build() -> str:
    parts = [HEADER]
    for path in sorted(SQL.glob("*.sql")):
        rule = "-- " + "-" * 75
        parts.append(f"\n{rule}\n-- sql/{path.name}\n{rule}\n\n{path.read_text().rstrip()}\n")
    rule = "-- " + "-" * 75
    parts.append(
        f"\n{rule}\n-- What this migration installed, recorded in the catalog\n"
        f"-- (python_client/tools/{RECORD.name})\n{rule}\n\n{RECORD.read_text().rstrip()}\n"
        f"\nSELECT machine_sync_installed.record('{TARGET.name}') AS recorded_definitions;\n"
    )
    parts.append("\nCOMMIT;\n")
    return "".join(parts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="only verify that the migration is up to date (exit 1 if not)",
    )
    args = parser.parse_args(argv)
    text = build()
    if args.check:
        if TARGET.read_text() != text:
            print(
                f"{TARGET.relative_to(ROOT)} is out of date with sql/: "
                "run python python_client/tools/build_migration.py",
                file=sys.stderr,
            )
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
