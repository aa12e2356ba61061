"""Many writers on a few hot machines: the tables never disagree and no
acknowledged write is lost, whatever the mix of new and legacy writers.

Each writer thread has its own connection and tags every transaction with a
token; a test-only audit trigger records every row version written under each
token. Afterwards: zero drift, every acknowledged transaction's row is in the
audit, no failed transaction left a row, and the final rows are the last
versions the audit saw. Deadlocks (40P01) and serialization failures (40001)
are counted; single-path writers must have none.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql

from machine_sync.client import Client
from machine_sync.errors import DatabaseUnreachable, MachineSyncError

from .model import (
    GUARD,
    Refused,
    Row,
    canonical,
    insert_machine,
    legacy_write,
    normalize,
    proposed_machine,
    rpc_update,
    write_machine,
    write_state,
)
from .workload import (
    BUSY,
    DEADLOCK,
    LEGACY_EFFECT,
    LEGACY_PATHS,
    LOCK_NOT_AVAILABLE,
    REFUSALS,
    RPC_CALLS,
    RULE,
    SERIALIZATION,
    Expect,
    Tx,
    WriterLog,
    check_against_audit,
    double_starts,
    install_audit,
    install_sleep_triggers,
    legacy_params,
    run_writers,
    sleep_in,
    wait_until_sleeping,
)
from machines import add_machine, assert_consistent, machine, wait_until_lock_waiting

THREADS = 8
HOT = 3  # hot machines every writer fights over
OPS = 60  # operations per thread (a legacy path is one operation, two transactions)
STATUSES = ("idle", "processing", "error", "maintenance", "offline")


class Hot:
    """The hot machines and the operations writers run on them."""

    def __init__(self, ids: list[uuid.UUID]) -> None:
        self.ids = ids

    def new_single(self, rng: random.Random) -> list[Tx]:
        machine_id = rng.choice(self.ids)
        status = rng.choice(STATUSES)
        process = uuid.uuid4() if status == "processing" else None
        failure = f"fault {rng.randrange(10**6)}" if status == "error" else None
        statement = (
            "UPDATE machines SET status = %(s)s, current_process_id = %(p)s,"
            " failure_description = %(f)s WHERE id = %(m)s"
        )
        params = {"s": status, "p": process, "f": failure, "m": machine_id}
        return [Tx("new", [(statement, params)], [Expect("machines", machine_id, status, process)])]

    def bulk(self, rng: random.Random, *, ordered: bool) -> list[Tx]:
        ids = rng.sample(self.ids, 2)
        status = rng.choice(("idle", "maintenance", "offline"))
        # Two multi-row UPDATEs lock rows in scan order, which moves as row
        # versions move: they can deadlock each other with or without triggers.
        # Locking in id order first is the usual cure; the ordered form is what
        # a careful client (and the single-path test) uses.
        target = (
            "SELECT id FROM machines WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE"
            if ordered
            else "SELECT unnest(%(ids)s::uuid[])"
        )
        statement = (
            "UPDATE machines SET status = %(s)s, current_process_id = NULL,"
            f" failure_description = NULL WHERE id IN ({target})"
        )
        return [
            Tx(
                "bulk-ordered" if ordered else "bulk",
                [(statement, {"s": status, "ids": ids})],
                [Expect("machines", m, status, None) for m in ids],
            )
        ]

    def rpc(self, rng: random.Random) -> list[Tx]:
        machine_id = rng.choice(self.ids)
        name = rng.choice(("complete", "error", "processing"))
        process_id = uuid.uuid4()
        params = {"m": machine_id, "p": process_id, "msg": "rpc"}
        status = {"complete": "idle", "error": "error", "processing": "processing"}[name]
        process = process_id if name == "processing" else None
        return [
            Tx(
                f"rpc-{name}",
                [(RPC_CALLS[name], params)],
                [Expect("machines", machine_id, status, process)],
            )
        ]

    def legacy(self, rng: random.Random, paths: tuple[str, ...]) -> list[Tx]:
        machine_id = rng.choice(self.ids)
        name = rng.choice(paths)
        params = legacy_params(machine_id)
        txs = []
        for i, (table, statement) in enumerate(LEGACY_PATHS[name]):
            status, process = LEGACY_EFFECT[name][i]
            expected: uuid.UUID | str | None = {"P": params["p"], "NULL": None}.get(
                process or "", "any"
            )
            txs.append(
                Tx(
                    f"legacy-{name}-{i + 1}",
                    [(statement, params)],
                    [Expect(table, machine_id, status, expected)],
                )
            )
        return txs

    def legacy_in_one_transaction(
        self, rng: random.Random, paths: tuple[str, ...], *, reverse: bool
    ) -> list[Tx]:
        """Both statements of a legacy path in one transaction, as written or
        reversed; the transaction must leave what the path's last statement
        says."""
        machine_id = rng.choice(self.ids)
        name = rng.choice(paths)
        params = legacy_params(machine_id)
        statements = list(LEGACY_PATHS[name])
        effects = list(LEGACY_EFFECT[name])
        if reverse:
            statements.reverse()
            effects.reverse()
        table = statements[-1][0]
        status, process = effects[-1]
        expected: uuid.UUID | str | None = {"P": params["p"], "NULL": None}.get(
            process or "", "any"
        )
        return [
            Tx(
                "legacy-reversed" if reverse else "legacy-in-one-tx",
                [(statement, params) for _table, statement in statements],
                [Expect(table, machine_id, status, expected)],
                isolation="READ COMMITTED",
            )
        ]

    def machines_then_state(self, rng: random.Random) -> list[Tx]:
        """A transaction that writes machines (an unwatched column) first and
        then machine_state: it holds the machine row before the state row."""
        machine_id = rng.choice(self.ids)
        status = rng.choice(("idle", "maintenance", "offline"))
        return [
            Tx(
                "machines-then-state",
                [
                    (
                        "UPDATE machines SET location = %(l)s WHERE id = %(m)s",
                        {"m": machine_id, "l": f"Bay {rng.randrange(9)}"},
                    ),
                    (
                        "UPDATE machine_state SET current_state = %(s)s, process_id = NULL"
                        " WHERE machine_id = %(m)s",
                        {"m": machine_id, "s": status},
                    ),
                ],
                [Expect("machines", machine_id, status, None)],
                isolation="READ COMMITTED",
            )
        ]

    def repeatable_read(self, rng: random.Random) -> list[Tx]:
        # Read, then write, in one snapshot: 40001 when someone wrote in between.
        machine_id = rng.choice(self.ids)
        status = rng.choice(STATUSES)
        process = uuid.uuid4() if status == "processing" else None
        return [
            Tx(
                "repeatable-read",
                [
                    ("SELECT status FROM machines WHERE id = %(m)s", {"m": machine_id}),
                    (
                        "UPDATE machines SET status = %(s)s, current_process_id = %(p)s"
                        " WHERE id = %(m)s",
                        {"m": machine_id, "s": status, "p": process},
                    ),
                ],
                [Expect("machines", machine_id, status, process)],
                isolation="REPEATABLE READ",
            )
        ]


@pytest.fixture
def hot(db: Any) -> tuple[str, Hot]:
    """A database with the audit log, hot machines, and a short deadlock_timeout
    so that deadlocks (which are expected in some tests) cost 50 ms, not 1 s."""
    with db.connect(admin=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} SET deadlock_timeout = '50ms'").format(
                sql.Identifier(db.name)
            )
        )
    with db.connect() as conn:
        install_audit(conn)
        ids = [add_machine(conn, status="idle") for _ in range(HOT)]
    return db.dsn, Hot(ids)


def hammer(
    dsn: str,
    workload: Callable[[random.Random], list[Tx]],
    label: str,
    allowed: tuple[str, ...],
    threads: int = THREADS,
    ops: int = OPS,
) -> WriterLog:
    log = run_writers(dsn, workload, threads, ops, allowed=allowed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert_consistent(conn)
        check_against_audit(conn, log)
    failures = log.errors_by_state()
    rate = 100 * sum(failures.values()) / log.total
    print(
        f"\n{label}: {threads} writers x {ops} ops on {HOT} hot machines,"
        f" {log.total} transactions, deadlocks {failures[DEADLOCK]},"
        f" serialization failures {failures[SERIALIZATION]} ({rate:.1f}%); {dict(log.kinds())}"
    )
    return log


def test_new_writers_alone_never_deadlock(hot: tuple[str, Hot]) -> None:
    dsn, h = hot

    def workload(rng: random.Random) -> list[Tx]:
        roll = rng.random()
        if roll < 0.6:
            return h.new_single(rng)
        if roll < 0.8:
            return h.rpc(rng)
        return h.bulk(rng, ordered=True)

    # Only the rules may refuse (a start on a busy machine, a start from error
    # or maintenance); any other error, a deadlock included, fails the test.
    log = hammer(dsn, workload, "new writers only", allowed=(BUSY, RULE))
    assert set(log.errors_by_state()) <= {BUSY, RULE}


def test_legacy_writers_of_one_path_end_consistent(hot: tuple[str, Hot]) -> None:
    """The recipe-start path only (machines first, then machine_state), racing
    on the hot machines: every statement is atomic and mirrored, so the tables
    agree at the end, and the bounded wait of a legacy write for its machine
    (sql/60_guard.sql) means no deadlock at all: a second start is refused as
    busy (MS002) or gives up in a lock cycle (55P03)."""
    dsn, h = hot
    # A deadlock or any undocumented error fails the test.
    log = hammer(dsn, lambda rng: h.legacy(rng, ("start",)), "legacy start path only", REFUSALS)
    assert set(log.errors_by_state()) <= set(REFUSALS)
    assert len(log.acked) > 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert double_starts(conn) == []


def mixed(h: Hot) -> Callable[[random.Random], list[Tx]]:
    """New, legacy (all four paths), RPC, bulk and REPEATABLE READ writers."""
    paths = tuple(LEGACY_PATHS)

    def workload(rng: random.Random) -> list[Tx]:
        roll = rng.random()
        if roll < 0.3:
            return h.new_single(rng)
        if roll < 0.65:
            return h.legacy(rng, paths)
        if roll < 0.75:
            return h.rpc(rng)
        if roll < 0.85:
            return h.bulk(rng, ordered=rng.random() < 0.5)
        return h.repeatable_read(rng)

    return workload


def test_mixed_writers_end_consistent_and_lose_nothing(hot: tuple[str, Hot]) -> None:
    dsn, h = hot
    # Unordered bulk updates may deadlock each other (see Hot.bulk).
    log = hammer(dsn, mixed(h), "mixed writers", (DEADLOCK, SERIALIZATION, *REFUSALS))
    # Each acknowledged kind really ran; the audit check above proved the rest.
    assert {"new", "repeatable-read", "bulk", "bulk-ordered"} <= set(log.kinds())
    assert any(kind.startswith("legacy-error") for kind in log.kinds())


@pytest.mark.soak
def test_mixed_writers_soak(hot: tuple[str, Hot]) -> None:
    dsn, h = hot
    hammer(
        dsn,
        mixed(h),
        "mixed writers (soak)",
        (DEADLOCK, SERIALIZATION, *REFUSALS),
        threads=16,
        ops=600,
    )


def compat_mix(h: Hot) -> Callable[[random.Random], list[Tx]]:
    """Every writer compat must make safe together: the new single UPDATE,
    the four legacy paths statement by statement, in one transaction and in
    the reverse order, the RPCs, and a transaction that writes machines first
    and then machine_state."""
    paths = tuple(LEGACY_PATHS)

    def workload(rng: random.Random) -> list[Tx]:
        roll = rng.random()
        if roll < 0.2:
            return h.new_single(rng)
        if roll < 0.45:
            return h.legacy(rng, paths)
        if roll < 0.65:
            return h.legacy_in_one_transaction(rng, paths, reverse=rng.random() < 0.5)
        if roll < 0.8:
            return h.rpc(rng)
        return h.machines_then_state(rng)

    return workload


def test_compat_writers_never_deadlock_and_never_double_start(hot: tuple[str, Hot]) -> None:
    """No bulk updates here: with row-at-a-time writers, compat adds no
    deadlock of its own. Every error is a documented refusal."""
    dsn, h = hot
    log = hammer(dsn, compat_mix(h), "compat writers", REFUSALS)
    assert DEADLOCK not in log.errors_by_state()
    assert set(log.errors_by_state()) <= set(REFUSALS)
    kinds = set(log.kinds())
    assert {"new", "legacy-in-one-tx", "legacy-reversed", "machines-then-state"} <= kinds
    assert any(kind.startswith("rpc-") for kind in kinds)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert double_starts(conn) == []


# ---------------------------------------------------------------------------
# Deterministic interleavings (a test-only trigger holds one writer mid-statement).


def _in_thread(target: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    failures: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as err:
            failures.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, failures


def test_legacy_writers_racing_one_path_do_not_deadlock(db: Any) -> None:
    """Writer A runs the start path's first statement (machines) and is held
    after the row and its mirror are written; writer B runs its own start
    path's second statement (machine_state) for another process meanwhile.
    B waits for the state row A wrote, then finds the machine busy with A's
    process: MS002, not a deadlock, and A's start stands."""
    with db.connect(admin=True) as superuser:
        superuser.execute(
            sql.SQL("ALTER DATABASE {} SET deadlock_timeout = '50ms'").format(
                sql.Identifier(db.name)
            )
        )
    with db.connect() as admin:
        install_sleep_triggers(admin)
        machine_id = add_machine(admin, status="idle")
        a_process, b_process = uuid.uuid4(), uuid.uuid4()
        with db.connect() as a, db.connect() as b:
            a_pid = a.info.backend_pid
            sleep_in(a, "machines_a_sleep", seconds=0.5)
            start_a = LEGACY_PATHS["start"][0][1]
            thread, failures = _in_thread(
                lambda: a.execute(start_a, legacy_params(machine_id, a_process))
            )
            try:
                # A holds the machines row and its state row, and sleeps.
                wait_until_sleeping(admin, a_pid)
                with pytest.raises(psycopg.Error) as refused:
                    b.execute(LEGACY_PATHS["start"][1][1], legacy_params(machine_id, b_process))
            finally:
                thread.join()
            assert failures == []
            assert refused.value.sqlstate == BUSY, refused.value
            assert_consistent(admin)
            assert machine(admin, machine_id)["current_process_id"] == a_process


