"""`python -m machine_sync` runs the command line, for when its script is not on PATH."""

from machine_sync.cli import app

app(prog_name="machine-sync")
