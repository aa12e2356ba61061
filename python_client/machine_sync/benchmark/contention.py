"""Contended cells: legacy statements on a few hot machines, and the client's own operations.

Two groups, both driven by psycopg threads, interleaved and rotated like the
other cells:

* **Hot machines** (``hot_cells``): ``clients`` connections share the first
  ``machines`` machines. Each state change is one of the four legacy events
  (start, completion, stop, error) and goes to the machine and event its
  global slot names, so that one client alone, or clients in step, always
  send a sequence the rules allow (a start only on an idle machine, never
  processing without a process). Clients that drift apart meet on a machine:
  then the rules may refuse (MS002 busy, MS003 transition), counted and not
  retried, and a compat write may give up on the machine's lock (40001 when
  another transaction waits for it, 55P03 after the bound), counted and
  retried as a client would. The workloads: the legacy two statements on the
  migrated tables in compat mode, the same statements on the twins (no
  triggers), and machine-sync's single UPDATE per event on the real tables.
* **Client operations** (``ops_cells``): each writer owns its machines and
  runs start, a refused second start (busy), completion, a refused second
  completion (not the current run), start, failure, a refused start (a
  machine in error), and the operator's reset to idle, with
  :class:`machine_sync.client.Client`; against the legacy code paths on the
  twins (read the machine, check in Python, two writes; refused in Python).
  Both sides perform the same operations with the same outcomes.

A rate counts the state changes (or operations) a run finished, refused
operations included where both sides refuse alike; a hot-machine path the
rules refused does not count as done.
"""

from __future__ import annotations

import statistics
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ..client import Client
from ..errors import InvalidTransition
from .drivers import machine_uuid, new_run_id, process_uuid
from .engine import run_writers
from .queries import on_real_tables, query
from .scratch import APPLICATION_NAME, BenchError, Scratch

Echo = Callable[[str], None]

RETRYABLE = ("40001", "55P03", "40P01")
RULES = ("MS002", "MS003")
MAX_TRIES = 20

# The four legacy events, each as the statements of one path, in order.
LEGACY_PATHS: dict[str, tuple[str, ...]] = {
    "start": ("legacy_start_machines", "legacy_start_state"),
    "completion": ("legacy_complete_machines", "legacy_complete_state"),
    "stop": ("legacy_stop_machines", "legacy_stop_state"),
    "error": ("legacy_error_state", "legacy_error_machines"),
}
# machine-sync: one UPDATE of machines per event.
SINGLE_PATHS: dict[str, tuple[str, ...]] = {
    "start": ("legacy_start_machines",),
    "completion": ("legacy_complete_machines",),
    "stop": ("legacy_stop_machines",),
    "error": ("sync_error",),
}
# What happens to each hot machine, over and over: valid under the rules from
# idle (an error is followed by a completion before the next start).
CYCLE = ("start", "completion", "start", "stop", "start", "error", "completion")


@dataclass(frozen=True)
class HotWorkload:
    """One way of sending the legacy events to the hot machines."""

    key: str
    label: str
    paths: dict[str, tuple[str, ...]]
    real_tables: bool  # the migrated tables (triggers) or the twins (none)


HOT_WORKLOADS: tuple[HotWorkload, ...] = (
    HotWorkload(
        "legacy-compat",
        "legacy statements on the migrated tables, compat mode",
        LEGACY_PATHS,
        True,
    ),
    HotWorkload(
        "legacy-twins", "legacy statements on the twins (no triggers)", LEGACY_PATHS, False
    ),
    HotWorkload("machine-sync", "machine-sync: one UPDATE of machines", SINGLE_PATHS, True),
)

OPS_WORKLOADS = (
    ("client", "machine_sync.client.Client operations"),
    ("legacy-code", "legacy code paths: read, check in Python, two writes"),
)


@dataclass
class HotCell:
    """One hot-machine workload at one client count, over all rounds."""

    workload: str
    machines: int
    clients: int
    rates: list[float] = field(default_factory=list)  # finished state changes per second
    ops: int = 0  # finished state changes, all rounds (warm-up excluded)
    outcomes: dict[str, int] = field(default_factory=dict)  # "refused MS002", "retried 40001"...
    drift: int | None = None  # disagreeing machines after the group (real tables only)

    @property
    def median(self) -> float:
        """Median finished state changes per second over the rounds."""
        return statistics.median(self.rates) if self.rates else 0.0


@dataclass
class OpsCell:
    """The client's operations or the legacy code paths at one writer count."""

    workload: str
    writers: int
    rates: list[float] = field(default_factory=list)  # operations per second (refusals included)
    ops: int = 0
    refused: int = 0  # operations refused (by the database, or by the Python check)
    drift: int | None = None

    @property
    def median(self) -> float:
        """Median operations per second over the rounds."""
        return statistics.median(self.rates) if self.rates else 0.0


