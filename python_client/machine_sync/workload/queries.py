"""Every statement the workload and the demo send, by name: ``workload.sql``."""

from __future__ import annotations

from typing import LiteralString

from machine_sync._queries import named


def statement(name: str) -> LiteralString:
    """The text of the statement called ``name`` in workload.sql."""
    return named("machine_sync.workload", "workload.sql")[name].text
