"""What the steps share: the options, the workspace, the output and what they found."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from machine_sync import workload as wl
from machine_sync.errors import one_line

from .options import DemoError, DemoOptions
from .output import DemoOutput
from .workspace import Workspace


@dataclass
class DemoSession:
    """One run of the demo, from the first step to the summary."""

    options: DemoOptions
    workspace: Workspace
    out: DemoOutput
    summary: dict[str, Any] = field(default_factory=dict)  # what --json prints
    production_ids: list[uuid.UUID] = field(default_factory=list)  # step 1's machines
    workload_ids: list[uuid.UUID] = field(default_factory=list)  # step 3's machines
    legend_shown: bool = False  # the workload table's legend, shown once

    @property
    def workload_config(self) -> wl.WorkloadConfig:
        """The workload of steps 3 and 5, as the options ask."""
        asked = self.options
        return wl.WorkloadConfig(seconds=asked.duration, writers=asked.writers, seed=asked.seed)

    def connect(self) -> wl.Conn:
        """An autocommit connection to the demo's database."""
        return psycopg.connect(self.workspace.dsn, autocommit=True)

    def psql_file(self, dsn: str, path: Path, *, csv: bool = False) -> str:
        """Run ``path`` with psql and say so; what it printed, as ``header: value``."""
        began = time.monotonic()
        result = self.workspace.run_psql(dsn, *(["--csv"] if csv else []), "-f", str(path))
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit code {result.returncode}"
            raise DemoError(f"psql failed on {path.name}: {one_line(reason)}")
        took = time.monotonic() - began
        output = [line for line in result.stdout.splitlines() if line.strip()]
        shown = ""
        headers = output[::2]
        if output and len(output) % 2 == 0 and all(_IDENTIFIER.match(h) for h in headers):
            # One-row SELECTs (the demo's files have no other): header, value, ...
            pairs = zip(headers, output[1::2], strict=True)
            shown = "  " + ", ".join(f"{header}: {value}" for header, value in pairs)
        elif len(output) >= 2:  # a SELECT's header and its values
            shown = f"  {output[0]}: {', '.join(output[1:])}"
        self.out.say(f"  [green]ok[/] {path.name}  [dim]{_headline(path)}  {took:.2f} s[/]{shown}")
        return shown.strip()


_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


def _headline(path: Path, limit: int = 90) -> str:
    """The first sentence of a SQL file's opening comment: what it is for."""
    words: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("--"):
                break
            words.extend(line.strip("- \n").split())
            if words and words[-1].endswith((".", ":")):
                break
    text = " ".join(words).rstrip(".:")
    if len(text) <= limit:
        return text
    opened = text.rfind(" (", 0, limit)
    if opened > 0 and ")" not in text[opened:limit]:
        return text[:opened]  # a remark in parentheses that does not fit: left out
    cut = text[:limit].rsplit(" ", 1)[0]  # at a word's end, not inside one
    return cut.rstrip(" ,;:") + " …"