def hot_slot(clients: int, machines: int, client: int, step: int) -> tuple[int, str]:
    """Machine number and event of a client's ``step``-th state change (from 1).

    Slot ``(step - 1) * clients + client`` is the global order: machine
    ``slot % machines + 1`` gets event ``CYCLE[slot // machines % len(CYCLE)]``,
    so each machine sees the cycle in order when the clients keep step.
    """
    slot = (step - 1) * clients + client
    return slot % machines + 1, CYCLE[(slot // machines) % len(CYCLE)]


def _execute(cursor: Any, text: str, params: Sequence[Any], tally: Counter[str]) -> bool:
    """Send one autocommit statement; retry what a client retries. False: refused."""
    for attempt in range(1, MAX_TRIES + 1):
        try:
            cursor.execute(text, params, prepare=True)
            return True
        except psycopg.Error as err:
            code = err.sqlstate or ""
            if code in RETRYABLE:
                if attempt < MAX_TRIES:
                    tally[f"retried {code}"] += 1
                    continue
                tally[f"gave up {code}"] += 1
                return False
            if code in RULES:
                tally[f"refused {code}"] += 1
                return False
            raise
    return False  # pragma: no cover - the loop always returns


def _connections(place: Scratch, n: int, *, raw: bool = True) -> list[psycopg.Connection[Any]]:
    conns: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(n):
            if raw:
                conns.append(place.connect())
            else:
                conns.append(
                    psycopg.connect(place.dsn, autocommit=True, application_name=APPLICATION_NAME)
                )
    except BaseException:
        for conn in conns:
            conn.close()
        raise
    return conns


def _rotated(items: Sequence[Any], by: int) -> list[Any]:
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


def _reset(conn: psycopg.Connection[Any], place: Scratch) -> None:
    """Every machine idle with no run, in the real tables and the twins (untimed)."""
    schemas = place.schemas
    for name in ("idle_machines", "idle_legacy_machines", "idle_legacy_machine_state"):
        conn.execute(query(name, schemas))


def _sync_drift(conn: psycopg.Connection[Any], place: Scratch) -> int:
    row = conn.execute(query("sync_drift", place.schemas)).fetchone()
    return int(row[0]) if row is not None else -1


def hot_cells(
    place: Scratch,
    *,
    machines: int,
    clients: Sequence[int],
    rounds: int,
    seconds: float,
    echo: Echo,
) -> list[HotCell]:
    """The hot-machine groups: every HOT_WORKLOADS entry at each client count."""
    schemas = place.schemas
    texts = {
        w.key: {
            event: [
                on_real_tables(name, schemas) if w.real_tables else query(name, schemas)
                for name in names
            ]
            for event, names in w.paths.items()
        }
        for w in HOT_WORKLOADS
    }
    ids = [machine_uuid(n) for n in range(1, machines + 1)]
    out: list[HotCell] = []
    with place.connect() as admin:
        for n in clients:
            cells = {w.key: HotCell(w.key, machines, n) for w in HOT_WORKLOADS}
            conns = _connections(place, n)
            try:
                cursors = [c.cursor() for c in conns]
                for round_no in range(rounds + 1):
                    warm = round_no == 0
                    for workload in _rotated(HOT_WORKLOADS, round_no):
                        _reset(admin, place)
                        run_id = new_run_id()
                        paths = texts[workload.key]

                        def step(
                            client: int,
                            k: int,
                            tally: Counter[str],
                            paths: dict[str, list[str]] = paths,
                            run_id: int = run_id,
                            n: int = n,
                            cursors: list[Any] = cursors,
                        ) -> int:
                            number, event = hot_slot(n, machines, client, k)
                            mid = ids[number - 1]
                            params: tuple[Any, ...] = (mid,)
                            if event == "start":
                                params = (mid, process_uuid(run_id, client, k))
                            cursor = cursors[client]
                            return int(
                                all(_execute(cursor, t, params, tally) for t in paths[event])
                            )

                        timed = run_writers(
                            conns, seconds / 4 if warm else seconds, step, what="contended run"
                        )
                        done, elapsed, tally = timed.changes, timed.seconds, timed.tally
                        if warm:
                            continue
                        cell = cells[workload.key]
                        cell.rates.append(done / elapsed if elapsed > 0 else 0.0)
                        cell.ops += done
                        for key, count in tally.items():
                            cell.outcomes[key] = cell.outcomes.get(key, 0) + count
                        if workload.real_tables:
                            drift = _sync_drift(admin, place)
                            cell.drift = max(cell.drift or 0, drift)
            finally:
                for conn in conns:
                    conn.close()
            echo(
                f"hot machines={machines} clients={n}: "
                + "  ".join(
                    f"{k}={c.median:,.0f}/s"
                    + (f" ({_outcome_text(c.outcomes)})" if c.outcomes else "")
                    for k, c in cells.items()
                )
            )
            out += cells.values()
    return out


def _outcome_text(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items()))


# The client's operations, per machine: (operation, which process, refused?).
OPS_CYCLE: tuple[tuple[str, int, bool], ...] = (
    ("start", 1, False),
    ("start", 2, True),  # busy: another run holds the machine
    ("complete", 1, False),
    ("complete", 1, True),  # not the current run any more
    ("start", 3, False),
    ("fail", 3, False),
    ("start", 4, True),  # a machine in error cannot start
    ("reset", 4, False),  # the operator sets it idle again
)
FAIL_MESSAGE = "bench"


def _ops_plan(writers: int, machines: int, writer: int, step: int) -> tuple[int, int, int]:
    """(machine number, position in OPS_CYCLE, cycle number) of a writer's step."""
    size = (machines - 1 - writer) // writers + 1
    cycle, position = divmod(step - 1, len(OPS_CYCLE))
    return writer + writers * (cycle % size) + 1, position, cycle


def _client_op(client: Client, machine: uuid.UUID, op: str, process: uuid.UUID) -> bool:
    """One client operation; False when the database (or the client) refused it."""
    try:
        if op == "start":
            client.start_process(machine, process)
        elif op == "complete":
            client.complete_process(machine, process)
        elif op == "fail":
            client.fail_process(machine, FAIL_MESSAGE, process_id=process)
        else:
            client.set_status(machine, "idle")
    except InvalidTransition:  # MachineBusy and NotCurrentProcess are kinds of it
        return False
    return True


class _LegacyCode:
    """The legacy code paths on the twins: read, check in Python, two writes."""

    def __init__(self, place: Scratch) -> None:
        schemas = place.schemas
        self.read = query("legacy_read_machine", schemas)
        self.paths = {
            event: [query(name, schemas) for name in names] for event, names in LEGACY_PATHS.items()
        }

    def op(self, cursor: Any, machine: uuid.UUID, op: str, process: uuid.UUID) -> bool:
        cursor.execute(self.read, (machine,), prepare=True)
        row = cursor.fetchone()
        if row is None:
            raise BenchError(f"legacy code path: machine {machine} missing")
        status, current = row
        if op == "start":
            if status not in ("idle", "offline"):
                return False
            for text in self.paths["start"]:
                cursor.execute(text, (machine, process), prepare=True)
            return True
        if op == "reset":  # the operator's override: no check
            for text in self.paths["completion"]:
                cursor.execute(text, (machine,), prepare=True)
            return True
        if status != "processing" or current != process:
            return False
        for text in self.paths["completion" if op == "complete" else "error"]:
            cursor.execute(text, (machine,), prepare=True)
        return True


def ops_cells(
    place: Scratch,
    *,
    machines: int,
    writers: Sequence[int],
    rounds: int,
    seconds: float,
    echo: Echo,
) -> list[OpsCell]:
    """The client's operations against the legacy code paths at each writer count."""
    legacy = _LegacyCode(place)
    ids = [machine_uuid(n) for n in range(1, machines + 1)]
    out: list[OpsCell] = []
    keys = [k for k, _ in OPS_WORKLOADS]
    with place.connect() as admin:
        for n in writers:
            if n > machines:
                continue
            cells = {k: OpsCell(k, n) for k in keys}
            client_conns = _connections(place, n, raw=False)
            legacy_conns = _connections(place, n)
            try:
                clients = [Client(c) for c in client_conns]
                cursors = [c.cursor() for c in legacy_conns]
                for round_no in range(rounds + 1):
                    warm = round_no == 0
                    for key in _rotated(keys, round_no):
                        _reset(admin, place)
                        run_id = new_run_id()

                        def step(
                            writer: int,
                            k: int,
                            tally: Counter[str],
                            key: str = key,
                            run_id: int = run_id,
                            n: int = n,
                            clients: list[Client] = clients,
                            cursors: list[Any] = cursors,
                        ) -> int:
                            number, position, cycle = _ops_plan(n, machines, writer, k)
                            op, which, _ = OPS_CYCLE[position]
                            process = process_uuid(run_id, writer, cycle * 4 + which)
                            if key == "client":
                                ok = _client_op(clients[writer], ids[number - 1], op, process)
                            else:
                                ok = legacy.op(cursors[writer], ids[number - 1], op, process)
                            if not ok:
                                tally["refused"] += 1
                            return 1

                        conns = client_conns if key == "client" else legacy_conns
                        # At least one whole cycle per writer: its three
                        # refusals in eight are all in the count.
                        timed = run_writers(
                            conns,
                            seconds / 4 if warm else seconds,
                            step,
                            what="contended run",
                            min_steps=len(OPS_CYCLE),
                        )
                        done, elapsed, tally = timed.changes, timed.seconds, timed.tally
                        if warm:
                            continue
                        cell = cells[key]
                        cell.rates.append(done / elapsed if elapsed > 0 else 0.0)
                        cell.ops += done
                        cell.refused += tally["refused"]
                        if key == "client":
                            cell.drift = max(cell.drift or 0, _sync_drift(admin, place))
            finally:
                for conn in [*client_conns, *legacy_conns]:
                    conn.close()
            echo(
                f"client operations writers={n}: "
                + "  ".join(
                    f"{k}={c.median:,.0f}/s (refused {c.refused})" for k, c in cells.items()
                )
            )
            out += cells.values()
    return out
