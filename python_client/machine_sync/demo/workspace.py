"""Where the demo runs: a server, its psql, the throwaway databases, what is left after."""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from machine_sync import workload as wl
from machine_sync.benchmark.queries import CREATE_DATABASE, naming
from machine_sync.benchmark.scratch import drop_database
from machine_sync.cli import ExitCode
from machine_sync.dsn import parse_dsn, shown
from machine_sync.errors import InvalidArgument, one_line
from machine_sync.server import EMBEDDED_USER, Server, embedded_server, find_psql

from .options import DemoError, DemoOptions
from .output import DemoOutput


@dataclass
class Workspace:
    """The server the demo uses, the psql it runs and the databases it made there."""

    server: Server
    psql: str
    database: str
    started_here: bool  # we started the server (embedded) rather than borrowed it
    keep: bool
    databases: list[str] = field(default_factory=list)  # created here, dropped at the end
    left_behind: dict[str, Any] = field(default_factory=dict)  # filled when it closes

    @property
    def dsn(self) -> str:
        """The demo's main database."""
        return self.server.dsn_for(self.database)

    def create_database(self, name: str) -> str:
        """A new throwaway database; its DSN."""
        try:
            with psycopg.connect(self.server.dsn, autocommit=True, connect_timeout=10) as conn:
                conn.execute(naming(CREATE_DATABASE, name))
        except psycopg.Error as exc:
            raise DemoError(
                f"cannot create a throwaway database on that server "
                f"(the demo needs CREATEDB): {one_line(str(exc))}"
            ) from None
        self.databases.append(name)
        return self.server.dsn_for(name)

    def drop_databases(self) -> None:
        """Drop every database the demo created."""
        with psycopg.connect(self.server.dsn, autocommit=True, connect_timeout=10) as conn:
            for name in reversed(self.databases):
                drop_database(conn, name)

    def run_psql(self, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run psql as a user would: no psqlrc, stop at the first error."""
        params = conninfo_to_dict(dsn)
        env = dict(os.environ)
        password = params.pop("password", None)
        if password is not None:  # keep it out of the process list
            env["PGPASSWORD"] = str(password)
        argv = [self.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", make_conninfo("", **params)]
        return subprocess.run([*argv, *args], capture_output=True, text=True, check=False, env=env)

    def psql_command(self) -> str:
        """The command that connects to the demo's database (no password in it)."""
        return shlex.join([self.psql, shown(conninfo_to_dict(self.dsn))])

    def stop_command(self) -> str | None:
        """The command that stops a server the demo started and kept."""
        if not self.started_here or self.server.data_dir is None or self.server.bin_dir is None:
            return None
        argv = [str(self.server.bin_dir / "pg_ctl"), "-D", str(self.server.data_dir), "stop"]
        if os.geteuid() == 0:  # server.py runs the server as this user when we are root
            argv = ["runuser", "-u", EMBEDDED_USER, "--", *argv]
        return shlex.join(argv)


@contextmanager
def open_workspace(options: DemoOptions, out: DemoOutput) -> Iterator[Workspace]:
    """A server (borrowed or started) with a fresh database; cleaned up on exit."""
    name = f"machine_sync_demo_{uuid.uuid4().hex[:8]}"
    if options.dsn:
        params = _dsn_params(options.dsn)
        afterwards = "and keep them (--keep)" if options.keep else "and drop them at the end"
        out.say(
            f"Using the server {shown(params) or '(libpq defaults)'} (--dsn): "
            f"the demo will create the databases {name} and {name}_legacy there {afterwards}.",
            whole=True,
        )
        server = _borrowed_server(options.dsn)
        workspace = Workspace(server, find_psql(server), name, False, options.keep)
        with _throwaway_databases(workspace):
            yield workspace
        return
    out.say("Starting the embedded PostgreSQL (durability on, as in production)...")
    with embedded_server(keep=options.keep, fast=False) as server:
        workspace = Workspace(server, find_psql(server), name, True, options.keep)
        with _throwaway_databases(workspace):
            yield workspace


def _dsn_params(dsn: str) -> dict[str, Any]:
    try:
        return parse_dsn(dsn)
    except InvalidArgument as exc:
        raise DemoError(str(exc), ExitCode.BAD_INPUT) from None


def _borrowed_server(dsn: str) -> Server:
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(wl.statement("server_version")).fetchone()
    except psycopg.Error as exc:
        raise DemoError(
            f"cannot connect to the database: {one_line(str(exc))}", ExitCode.UNREACHABLE
        ) from None
    version = int(row[0]) if row else 0
    return Server(dsn=dsn, version=version, bin_dir=None, label="dsn", data_dir=None)


@contextmanager
def _throwaway_databases(workspace: Workspace) -> Iterator[None]:
    workspace.create_database(workspace.database)
    dropped = False
    try:
        yield
    finally:
        if not workspace.keep and not workspace.started_here:
            # A borrowed server outlives us: drop what we made, even after Ctrl-C.
            try:
                workspace.drop_databases()
            except psycopg.Error as exc:
                names = ", ".join(workspace.databases)
                raise DemoError(
                    f"could not drop the throwaway databases {names}: {one_line(str(exc))}"
                ) from None
            dropped = True
        workspace.left_behind = what_is_left(workspace, dropped)


def what_is_left(workspace: Workspace, dropped: bool) -> dict[str, Any]:
    """What the demo leaves behind (kept, or removed), for the summary."""
    left: dict[str, Any] = {
        "databases": list(workspace.databases),
        "kept": workspace.keep,
        "data_dir": str(workspace.server.data_dir) if workspace.server.data_dir else None,
    }
    if workspace.keep:
        left["psql"] = workspace.psql_command()
        # The same database for the operational commands (no password in it).
        left["dsn"] = shown(conninfo_to_dict(workspace.dsn))
        left["stop"] = workspace.stop_command()
        if workspace.started_here and workspace.server.data_dir is not None:
            left["delete_after_stop"] = str(workspace.server.data_dir.parent)
        if not workspace.started_here:
            left["drop"] = "; ".join(f"DROP DATABASE {name}" for name in workspace.databases)
    else:
        left["removed"] = (
            "databases dropped" if dropped else "server stopped, data directory deleted"
        )
    return left


def what_is_left_line(workspace: Workspace) -> str:
    """Where the data is now, in one line."""
    left = workspace.left_behind or what_is_left(workspace, not workspace.started_here)
    if left["kept"]:
        line = f"kept: connect with {left['psql']}"
        line += f"; the machine-sync commands take it as DATABASE_URL={shlex.quote(left['dsn'])}"
        others = [name for name in left["databases"] if name != workspace.database]
        if others:
            line += f" (also kept on the server: {', '.join(others)})"
        if left.get("stop"):
            line += f"; stop the server with {left['stop']}"
        if left.get("delete_after_stop"):
            line += f", then delete {left['delete_after_stop']}"
        if left.get("drop"):
            line += f"; clean up with {left['drop']}"
        return line
    if workspace.started_here:
        return f"server stopped, its data directory {left['data_dir']} deleted"
    return f"databases {', '.join(left['databases'])} dropped from your server"