def test_legacy_state_insert_racing_a_machines_write_leaves_no_drift(db: Any) -> None:
    with db.connect() as admin:
        install_sleep_triggers(admin)
        machine_id = add_machine(admin, status="idle")
        with db.connect() as legacy, db.connect() as writer:
            legacy_pid = legacy.info.backend_pid
            # The legacy INSERT agrees with machines, so it does not lock the
            # machines row; it is held after replacing the state row.
            sleep_in(legacy, "machine_state_zz_sleep", seconds=0.5)
            thread, failures = _in_thread(
                lambda: legacy.execute(
                    "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'idle')",
                    [machine_id],
                )
            )
            try:
                held = wait_until_sleeping(admin, legacy_pid, gave_up=lambda: not thread.is_alive())
                writer_thread, writer_failures = _in_thread(
                    lambda: writer.execute(
                        "UPDATE machines SET status = 'maintenance' WHERE id = %s", [machine_id]
                    )
                )
                if held:
                    wait_until_lock_waiting(admin, writer.info.backend_pid)
            finally:
                thread.join()
            writer_thread.join()
            assert writer_failures == []
            # Refusing the plain INSERT of an existing row (23505) is a fix too:
            # then there is no race. Any other failure is not.
            assert all(isinstance(f, psycopg.errors.UniqueViolation) for f in failures), failures
        assert machine(admin, machine_id)["status"] == "maintenance"
        assert_consistent(admin)


