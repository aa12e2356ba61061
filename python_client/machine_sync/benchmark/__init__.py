"""`machine-sync bench`: what the trigger costs, against the legacy dual write,
the stored procedure (the RPC approach), the cheapest trigger mirror (for
reference) and a bare UPDATE without trigger.

Modules: ``workloads`` (what each workload sends), ``scratch`` (where it
runs), ``drivers`` (psycopg threads and pgbench), ``proxy`` (added network
latency), ``contention`` (clients sharing a few hot machines; the client's own
operations against the legacy code paths), ``runner`` (interleaved rounds,
checked writes), ``report``
(markdown, chart, headline ratios). The SQL is in ``queries.sql`` and
``setup.sql``.
"""

from .drivers import find_pgbench
from .runner import QUICK, BenchConfig, BenchResult, run_benchmark
from .scratch import BenchError

__all__ = ["QUICK", "BenchConfig", "BenchError", "BenchResult", "find_pgbench", "run_benchmark"]
