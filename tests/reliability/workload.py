"""What the reliability tests throw at the database, in one place.

* The four two-statement write paths of the legacy code, statement by
  statement, and the legacy RPC calls.
* Test-only triggers installed into a test database (never into the product):
  an audit log that records every row version written to either table with the
  writer's token, and sleep triggers that hold a transaction inside the trigger
  chain so a fault can be injected there.
* A small writer harness: many threads, one connection each, every transaction
  tagged with a token; the client-side log of acknowledged and failed tokens is
  compared with the audit log afterwards.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

# The client clock legacy writers send; the database must ignore it.
CLIENT_CLOCK = "2000-01-01T00:00:00Z"

# One legacy statement: the table it targets and its SQL, with named
# parameters m (machine id), p (process id), msg (error message), clock.
Statement = tuple[str, str]

LEGACY_PATHS: dict[str, tuple[Statement, Statement]] = {
    "start": (
        (
            "machines",
            "UPDATE machines SET status = 'processing', current_process_id = %(p)s,"
            " updated_at = %(clock)s WHERE id = %(m)s",
        ),
        (
            "machine_state",
            "UPDATE machine_state SET current_state = 'processing', process_id = %(p)s,"
            " state_since = %(clock)s, is_failure_mode = false, failure_component = NULL,"
            " failure_description = NULL WHERE machine_id = %(m)s",
        ),
    ),
    "complete": (
        (
            "machines",
            "UPDATE machines SET status = 'idle', current_process_id = NULL WHERE id = %(m)s",
        ),
        (
            "machine_state",
            "UPDATE machine_state SET current_state = 'idle', process_id = NULL,"
            " state_since = %(clock)s, is_failure_mode = false WHERE machine_id = %(m)s",
        ),
    ),
    "error": (
        (
            "machine_state",
            "UPDATE machine_state SET current_state = 'error', is_failure_mode = true,"
            " failure_description = 'Recipe execution error: ' || %(msg)s"
            " WHERE machine_id = %(m)s",
        ),
        (
            "machines",
            "UPDATE machines SET status = 'error', current_process_id = NULL WHERE id = %(m)s",
        ),
    ),
    "stop": (
        (
            "machines",
            "UPDATE machines SET current_process_id = NULL WHERE id = %(m)s",
        ),
        (
            "machine_state",
            "UPDATE machine_state SET current_state = 'idle', process_id = NULL,"
            " is_failure_mode = false WHERE machine_id = %(m)s",
        ),
    ),
}

# What each legacy statement means for the mirrored values, for the model
# checks: (status, process id) the statement writes; None = left alone,
# "P" = the path's process id.
LEGACY_EFFECT: dict[str, tuple[tuple[str | None, str | None], ...]] = {
    "start": (("processing", "P"), ("processing", "P")),
    "complete": (("idle", "NULL"), ("idle", "NULL")),
    "error": (("error", None), ("error", "NULL")),
    "stop": ((None, "NULL"), ("idle", "NULL")),
}


def legacy_params(
    machine_id: uuid.UUID, process_id: uuid.UUID | None = None, message: str = "boom"
) -> dict[str, Any]:
    """Parameters for the statements of LEGACY_PATHS."""
    return {"m": machine_id, "p": process_id or uuid.uuid4(), "msg": message, "clock": CLIENT_CLOCK}


RPC_CALLS: dict[str, str] = {
    "complete": "SELECT atomic_complete_machine_state(p_machine_id => %(m)s)",
    "error": "SELECT atomic_error_machine_state(p_machine_id => %(m)s, p_error_message => %(msg)s)",
    "processing": (
        "SELECT atomic_processing_machine_state(p_machine_id => %(m)s, p_process_id => %(p)s)"
    ),
    "update": (
        "SELECT atomic_update_machine_state(p_machine_id => %(m)s, p_machine_status => %(s)s,"
        " p_current_process_id => %(p)s, p_machine_state_current_state => %(s)s,"
        " p_machine_state_process_id => %(p)s, p_is_failure_mode => %(f)s,"
        " p_failure_description => %(msg)s)"
    ),
}

# ---------------------------------------------------------------------------
# Test-only triggers. They live in their own schema so nobody mistakes them for
# the product; the product's triggers are untouched.

INSTALL_AUDIT = """
CREATE SCHEMA IF NOT EXISTS reliability;
CREATE TABLE reliability.audit (
    seq bigserial PRIMARY KEY,
    token text,
    tbl text NOT NULL,
    op text NOT NULL,
    machine_id uuid NOT NULL,
    status text NOT NULL,
    process_id uuid,
    failure_description text
);
-- SECURITY DEFINER: the mirror writes machine_state as its mirror role,
-- which may not write this schema.
CREATE FUNCTION reliability.audit_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    IF TG_TABLE_NAME = 'machines' THEN
        INSERT INTO reliability.audit
            (token, tbl, op, machine_id, status, process_id, failure_description)
        VALUES (current_setting('reliability.token', true), TG_TABLE_NAME, TG_OP,
                NEW.id, NEW.status, NEW.current_process_id, NEW.failure_description);
    ELSE
        INSERT INTO reliability.audit
            (token, tbl, op, machine_id, status, process_id, failure_description)
        VALUES (current_setting('reliability.token', true), TG_TABLE_NAME, TG_OP,
                NEW.machine_id, NEW.current_state, NEW.process_id, NEW.failure_description);
    END IF;
    RETURN NULL;