# ---------------------------------------------------------------------------
# Random operations of every kind of writer, with backends killed at random.

KILL_WRITERS = 8
KILL_OWNED = 4  # machines each writer starts with (it inserts and deletes more)
# (batches, operations per writer per batch): CI, then --soak (>= 100 000 operations).
KILL_SIZES = {"ci": (3, 120), "soak": (50, 250)}
KILL_EVERY = 0.05  # mean seconds between two kills


def kill_sizes(config: pytest.Config) -> tuple[int, int]:
    return KILL_SIZES["soak" if config.getoption("--soak") else "ci"]


Rows = dict[uuid.UUID, Row]
Change = Callable[[Rows, str], None]  # a statement's effect on a writer's rows, in a mode


@dataclass
class Stmt:
    """One statement (or client call) and what it does to the writer's machines."""

    send: Callable[[Any], object]
    change: Change
    in_savepoint: bool = False


@dataclass
class Step:
    """One transaction: a single autocommit statement, or several between
    BEGIN and COMMIT, one of which may run in a savepoint that is released
    or rolled back."""

    kind: str
    stmts: list[Stmt]
    release: bool = True  # the savepoint's fate

    @property
    def explicit(self) -> bool:
        return len(self.stmts) > 1


# The outcome of a step: (its error or None, the savepointed statement's
# error, "ok" or None when there is none), and the rows it leaves.
Outcome = tuple[tuple[str | None, str | None], Rows]


