"""Step 3: the legacy workload, two statements per event, with faults between them."""

from __future__ import annotations

from machine_sync import workload as wl

from .session import DemoSession
from .workload_report import run_and_report


def legacy_workload(session: DemoSession) -> None:
    """Run the legacy code on new machines of the legacy schema; report the drift it makes."""
    o, config = session.options, session.workload_config
    session.out.step(3, "The legacy workload: two statements per event, with faults")
    with session.connect() as conn:
        session.workload_ids = wl.create_machines(conn, o.machines, prefix="WL-")
    session.out.say(
        f"  {o.writers} writers run recipes (start, then complete/error/stop) on {o.machines} "
        f"new machines for {o.duration:g} s; every {config.fault_every}th event's second "
        f"write waits on a row lock and then its connection is killed or its "
        f"{config.statement_timeout_ms} ms statement_timeout fires."
    )
    result = run_and_report(session, "legacy code, legacy schema", wl.LegacyPath())
    session.summary["legacy"] = result.to_json()
