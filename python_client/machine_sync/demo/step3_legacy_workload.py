"""Step 3: the legacy workload, two statements per event, with faults between them."""

from __future__ import annotations

from machine_sync import workload as wl

from .session import DemoSession
from .workload_report import run_and_report


def legacy_workload(session: DemoSession) -> None:
    """Run the legacy code on new machines of the legacy schema; report the drift it makes."""
    options, config = session.options, session.workload_config
    session.out.step(3, "The legacy workload: two statements per event, with faults")
    with session.connect() as conn:
        session.workload_ids = wl.create_machines(conn, options.machines, prefix="WL-")
    session.out.say(
        f"  {options.writers} writers run recipes (start, then complete/error/stop) on "
        f"{options.machines} new machines for {options.duration:g} s; every "
        f"{config.fault_every}th event's second write waits on a row lock and then its "
        "connection is killed or its "
        f"{config.statement_timeout_ms} ms statement_timeout fires."
    )
    result = run_and_report(session, "legacy code, legacy schema", wl.LegacyPath())
    session.summary["legacy"] = result.to_json()
