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

import random
import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from .workload import (
    BUSY,
    DEADLOCK,
    LEGACY_EFFECT,
    LEGACY_PATHS,
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