END
$$;
-- AFTER triggers of one event fire in name order. On machines, "zz_": after
-- the mirror's, so the audit sees the row the statement finally wrote. On
-- machine_state, "a_": before the compat carry, whose write of machines makes
-- the mirror rewrite this row (the rules may end a run the legacy statement
-- kept); audited after the carry, the legacy statement's own row would look
-- like the last write when the rewrite is.
CREATE TRIGGER zz_reliability_audit AFTER INSERT OR UPDATE ON public.machines
FOR EACH ROW EXECUTE FUNCTION reliability.audit_row();
CREATE TRIGGER a_reliability_audit AFTER INSERT OR UPDATE ON public.machine_state
FOR EACH ROW EXECUTE FUNCTION reliability.audit_row();
"""

# Sleep triggers: a session that sets reliability.sleep to a trigger's name
# sleeps inside that trigger. Names sort around the product's triggers:
#   machines_a_sleep       < machines_mirror_state (row written, not mirrored yet)
#   machines_zz_sleep      > machines_mirror_state (mirrored, not committed)
#   machine_state_a_sleep  < machine_state_carry_to_machines
#   machine_state_zz_sleep > machine_state_carry_to_machines
SLEEP_TRIGGERS = (
    ("machines", "machines_a_sleep"),
    ("machines", "machines_zz_sleep"),
    ("machine_state", "machine_state_a_sleep"),
    ("machine_state", "machine_state_zz_sleep"),
)

INSTALL_SLEEP_FUNCTION = """
CREATE SCHEMA IF NOT EXISTS reliability;
CREATE FUNCTION reliability.sleep_if_asked() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF current_setting('reliability.sleep', true) = TG_NAME THEN
        PERFORM pg_catalog.pg_sleep(
            coalesce(nullif(current_setting('reliability.sleep_seconds', true), ''), '30')::float8);
    END IF;
    RETURN NULL;