def outcomes(step: Step, rows: Rows) -> list[Outcome]:
    """Every outcome the model allows: the mode may switch between any two
    statements (another writer switches it), so each statement may meet
    either mode."""
    found: list[Outcome] = []
    for modes in itertools.product(("compat", "strict"), repeat=len(step.stmts)):
        current, error, inner = dict(rows), None, None
        for stmt, mode in zip(step.stmts, modes, strict=True):
            trial = dict(current)
            try:
                stmt.change(trial, mode)
            except Refused as refused:
                if stmt.in_savepoint:
                    inner = refused.sqlstate
                    continue
                error, current = refused.sqlstate, dict(rows)
                break
            if stmt.in_savepoint:
                inner = "ok"
                if not step.release:
                    continue
            current = trial
        found.append(((error, inner), current))
    return found


def client_error(err: MachineSyncError) -> str:
    """What identifies a client refusal: its SQLSTATE, or its class when the
    client itself classified an UPDATE that returned no row."""
    return err.sqlstate or type(err).__name__


class Killed(Exception):
    """The writer's backend was terminated under it."""


@dataclass
class Owner:
    """One writer, the machines only it writes and its model of them."""

    index: int
    tag: uuid.UUID  # machines.admin_id of every machine it owns
    rows: Rows
    hot: list[uuid.UUID]
    counter: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def marker(self) -> uuid.UUID:
        """A process id nobody else writes: the writer's index and a serial."""
        self.counter += 1
        return uuid.UUID(int=(self.index + 1) << 96 | self.counter)

    def message(self) -> str:
        self.counter += 1
        return f"w{self.index} #{self.counter}"


def plain(text: str, params: Any, change: Change) -> Stmt:
    return Stmt(lambda conn: conn.execute(text, params), change)


def on_row(machine_id: uuid.UUID, write: Callable[[Row, str], Row]) -> Change:
    """A change of one existing machine (an UPDATE ... WHERE id matches nothing otherwise)."""

    def change(rows: Rows, mode: str) -> None:
        if machine_id in rows:
            rows[machine_id] = write(rows[machine_id], mode)

    return change


def insert_sql(conflict: str = "") -> str:
    return (
        "INSERT INTO machines (id, serial_number, location, lab_name, lab_institution, model,"
        " machine_type, install_date, last_maintenance_date, admin_id, status,"
        " current_process_id, failure_description) VALUES (%(m)s, 'SN', 'Bay', 'Lab', 'Inst',"
        " 'S200', 'ALD', now(), now(), %(tag)s, %(s)s, %(p)s, %(f)s) " + conflict
    )


def target(owner: Owner, rng: random.Random, machine_id: uuid.UUID) -> dict[str, Any]:
    """A status to go to (mostly allowed from where the machine is), with
    its process or failure marker."""
    row = owner.rows[machine_id]
    if row.status == "processing":
        status = rng.choice(("idle", "IDLE", "error", " Offline", "maintenance", "processing"))
    else:
        status = rng.choice(("processing", "running", "idle", "error", "MAINTENANCE", "busy"))
    normal = canonical(status)
    process = owner.marker() if normal == "processing" else None
    failure = owner.message() if normal == "error" else None
    return {"m": machine_id, "s": status, "p": process, "f": failure, "tag": owner.tag}


def new_update(owner: Owner, rng: random.Random, machine_id: uuid.UUID) -> Stmt:
    params = target(owner, rng, machine_id)
    return plain(
        "UPDATE machines SET status = %(s)s, current_process_id = %(p)s,"
        " failure_description = %(f)s WHERE id = %(m)s",
        params,
        on_row(
            machine_id,
            lambda row, _mode: write_machine(
                row, status=params["s"], process_id=params["p"], failure_description=params["f"]
            ),
        ),
    )


