"""The demo's output: rich for people, nothing but the final JSON for machines."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from machine_sync._output import console


class DemoOutput:
    """Lines, step titles, tables and progress bars; all silent with ``--json``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.console = console()  # full width when piped, like the other commands

    def say(self, text: str = "", *, whole: bool = False) -> None:
        """Print a line, wrapped at words to the terminal's width; ``whole`` (and any
        line when piped, where a reader or pager wraps) leaves it one line."""
        if not self.quiet:
            self.console.print(text, soft_wrap=whole or not self.console.is_terminal)

    def step(self, number: int, title: str) -> None:
        """The title of step ``number``."""
        if not self.quiet:
            self.console.print()
            self.console.rule(f"[bold]{number}. {title}", align="left")

    def table(self, table: Table) -> None:
        """Print a table."""
        if not self.quiet:
            self.console.print(table)

    @contextmanager
    def progress(self, label: str, total: float) -> Iterator[Callable[[float, str], None]]:
        """A bar; yields ``update(completed, info)``."""
        if self.quiet:
            yield lambda _done, _info: None
            return
        bar = Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        with bar:
            task = bar.add_task(label, total=total, info="")

            def update(done: float, info: str) -> None:
                bar.update(task, completed=min(done, total), info=info)

            yield update
            bar.update(task, completed=total)

    def data_line(self, where: str) -> None:
        """The last line: where the data is now."""
        if not self.quiet:
            self.console.print()
            self.console.print(f"[bold]Data:[/] {where}", soft_wrap=True)


def percent(part: float, whole: float) -> str:
    """``part`` of ``whole`` as a whole percentage ("-" of nothing)."""
    return f"{100.0 * part / whole:.0f}%" if whole else "-"


def writers_label(count: int) -> str:
    """ "1 writer", "4 writers"."""
    return f"{count} writer" + ("" if count == 1 else "s")
