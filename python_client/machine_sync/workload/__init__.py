"""The recipe workload, written the legacy way and the machine-sync way, with faults.

A *write path* turns the five events of a recipe's life (start, complete,
error, stop and an operator's reset) into SQL:

* :class:`LegacyPath` is the production code as it runs today: two
  separate autocommit statements per event, in its order (error writes
  ``machine_state`` first), and a start that reads ``machines.status`` and
  checks it in Python before writing.
* :class:`ClientPath` is the same events through :mod:`machine_sync.client`:
  one ``UPDATE machines ... RETURNING`` each, the database refusing what
  its rules do not allow.

:func:`run_workload` drives either path from concurrent writer threads against
a set of machines and injects *the same faults* into both: every few events a
writer's second write (legacy: the second statement; client: the
``machine_state`` write the mirror trigger makes inside the only statement)
is held up by a row lock another session holds, and then either the writer's
``statement_timeout`` fires or its connection is killed with
``pg_terminate_backend``. What it reports is whether the two tables disagree
afterwards, per event and at the end.

:func:`interleaved_throughput` measures state changes per second of several
targets in alternating slices (an A/B run) with the benchmark's throughput
engine (:mod:`machine_sync.benchmark.engine`), and :func:`count_round_trips`
counts statements and round trips per state change, a round trip as the
benchmark's proxy counts it. Every SQL statement this package and the demo run
is named in ``workload.sql``.
"""

from __future__ import annotations

from .db import ProcessIds, connect, create_machines, drift
from .events import Conn, WritePath
from .faults import Fault, FaultInjector, no_fault
from .paths import ClientPath, LegacyPath
from .queries import statement
from .rpcs import LEGACY_RPCS, exercise_legacy_rpcs
from .run import EventStats, WorkloadConfig, WorkloadResult, run_workload
from .throughput import Target, ThroughputResult, interleaved_throughput
from .wire import WireCount, count_round_trips

__all__ = [
    "LEGACY_RPCS",
    "ClientPath",
    "Conn",
    "EventStats",
    "Fault",
    "FaultInjector",
    "LegacyPath",
    "ProcessIds",
    "Target",
    "ThroughputResult",
    "WireCount",
    "WorkloadConfig",
    "WorkloadResult",
    "WritePath",
    "connect",
    "count_round_trips",
    "create_machines",
    "drift",
    "exercise_legacy_rpcs",
    "interleaved_throughput",
    "no_fault",
    "run_workload",
    "statement",
]