def client_op(owner: Owner, rng: random.Random, machine_id: uuid.UUID) -> Stmt:
    """One of machine_sync.Client's operations, on the writer's connection."""
    row = owner.rows[machine_id]
    if row.status == "processing":
        name = rng.choice(("complete", "stop", "fail", "set", "start", "complete-other"))
    else:
        name = rng.choice(("start", "start", "fail", "set", "complete"))
    run = row.process_id or owner.marker()
    if name == "start":
        process = owner.marker()
        return Stmt(
            lambda conn: Client(conn).start_process(machine_id, process),
            on_row(
                machine_id,
                lambda row, _m: write_machine(row, status="processing", process_id=process),
            ),
        )
    if name in ("complete", "stop", "complete-other"):
        ended = owner.marker() if name == "complete-other" else run

        def end(row: Row, _mode: str) -> Row:
            # The client names the run it ends: MS005 unless it is current.
            return write_machine(row, status="idle", process_id=ended)

        call = Client.stop_process if name == "stop" else Client.complete_process
        return Stmt(lambda conn: call(Client(conn), machine_id, ended), on_row(machine_id, end))
    if name == "fail":
        message, part = owner.message(), rng.choice((None, uuid.UUID(int=0xC0)))
        return Stmt(
            lambda conn: Client(conn).fail_process(machine_id, message, part),
            on_row(
                machine_id,
                lambda row, _m: write_machine(
                    row, status="error", failure_description=message, failure_component=part
                ),
            ),
        )
    status = rng.choice(("idle", "Maintenance", "offline", "processing", "idle\u200b"))
    return Stmt(
        lambda conn: Client(conn).set_status(machine_id, status),
        on_row(machine_id, lambda row, _m: write_machine(row, status=status)),
    )


def legacy_stmts(owner: Owner, rng: random.Random, machine_id: uuid.UUID) -> list[Stmt]:
    """The two statements of one legacy path, as the legacy code sends them."""
    row = owner.rows[machine_id]
    path = rng.choice(("complete", "error", "stop") if row.status == "processing" else ("start",))
    if rng.random() < 0.2:
        path = rng.choice(sorted(LEGACY_PATHS))  # out of turn: the rules may refuse it
    process, message = owner.marker(), owner.message()
    params = legacy_params(machine_id, process, message)
    return [
        plain(
            text,
            params,
            on_row(
                machine_id,
                lambda row, mode, table=table: legacy_write(
                    row, path, table, mode, process, message
                ),
            ),
        )
        for table, text in LEGACY_PATHS[path]
    ]


def rpc_op(owner: Owner, rng: random.Random, machine_id: uuid.UUID) -> Stmt:
    row = owner.rows[machine_id]
    name = rng.choice(
        ("complete", "error", "update") if row.status == "processing" else ("processing", "error")
    )
    process, message = owner.marker(), owner.message()
    params: dict[str, Any] = {"m": machine_id, "p": process, "msg": message}
    if name == "complete":
        change = {"status": "idle"}
    elif name == "error":
        change = {"status": "error", "description": "Recipe execution error: " + message}
    elif name == "processing":
        change = {"status": "processing", "process_id": process}
    else:  # atomic_update_machine_state, both spellings given
        params.update(s="maintenance", p=None, f=False)
        change = {
            "status": "maintenance",
            "state_status": "maintenance",
            "failure_mode": False,
            "description": message,
        }
    return plain(
        RPC_CALLS[name], params, lambda rows, _mode: rpc_update(rows, machine_id, **change)
    )


def insert_op(owner: Owner, rng: random.Random) -> Stmt:
    machine_id = uuid.uuid4()
    status = rng.choice(("idle", "offline", "Maintenance", "error", "processing", "bogus"))
    process = owner.marker() if status == "processing" and rng.random() < 0.8 else None
    failure = owner.message() if status == "error" else None
    params = {"m": machine_id, "s": status, "p": process, "f": failure, "tag": owner.tag}

    def change(rows: Rows, _mode: str) -> None:
        rows[machine_id] = insert_machine(
            status=status, process_id=process, failure_description=failure
        )

    return plain(insert_sql(), params, change)


def delete_op(machine_id: uuid.UUID) -> Stmt:
    return plain(
        "DELETE FROM machines WHERE id = %(m)s",
        {"m": machine_id},
        lambda rows, _mode: rows.pop(machine_id, None) and None,
    )


def upsert_op(owner: Owner, rng: random.Random, machine_id: uuid.UUID) -> Stmt:
    """INSERT ... ON CONFLICT on machines (DO UPDATE or DO NOTHING), or a
    legacy upsert of machine_state (supabase-py's upsert())."""
    params = target(owner, rng, machine_id)
    kind = rng.choice(("update", "nothing", "state"))
    if kind == "state":

        def state_change(row: Row, mode: str) -> Row:
            # The guard refuses it first in strict; in compat BEFORE INSERT
            # normalizes the proposed row even on a conflict.
            if mode == "strict":
                raise Refused(GUARD)
            return write_state(row, mode, status=normalize(params["s"]), process_id=params["p"])

        return plain(
            "INSERT INTO machine_state (machine_id, current_state, process_id)"
            " VALUES (%(m)s, %(s)s, %(p)s) ON CONFLICT (machine_id) DO UPDATE"
            " SET current_state = excluded.current_state, process_id = excluded.process_id",
            params,
            on_row(machine_id, state_change),
        )

    def change(rows: Rows, _mode: str) -> None:
        # BEFORE INSERT runs even on a conflict: excluded is its result (the
        # machine exists, so the AFTER INSERT check never runs).
        proposed = proposed_machine(
            status=params["s"], process_id=params["p"], failure_description=params["f"]
        )
        if kind == "update":
            rows[machine_id] = write_machine(
                rows[machine_id],
                status=proposed.status,
                process_id=proposed.process_id,
                failure_description=proposed.failure_description,
            )

    action = (
        "DO NOTHING"
        if kind == "nothing"
        else "DO UPDATE SET status = excluded.status, current_process_id ="
        " excluded.current_process_id, failure_description = excluded.failure_description"
    )
    return plain(insert_sql(f"ON CONFLICT (id) {action}"), params, change)


