"""What each workload sends for one state change, and which rows it must write.

A *state change* is what the recipe service does when a recipe starts or
completes: ``status`` and ``current_process_id`` of one machine change, and
``machine_state`` must follow. Every workload does exactly that, with the same
parameters ($1 status, $2 process id, $3 machine id), on the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

MACHINES = "public.machines"
MACHINE_STATE = "public.machine_state"
FLOOR = "machine_sync_bench.floor_machines"
LEGACY_MACHINES = "machine_sync_bench.legacy_machines"
LEGACY_STATE = "machine_sync_bench.legacy_machine_state"
MINIMAL_MACHINES = "machine_sync_bench.minimal_machines"
MINIMAL_STATE = "machine_sync_bench.minimal_machine_state"


@dataclass(frozen=True)
class Workload:
    """One way of making a state change."""

    key: str  # short name used in tables, JSON and --workloads
    label: str  # what a reader of the report sees
    statements: tuple[str, ...]  # query names (queries.sql), sent in this order
    transaction: bool  # wrapped in BEGIN ... COMMIT by the client
    writes: tuple[str, ...]  # tables that get one row update per state change
    # Counts machines whose two rows disagree, run on the two tables of
    # ``writes`` (queries.on_tables); None: no mirror.
    drift_query: str | None


LEGACY_AUTOCOMMIT = Workload(
    "legacy-autocommit",
    "legacy: 2 autocommit statements (machines, then machine_state)",
    ("update_legacy_machines", "update_legacy_state"),
    False,
    (LEGACY_MACHINES, LEGACY_STATE),
    "legacy_drift",
)
LEGACY_AUTOCOMMIT_REVERSED = Workload(
    "legacy-autocommit-rev",
    "legacy: 2 autocommit statements (machine_state, then machines)",
    ("update_legacy_state", "update_legacy_machines"),
    False,
    (LEGACY_MACHINES, LEGACY_STATE),
    "legacy_drift",
)
LEGACY_TRANSACTION = Workload(
    "legacy-transaction",
    "legacy: both statements in one explicit transaction",
    ("update_legacy_machines", "update_legacy_state"),
    True,
    (LEGACY_MACHINES, LEGACY_STATE),
    "legacy_drift",
)
STORED_PROCEDURE = Workload(
    "stored-procedure",
    "stored procedure doing both updates (working RPC)",
    ("call_stored_procedure",),
    False,
    (LEGACY_MACHINES, LEGACY_STATE),
    "legacy_drift",
)
MACHINE_SYNC = Workload(
    "machine-sync",
    "machine-sync: one UPDATE of machines, trigger mirrors",
    ("update_machines",),
    False,
    (MACHINES, MACHINE_STATE),
    "sync_drift",
)
MINIMAL_TRIGGER = Workload(
    "minimal-trigger",
    "reference: the same UPDATE, a trigger that only copies into a second table",
    ("update_minimal_machines",),
    False,
    (MINIMAL_MACHINES, MINIMAL_STATE),
    "legacy_drift",
)
FLOOR_UPDATE = Workload(
    "floor",
    "floor: the same UPDATE on a table without trigger",
    ("update_floor",),
    False,
    (FLOOR,),
    None,
)

WORKLOADS: tuple[Workload, ...] = (
    LEGACY_AUTOCOMMIT,
    LEGACY_AUTOCOMMIT_REVERSED,
    LEGACY_TRANSACTION,
    STORED_PROCEDURE,
    MACHINE_SYNC,
    MINIMAL_TRIGGER,
    FLOOR_UPDATE,
)

# Bulk: one statement (two for the legacy dual write) changes many machines.
BULK_WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "legacy-transaction",
        LEGACY_TRANSACTION.label,
        ("bulk_update_legacy_machines", "bulk_update_legacy_state"),
        True,
        (LEGACY_MACHINES, LEGACY_STATE),
        "legacy_drift",
    ),
    Workload(
        "machine-sync",
        MACHINE_SYNC.label,
        ("bulk_update_machines",),
        False,
        (MACHINES, MACHINE_STATE),
        "sync_drift",
    ),
    Workload(
        "minimal-trigger",
        MINIMAL_TRIGGER.label,
        ("bulk_update_minimal_machines",),
        False,
        (MINIMAL_MACHINES, MINIMAL_STATE),
        "legacy_drift",
    ),
    Workload(
        "floor",
        FLOOR_UPDATE.label,
        ("bulk_update_floor",),
        False,
        (FLOOR,),
        None,
    ),
)


def by_key(keys: list[str] | None) -> tuple[Workload, ...]:
    """The workloads named in ``keys`` (all when None), in the canonical order."""
    if not keys:
        return WORKLOADS
    known = {w.key for w in WORKLOADS}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"unknown workload {', '.join(unknown)}: choose from {', '.join(known)}")
    return tuple(w for w in WORKLOADS if w.key in keys)


def plan(machines: int, clients: int, client: int, step: int) -> tuple[int, bool]:
    """Machine number and direction of a client's ``step``-th state change (from 1).

    Client ``client`` (0-based) of ``clients`` owns machines client+1,
    client+1+clients, ...; it starts a recipe on each of them in turn, then
    completes them in turn, and so on. Clients never touch the same row, so no
    workload waits on another client's row lock, and every state change is a
    real change. The pgbench scripts compute the same thing.
    """
    size = (machines - 1 - client) // clients + 1
    index = (step - 1) % size
    starting = ((step - 1) // size) % 2 == 0
    return client + clients * index + 1, starting