END
$$;
"""


def install_audit(conn: psycopg.Connection[Any]) -> None:
    """Add the test-only audit log to the database behind ``conn``."""
    conn.execute(INSTALL_AUDIT)


def install_sleep_triggers(conn: psycopg.Connection[Any]) -> None:
    """Add the test-only sleep triggers (inactive until a session asks)."""
    conn.execute(INSTALL_SLEEP_FUNCTION)
    for table, name in SLEEP_TRIGGERS:
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER INSERT OR UPDATE ON public.{}"
                " FOR EACH ROW EXECUTE FUNCTION reliability.sleep_if_asked()"
            ).format(sql.Identifier(name), sql.Identifier(table))
        )


def sleep_in(conn: psycopg.Connection[Any], trigger: str | None, seconds: float = 30) -> None:
    """Make this session sleep inside ``trigger`` (None: stop sleeping)."""
    conn.execute("SELECT set_config('reliability.sleep', %s, false)", [trigger or ""])
    conn.execute("SELECT set_config('reliability.sleep_seconds', %s, false)", [str(seconds)])


def wait_until_sleeping(
    admin: psycopg.Connection[Any],
    pid: int,
    timeout: float = 10,
    gave_up: Callable[[], bool] = lambda: False,
) -> bool:
    """Block until backend ``pid`` sits in pg_sleep (inside a sleep trigger);
    return False early if ``gave_up()`` (e.g. its statement already failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = admin.execute(
            "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
        if row is not None and row[0] == "PgSleep":
            return True
        if gave_up():
            return False
        time.sleep(0.01)
    raise AssertionError(f"backend {pid} never reached the sleep trigger")


def snapshot(conn: psycopg.Connection[Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every row of both tables, for before/after comparisons."""
    machines = conn.execute("SELECT * FROM machines ORDER BY id").fetchall()
    states = conn.execute("SELECT * FROM machine_state ORDER BY machine_id").fetchall()
    return machines, states


# ---------------------------------------------------------------------------
# The writer harness.

# SQLSTATEs a concurrent writer may legitimately get; anything else fails the test.
DEADLOCK = "40P01"  # errors.DeadlockDetected
SERIALIZATION = "40001"  # errors.SerializationFailure
# The documented refusals: busy machine, rule refused, legacy write could not
# lock its machine in time (retry).
BUSY = "MS002"
RULE = "MS003"
LOCK_NOT_AVAILABLE = "55P03"
# What a writer may be told instead of a deadlock: the rules' refusals, and a
# compat write to machine_state that gave up its machine to a writer waiting
# for it (40001) or after its bounded poll (55P03); both say retry.
REFUSALS = (BUSY, RULE, SERIALIZATION, LOCK_NOT_AVAILABLE)


@dataclass(frozen=True)
class Expect:
    """A row version an acknowledged transaction must have written (audit check).

    ``status``/``process_id`` None means "not checked"."""

    table: str
    machine_id: uuid.UUID
    status: str | None = None
    process_id: uuid.UUID | str | None = "any"


@dataclass
class Tx:
    """One transaction a writer runs: statements, then what it must have written."""

    kind: str
    statements: list[tuple[str, dict[str, Any]]]
    expect: list[Expect]
    isolation: str | None = None  # None: autocommit, one statement


@dataclass
class WriterLog:
    """Client-side log: which tokens were acknowledged, which failed and why."""

    acked: dict[str, Tx] = field(default_factory=dict)
    failed: dict[str, tuple[Tx, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def errors_by_state(self) -> Counter[str]:
        return Counter(state for _tx, state in self.failed.values())

    def kinds(self) -> Counter[str]:
        every = [tx.kind for tx in self.acked.values()]
        every += [tx.kind for tx, _ in self.failed.values()]
        return Counter(every)

    @property
    def total(self) -> int:
        return len(self.acked) + len(self.failed)


Workload = Callable[[random.Random], list[Tx]]


def run_tx(conn: psycopg.Connection[Any], token: str, tx: Tx) -> None:
    """Run one tagged transaction on an autocommit connection."""
    if tx.isolation is None:
        (statement, params), *rest = tx.statements
        assert not rest, "autocommit transactions hold one statement"
        conn.execute("SELECT set_config('reliability.token', %s, false)", [token])
        conn.execute(statement, params)
        return
    conn.execute(sql.SQL("BEGIN ISOLATION LEVEL {}").format(sql.SQL(tx.isolation)))
    try:
        conn.execute("SELECT set_config('reliability.token', %s, true)", [token])
        for statement, params in tx.statements:
            conn.execute(statement, params)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def run_writers(
    dsn: str,
    workload: Workload,
    threads: int,
    ops_per_thread: int,
    seed: int = 0,
    allowed: Sequence[str] = (DEADLOCK, SERIALIZATION),
) -> WriterLog:
    """Run ``threads`` writers, each drawing ``ops_per_thread`` operations from
    ``workload`` (an operation is a list of transactions, e.g. the two of a
    legacy path). Errors with SQLSTATEs in ``allowed`` are logged; any other
    error is re-raised after all threads stop."""
    log = WriterLog()
    unexpected: list[BaseException] = []
    start = threading.Barrier(threads, timeout=60)

    def writer(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                start.wait()
                for i in range(ops_per_thread):
                    for j, tx in enumerate(workload(rng)):
                        token = f"w{n}-{i}-{j}"
                        try:
                            run_tx(conn, token, tx)
                        except psycopg.Error as err:
                            if err.sqlstate not in allowed:
                                raise
                            with log.lock:
                                log.failed[token] = (tx, err.sqlstate or "?")
                            # A legacy client whose statement failed does not
                            # go on with the second one.
                            break
                        with log.lock:
                            log.acked[token] = tx
        except BaseException as err:  # reported by the caller
            unexpected.append(err)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if unexpected:
        raise unexpected[0]
    return log


def check_against_audit(conn: psycopg.Connection[Any], log: WriterLog) -> None:
    """Every acknowledged transaction wrote what it said, no failed one left a
    trace, and the final rows are the last versions the audit saw."""
    rows = conn.execute(
        "SELECT seq, token, tbl, machine_id, status, process_id FROM reliability.audit ORDER BY seq"
    ).fetchall()
    by_token: dict[str, list[tuple[Any, ...]]] = {}
    last: dict[tuple[str, uuid.UUID], tuple[str, uuid.UUID | None]] = {}
    for _seq, token, table, machine_id, status, process_id in rows:
        by_token.setdefault(token, []).append((table, machine_id, status, process_id))
        last[(table, machine_id)] = (status, process_id)

    leaked = sorted(set(by_token) & set(log.failed))
    assert leaked == [], f"failed transactions left rows behind: {leaked[:5]}"
    unknown = sorted(set(by_token) - set(log.acked) - {None})
    assert unknown == [], f"rows written under tokens nobody acknowledged: {unknown[:5]}"

    for token, tx in log.acked.items():
        written = by_token.get(token, [])
        for exp in tx.expect:
            found = [
                w
                for w in written
                if w[0] == exp.table
                and w[1] == exp.machine_id
                and (exp.status is None or w[2] == exp.status)
                and (exp.process_id == "any" or w[3] == exp.process_id)
            ]
            assert found, f"acknowledged {tx.kind} {token} lost: expected {exp}, audit {written}"

    for table, key in (("machines", "id"), ("machine_state", "machine_id")):
        column = "status" if table == "machines" else "current_state"
        pid = "current_process_id" if table == "machines" else "process_id"
        final = conn.execute(
            sql.SQL("SELECT {}, {}, {} FROM {}").format(
                sql.Identifier(key),
                sql.Identifier(column),
                sql.Identifier(pid),
                sql.Identifier(table),
            )
        ).fetchall()
        for machine_id, status, process_id in final:
            if (table, machine_id) in last:
                assert last[(table, machine_id)] == (status, process_id), (
                    f"{table} {machine_id} changed after its last audited write"
                )


def double_starts(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """Committed machines versions that gave a processing machine another
    process without ending the first run: must be none. Writers of one
    machine are serialized by its row lock, so the audit's order per machine
    is the order the versions were written."""
    return conn.execute(
        """
        SELECT machine_id, prev_process, process_id, token
        FROM (
            SELECT machine_id, status, process_id, token,
                   lag(status) OVER w AS prev_status,
                   lag(process_id) OVER w AS prev_process
            FROM reliability.audit
            WHERE tbl = 'machines'
            WINDOW w AS (PARTITION BY machine_id ORDER BY seq)
        ) AS versions
        WHERE status = 'processing' AND prev_status = 'processing'
          AND process_id IS DISTINCT FROM prev_process
        """
    ).fetchall()