def merge_op(owner: Owner, rng: random.Random, machine_id: uuid.UUID | None) -> Stmt:
    """MERGE: update or delete an owned machine, or insert a new one."""
    remove = machine_id is not None and rng.random() < 0.3
    if machine_id is None:
        machine_id = uuid.uuid4()
        params = {"m": machine_id, "s": "offline", "p": None, "f": None, "tag": owner.tag}
    else:
        params = target(owner, rng, machine_id)
    params["remove"] = remove
    new_id = machine_id

    def change(rows: Rows, _mode: str) -> None:
        if new_id in rows and remove:
            del rows[new_id]
        elif new_id in rows:
            rows[new_id] = write_machine(
                rows[new_id],
                status=params["s"],
                process_id=params["p"],
                failure_description=params["f"],
            )
        else:
            rows[new_id] = insert_machine(status=params["s"])

    return plain(
        "MERGE INTO machines AS m USING (VALUES (%(m)s::uuid)) AS v (id) ON m.id = v.id"
        " WHEN MATCHED AND %(remove)s THEN DELETE"
        " WHEN MATCHED THEN UPDATE SET status = %(s)s, current_process_id = %(p)s,"
        " failure_description = %(f)s"
        " WHEN NOT MATCHED THEN INSERT (id, serial_number, location, lab_name,"
        " lab_institution, model, machine_type, install_date, last_maintenance_date,"
        " admin_id, status) VALUES (v.id, 'SN', 'Bay', 'Lab', 'Inst', 'S200', 'ALD',"
        " now(), now(), %(tag)s, %(s)s)",
        params,
        change,
    )


def bulk_op(owner: Owner, rng: random.Random) -> Stmt:
    ids = sorted(owner.rows)
    status = rng.choice(("idle", "offline", "maintenance", "error"))

    def change(rows: Rows, _mode: str) -> None:
        for machine_id in ids:
            rows[machine_id] = write_machine(rows[machine_id], status=status)

    return plain(
        "UPDATE machines SET status = %(s)s WHERE admin_id = %(tag)s",
        {"s": status, "tag": owner.tag},
        change,
    )


def mode_op(rng: random.Random) -> Stmt:
    mode = rng.choice(("compat", "strict"))
    if rng.random() < 0.5:
        return Stmt(lambda conn: Client(conn).set_mode(mode), lambda _rows, _mode: None)
    return plain("SELECT machine_sync.set_mode_v1(%(mode)s)", {"mode": mode}, lambda _r, _m: None)


def next_operation(owner: Owner, rng: random.Random) -> tuple[str, list[Step]]:
    """One operation: its kind and the transactions it runs, in order."""
    if not owner.rows or (len(owner.rows) < 3 and rng.random() < 0.3):
        return "insert", [Step("insert", [insert_op(owner, rng)])]
    machine_id = rng.choice(sorted(owner.rows))
    kind = rng.choice(
        (
            "new",
            "new",
            "client",
            "client",
            "legacy",
            "legacy-reversed",
            "legacy-in-one-tx",
            "rpc",
            "insert",
            "delete",
            "upsert",
            "merge",
            "bulk",
            "savepoint",
            "mode",
            "hot",
        )
    )
    if kind == "delete" and len(owner.rows) <= 2:
        kind = "insert"
    if kind == "insert" and len(owner.rows) >= 8:
        kind = "delete"
    single: dict[str, Callable[[], Stmt]] = {
        "new": lambda: new_update(owner, rng, machine_id),
        "client": lambda: client_op(owner, rng, machine_id),
        "rpc": lambda: rpc_op(owner, rng, machine_id),
        "insert": lambda: insert_op(owner, rng),
        "delete": lambda: delete_op(machine_id),
        "upsert": lambda: upsert_op(owner, rng, machine_id),
        "merge": lambda: merge_op(owner, rng, machine_id if rng.random() < 0.8 else None),
        "bulk": lambda: bulk_op(owner, rng),
        "mode": lambda: mode_op(rng),
    }
    if kind in single:
        return kind, [Step(kind, [single[kind]()])]
    if kind == "hot":
        return kind, []  # see hot_operation
    if kind == "savepoint":
        first = new_update(owner, rng, machine_id)
        inner = rng.choice((client_op, rpc_op, new_update, upsert_op))(owner, rng, machine_id)
        inner.in_savepoint = True
        if rng.random() < 0.5:
            inner = legacy_stmts(owner, rng, machine_id)[rng.randrange(2)]
            inner.in_savepoint = True
        return kind, [Step(kind, [first, inner], release=rng.random() < 0.5)]
    statements = legacy_stmts(owner, rng, machine_id)
    if kind != "legacy":
        statements.reverse()
    if kind == "legacy-in-one-tx":
        if rng.random() < 0.5:
            statements.reverse()  # as written, or reversed, in one transaction
        return kind, [Step(kind, statements)]
    return kind, [Step(kind, [stmt]) for stmt in statements]


HOT_ALLOWED = (BUSY, RULE, GUARD, SERIALIZATION, LOCK_NOT_AVAILABLE, DEADLOCK)


