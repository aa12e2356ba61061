"""What the demo was asked for, and the one kind of failure it reports."""

from __future__ import annotations

from dataclasses import dataclass

from machine_sync.cli import ExitCode


@dataclass(frozen=True)
class DemoOptions:
    """What the command line asked for."""

    dsn: str | None = None
    keep: bool = False
    json: bool = False
    duration: float = 5.0  # seconds per workload; the A/B run takes 1.5 times this
    machines: int = 12
    writers: int = 4
    seed: int = 1


class DemoError(Exception):
    """A failure the user can act on; its message is one line, ``code`` the exit code."""

    def __init__(self, message: str, code: int = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code