def hot_operation(conn: Any, owner: Owner, rng: random.Random) -> None:
    """A write of a machine every writer shares: contention, refusals and
    lock give-ups; only the invariant is checked for these."""
    machine_id = rng.choice(owner.hot)
    process = owner.marker()
    choice = rng.randrange(4)
    try:
        if choice == 0:
            status = rng.choice(STATUSES)
            conn.execute(
                "UPDATE machines SET status = %s, current_process_id = %s WHERE id = %s",
                [status, process if status == "processing" else None, machine_id],
            )
        elif choice == 1:
            conn.execute(LEGACY_PATHS["start"][1][1], legacy_params(machine_id, process))
        elif choice == 2:
            conn.execute(LEGACY_PATHS["complete"][1][1], legacy_params(machine_id, process))
        else:
            conn.execute(
                RPC_CALLS[rng.choice(("complete", "error"))], {"m": machine_id, "msg": "hot"}
            )
    except psycopg.OperationalError as err:
        if err.sqlstate in HOT_ALLOWED:
            owner.counts[f"hot {err.sqlstate}"] += 1
            return
        raise Killed from err
    except psycopg.Error as err:
        if err.sqlstate not in HOT_ALLOWED:
            raise
        owner.counts[f"hot {err.sqlstate}"] += 1


def send(conn: Any, step: Step) -> tuple[str | None, str | None]:
    """Run one step; return (its error, the savepointed statement's result).
    Raises Killed (with ``committing`` set) when the backend dies under it."""
    committing = not step.explicit
    try:
        if not step.explicit:
            try:
                step.stmts[0].send(conn)
            except MachineSyncError as err:
                if isinstance(err, DatabaseUnreachable):
                    raise
                return client_error(err), None
            except psycopg.Error as err:
                if isinstance(err, psycopg.OperationalError) and err.sqlstate not in HOT_ALLOWED:
                    raise
                return err.sqlstate, None
            return None, None
        conn.execute("BEGIN")
        inner: str | None = None
        try:
            for stmt in step.stmts:
                if not stmt.in_savepoint:
                    stmt.send(conn)
                    continue
                conn.execute("SAVEPOINT s")
                try:
                    stmt.send(conn)
                    inner = "ok"
                except (psycopg.Error, MachineSyncError) as err:
                    if isinstance(err, DatabaseUnreachable | psycopg.OperationalError) and (
                        getattr(err, "sqlstate", None) not in HOT_ALLOWED
                    ):
                        raise
                    inner = client_error(err) if isinstance(err, MachineSyncError) else err.sqlstate
                    conn.execute("ROLLBACK TO SAVEPOINT s")
                    continue
                conn.execute("RELEASE SAVEPOINT s" if step.release else "ROLLBACK TO SAVEPOINT s")
        except MachineSyncError as err:
            if isinstance(err, DatabaseUnreachable):
                raise
            conn.execute("ROLLBACK")
            return client_error(err), inner
        except psycopg.Error as err:
            if isinstance(err, psycopg.OperationalError) and err.sqlstate not in HOT_ALLOWED:
                raise
            conn.execute("ROLLBACK")
            return err.sqlstate, inner
        committing = True
        conn.execute("COMMIT")
        return None, inner
    except (psycopg.OperationalError, DatabaseUnreachable) as err:
        killed = Killed(str(err))
        killed.committing = committing  # type: ignore[attr-defined]
        raise killed from err


def read_owned(conn: Any, tag: uuid.UUID) -> Rows:
    return {
        row[0]: Row(*row[1:])
        for row in conn.execute(
            "SELECT id, status, current_process_id, failure_description, failure_component"
            " FROM machines WHERE admin_id = %s",
            [tag],
        )
    }


@dataclass
class KillRun:
    """What one soak run did, for its report."""

    ops: int = 0
    steps: int = 0
    kills: int = 0
    kills_in_flight: int = 0
    reconnects: int = 0
    batches: int = 0
    drift_found: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)


def writer_batch(
    db: Any,
    owner: Owner,
    ops: int,
    seed: int,
    run: KillRun,
    lock: threading.Lock,
    pids: dict[int, int],
) -> None:
    rng = random.Random(seed)
    conn = db.connect()
    pids[owner.index] = conn.info.backend_pid
    try:
        for _ in range(ops):
            kind, steps = next_operation(owner, rng)
            with lock:
                run.ops += 1
                run.kinds[kind] += 1
            if kind == "hot":
                try:
                    hot_operation(conn, owner, rng)
                except Killed:
                    conn = reconnect(db, owner, pids, run, lock, conn)
                continue
            for step in steps:
                found = outcomes(step, owner.rows)
                with lock:
                    run.steps += 1
                try:
                    result = send(conn, step)
                except Killed as killed:
                    possible = [owner.rows]
                    if getattr(killed, "committing", True):
                        possible += [rows for (error, _inner), rows in found if error is None]
                    conn, actual = reconnect_and_read(db, owner, pids, run, lock, conn)
                    assert actual in possible, (
                        f"writer {owner.index}: {step.kind} killed; found {actual},"
                        f" possible {possible}"
                    )
                    owner.rows = actual
                    with lock:
                        run.kills_in_flight += 1
                    break  # a legacy client whose statement failed stops there
                matching = [rows for key, rows in found if key == result]
                assert matching, (
                    f"writer {owner.index}: {step.kind} gave {result};"
                    f" the model allows {[key for key, _ in found]}"
                )
                if any(rows != matching[0] for rows in matching):
                    actual = read_owned(conn, owner.tag)
                    assert actual in matching, f"{step.kind}: {actual} not in {matching}"
                    matching = [actual]
                owner.rows = matching[0]
                if result[0] is not None:
                    with lock:
                        run.refusals[result[0]] += 1
                    break
    finally:
        pids.pop(owner.index, None)
        conn.close()


def writer_thread(
    db: Any,
    owner: Owner,
    ops: int,
    seed: int,
    run: KillRun,
    lock: threading.Lock,
    pids: dict[int, int],
    failures: list[BaseException],
) -> None:
    try:
        writer_batch(db, owner, ops, seed, run, lock, pids)
    except BaseException as err:  # reported by the test
        failures.append(err)


def reconnect_and_read(
    db: Any, owner: Owner, pids: dict[int, int], run: KillRun, lock: threading.Lock, conn: Any
) -> tuple[Any, Rows]:
    """A new connection and the writer's machines as they are now (the
    killer may terminate the new backend too: then again)."""
    for _attempt in range(100):
        conn = reconnect(db, owner, pids, run, lock, conn)
        try:
            return conn, read_owned(conn, owner.tag)
        except psycopg.OperationalError:
            continue
    raise AssertionError(f"writer {owner.index} could not read its machines back")


def reconnect(
    db: Any, owner: Owner, pids: dict[int, int], run: KillRun, lock: threading.Lock, conn: Any
) -> Any:
    conn.close()
    fresh = db.connect()
    pids[owner.index] = fresh.info.backend_pid
    with lock:
        run.reconnects += 1
    return fresh


def test_random_operations_with_backends_killed(db: Any, request: pytest.FixtureRequest) -> None:
    """Every kind of writer (new single UPDATE, the client's operations, the
    four legacy paths statement by statement in both orders and in one
    transaction, the RPCs, inserts, deletes, upserts of both tables, MERGE,
    bulk updates, savepoints released or rolled back, mode switches) on 8
    connections, while an admin connection terminates a random writer's
    backend every few tens of milliseconds.

    Each writer owns its machines (admin_id is its tag) and keeps a model of
    them (tests/reliability/model.py): every acknowledged statement's result,
    or the refusal the model predicts. A statement whose backend was killed
    may or may not have committed (only once its COMMIT was sent): the
    machines then hold the model before it or after it, nothing else. After
    every batch machine_sync.drift is empty and every writer's machines are
    exactly its model: no acknowledged write is lost, no refused or
    rolled-back one left anything. A few operations hit machines every writer
    shares, for contention; only the invariant is checked for those."""
    batches, ops = kill_sizes(request.config)
    with db.connect(admin=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} SET deadlock_timeout = '50ms'").format(
                sql.Identifier(db.name)
            )
        )
    with db.connect() as conn:
        hot_ids = [add_machine(conn, status="idle") for _ in range(2)]
        owners = []
        for index in range(KILL_WRITERS):
            tag = uuid.uuid4()
            ids = [add_machine(conn, status="idle", admin_id=tag) for _ in range(KILL_OWNED)]
            owners.append(Owner(index, tag, {m: Row("idle") for m in ids}, hot_ids))
    run = KillRun()
    lock = threading.Lock()
    started = time.monotonic()
    with db.connect(admin=True) as admin, db.connect() as checker:
        killer_rng = random.Random(7)
        for batch in range(batches):
            pids: dict[int, int] = {}
            failures: list[BaseException] = []
            done = threading.Event()

            threads = [
                threading.Thread(
                    target=writer_thread,
                    args=(db, owner, ops, batch * 1000 + owner.index, run, lock, pids, failures),
                )
                for owner in owners
            ]
            for thread in threads:
                thread.start()
            while not done.wait(killer_rng.expovariate(1 / KILL_EVERY)):
                if not any(thread.is_alive() for thread in threads):
                    done.set()
                    break
                victims = list(pids.values())
                if victims:
                    killed = admin.execute(
                        "SELECT pg_terminate_backend(%s)", [killer_rng.choice(victims)]
                    ).fetchone()
                    if killed == (True,):
                        run.kills += 1
            for thread in threads:
                thread.join()
            if failures:
                raise failures[0]
            run.batches += 1
            drift = Client(checker).drift()
            run.drift_found += len(drift)
            assert drift == []
            assert_consistent(checker)
            for owner in owners:
                assert read_owned(checker, owner.tag) == owner.rows, f"writer {owner.index}"
    elapsed = time.monotonic() - started
    hot_refusals: Counter[str] = Counter()
    for owner in owners:
        hot_refusals.update(owner.counts)
    print(
        f"\nrandom operations with kills: {run.ops} operations ({run.steps} transactions)"
        f" on {KILL_WRITERS} connections in {run.batches} batches, {run.kills} backends killed"
        f" ({run.kills_in_flight} mid-transaction, {run.reconnects} reconnects), drift found"
        f" {run.drift_found}, {elapsed:.1f}s; refusals {dict(run.refusals)},"
        f" on the shared machines {dict(hot_refusals)};"
        f" kinds {dict(run.kinds)}"
    )
    assert run.kills > 0
    assert run.kills_in_flight > 0
    assert set(run.kinds) >= {"new", "client", "legacy", "savepoint", "mode", "merge", "bulk"}
