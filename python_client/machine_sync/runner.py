"""The migration runner: apply, revert and inspect machine-sync's SQL migrations.

The files in ``migrations/`` stay plain SQL that psql applies as they are
(``BEGIN; SET LOCAL lock_timeout ...; ...; COMMIT;``, idempotent). The runner
adds what psql cannot:

* **History.** Each file runs in its own transaction together with a row in
  ``machine_sync_migrations.applied`` (name, sha256 of its text), so a file is
  recorded exactly when it committed. The runner removes the file's own
  ``BEGIN;`` and ``COMMIT;`` to do so; everything in between runs unchanged.
  The history lives in its own schema, not in ``machine_sync``: dropping or
  recreating ``machine_sync`` (a revert, a fresh install) never loses it, and
  ``machine_sync`` holds exactly what ``sql/`` describes, on a database
  migrated by the runner and by psql alike.
* **One deployer at a time.** A session advisory lock, polled until
  ``lock_wait`` seconds have passed; the loser reports who holds it. Use a
  direct (session) connection, not PgBouncer in transaction mode, which
  cannot keep a session lock.
* **Edited files are refused.** An applied file whose text changed is named
  and nothing runs, unless ``force``.
* **Mixing with psql.** A database migrated with psql has machine-sync objects
  but no history: :meth:`Runner.status` shows its files as installed with
  psql (up to date: the catalog's record of the definitions, below, names
  them), and the runner adopts it by running the files again (they are
  idempotent) and recording them. A file applied with psql later is
  recorded the same way.
* **Definition check, without locking.** Each migration generated from
  ``sql/`` ends by recording, in the catalog, an md5 of every function,
  trigger (with its enabled flag) and view it installed
  (``machine_sync_installed.definition``; psql installs write it too).
  :meth:`Runner.status` compares the live catalog with that record in a
  read-only transaction: catalog reads and ACCESS SHARE on the record, no
  lock on ``machines``, nothing replayed. A function edited in the SQL
  editor, a disabled mirror trigger, a dropped trigger or a function added
  by hand to ``machine_sync`` is reported with the command that restores the
  shipped definitions (``machine-sync migrate apply --force``, which runs the
  files again). Reverting a migration drops its record with its objects, so
  a partial ``down`` leaves nothing stale to report.
* **Verify.** ``migrations/verify/<same name>.sql`` is a read-only query
  that fails loudly when that migration's objects are missing or changed
  (Sqitch's deploy/revert/verify); ``psql -v ON_ERROR_STOP=1 -f`` runs it as
  well as :meth:`Runner.verify`.
* **Busy tables.** Each transaction starts with a short ``lock_timeout`` (a
  file's own ``SET LOCAL`` wins); a file that hits it (SQLSTATE 55P03), or
  that the server picks as a deadlock's victim (40P01), is rolled back and
  tried again a bounded number of times.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from machine_sync._queries import query
from machine_sync.errors import (
    ChecksumMismatch,
    DatabaseUnreachable,
    InvalidArgument,
    MachineSyncError,
    MigrationError,
    MigrationFailed,
    MigrationLocked,
    MigrationsNotFound,
    PermissionDenied,
    describe,
    translate,
)
from machine_sync.resources import migrations_dir

__all__ = [
    "RESTORE_COMMAND",
    "DefinitionProblem",
    "FileState",
    "FileStatus",
    "Migration",
    "Plan",
    "Runner",
    "Status",
    "Step",
    "Verification",
    "discover",
    "problems_text",
    "restore_command",
]

#: What restores hand-edited functions and triggers to the shipped ones.
RESTORE_COMMAND = "machine-sync migrate apply --force"

_FILE_NAME = re.compile(r"^\d+_[A-Za-z0-9_]+\.sql$")
# The transaction wrapper every migration has: comments, BEGIN; ... COMMIT;
# then only comments or blank lines.
_LEADING = r"(?P<head>(?:\s|--[^\n]*(?:\n|\Z))*)"
_WRAPPED = re.compile(
    _LEADING
    + r"BEGIN(?:\s+(?:WORK|TRANSACTION))?\s*;(?P<body>.*)"
    + r"\bCOMMIT(?:\s+(?:WORK|TRANSACTION))?\s*;(?:\s|--[^\n]*(?:\n|\Z))*\Z",
    re.DOTALL | re.IGNORECASE,
)
_OPENS = re.compile(_LEADING + r"(BEGIN|START\s+TRANSACTION)\b", re.IGNORECASE)
# A migration that installs machine-sync ends by writing the catalog's record
# of what it installed (python_client/tools/record_definitions.sql).
_RECORDS = re.compile(r"\bmachine_sync_installed\.record\(")

Echo = Callable[[str], None]


def _silent(_line: str) -> None:
    pass


@dataclass(frozen=True)
class Migration:
    """One migration file and its revert."""

    name: str  # the file name, e.g. 20261125170100_machine_sync_v1.sql
    path: Path
    sha256: str
    installs: bool = False  # installs machine-sync (writes the catalog's record)
    # The text read, which sha256 is of: apply runs this, not the file read
    # again after waiting for the lock (it may have been edited meanwhile).
    text: str = field(default="", repr=False, compare=False)


def _checksum(text: str) -> str:
    # Line endings are normalized: a Windows checkout of the same file is
    # the same migration.
    return hashlib.sha256(text.replace("\r\n", "\n").encode("utf-8")).hexdigest()


def _read(path: Path) -> str:
    """A migration, revert or verify file's text; MigrationsNotFound naming it
    when it cannot be read as UTF-8 text (a directory, a dangling link)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MigrationsNotFound(f"cannot read {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise MigrationsNotFound(f"cannot read {path}: {exc.strerror or exc}") from None


def discover(directory: Path) -> list[Migration]:
    """The migrations in ``directory``, in the order they apply (by name)."""
    if not directory.is_dir():
        raise MigrationsNotFound(f"migrations directory {directory} does not exist")
    found = sorted(p for p in directory.glob("*.sql") if _FILE_NAME.match(p.name))
    if not found:
        raise MigrationsNotFound(
            f"no migrations in {directory} (expected files named <timestamp>_<name>.sql)"
        )
    texts = {p: _read(p) for p in found}
    return [
        Migration(p.name, p, _checksum(text), bool(_RECORDS.search(text)), text)
        for p, text in texts.items()
    ]


# A migration's statements are not the user's to edit: where PostgreSQL's
# hint tells its reader to change the statement, the runner says what to do.
_HINTS = {
    # "Use DROP ... CASCADE": that would drop the user's objects with ours.
    "2BP01": "change or remove the objects named above that depend on what the file drops "
    "(for a publication: ALTER PUBLICATION ... SET TABLE without that column), then run "
    "it again",
    # A role-level statement_timeout (Supabase sets them) ends the repair of
    # a large database's drift, whose time grows with the drifted machines.
    "57014": "the session's statement_timeout ended it (an ALTER ROLE ... SET or the "
    "database's setting); nothing was changed. Run it again with a longer one, e.g. "
    "PGOPTIONS='-c statement_timeout=0' machine-sync migrate apply on a direct connection",
}


def transaction_body(name: str, text: str) -> str:
    """The statements of a migration without its own BEGIN; and COMMIT;."""
    wrapped = _WRAPPED.fullmatch(text)
    if wrapped is not None:
        return wrapped.group("head") + wrapped.group("body")
    if _OPENS.match(text):
        raise MigrationError(f"{name} opens a transaction but does not end with COMMIT;")
    return text  # no wrapper of its own: the runner's transaction is the one


class FileState(StrEnum):
    """Where one migration file stands in a database."""

    APPLIED = "applied"
    PENDING = "pending"
    CHANGED = "changed"  # applied, but the file's text changed since
    UNKNOWN = "unknown"  # recorded as applied, but this version has no such file
    #: installed without the runner (psql): its definitions, or a later
    #: migration's, are in the catalog's record, but the runner has no history
    #: of it; ``migrate apply`` records it (re-running the idempotent file)
    INSTALLED = "installed"
    #: recorded as applied, but machine-sync is not installed here any more
    #: (its down file ran without the runner, or a restore left it out);
    #: ``migrate apply`` installs it again
    REVERTED = "reverted"


@dataclass(frozen=True)
class FileStatus:
    """One file's state, and when it was applied."""

    name: str
    state: FileState
    applied_at: datetime | None = None


@dataclass(frozen=True)
class DefinitionProblem:
    """A function, trigger or view that is not what the last apply installed;
    or the mirror role (kind ``role``), when others can be it."""

    kind: str
    name: str
    problem: str  # changed, disabled, missing, unexpected; for the role: exposed: <why>

    @property
    def restorable(self) -> bool:
        """Whether ``apply --force`` puts it right (a definition, not the role)."""
        return self.kind != "role"

    def __str__(self) -> str:
        if not self.restorable:
            return (
                f"role {self.name}, which the mirror runs as, is one others can be "
                f"({self.problem.removeprefix('exposed: ')}): they could write machine_state "
                "past the guard; REVOKE it from them, ALTER ROLE ... NOLOGIN NOSUPERUSER"
            )
        words = {
            "changed": "was changed after it was installed",
            "disabled": "is disabled",
            "missing": "was dropped",
            "unexpected": "is installed by no migration (created by hand?)",
        }[self.problem]
        return f"{self.kind} {self.name} {words}"


def restore_command(problems: Sequence[DefinitionProblem]) -> str | None:
    """:data:`RESTORE_COMMAND` when it puts one of ``problems`` right, else None."""
    return RESTORE_COMMAND if any(p.restorable for p in problems) else None


def problems_text(problems: Sequence[DefinitionProblem]) -> str:
    """The problems in one line, and what restores the definitions among them."""
    text = "; ".join(str(p) for p in problems)
    if command := restore_command(problems):
        text += f". `{command}` restores the shipped definitions"
    return text


@dataclass(frozen=True)
class Status:
    """What :meth:`Runner.status` found."""

    files: list[FileStatus]
    adoptable: bool  # machine-sync objects exist but the runner never ran here
    definitions_recorded: bool
    definition_problems: list[DefinitionProblem] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        """No pending or changed file, and the installed definitions are the recorded ones."""
        return not self.definition_problems and all(
            f.state in (FileState.APPLIED, FileState.INSTALLED, FileState.UNKNOWN)
            for f in self.files
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``machine-sync migrate status --json``)."""
        return {
            "up_to_date": self.up_to_date,
            "adoptable": self.adoptable,
            "files": [
                {
                    "name": f.name,
                    "state": str(f.state),
                    "applied_at": f.applied_at.isoformat() if f.applied_at else None,
                }
                for f in self.files
            ],
            "definitions": {
                "recorded": self.definitions_recorded,
                "problems": [asdict(p) for p in self.definition_problems],
                "restore_command": restore_command(self.definition_problems),
            },
        }


@dataclass(frozen=True)
class Verification:
    """What ``migrations/verify/<name>`` said about one applied migration."""

    name: str
    ok: bool
    message: str  # "verified", "no verify file", or the error it raised


@dataclass(frozen=True)
class Step:
    """One file :meth:`Runner.apply` will run, and why."""

    migration: Migration
    action: str  # apply, adopt (psql applied it before), reapply (forced), reinstall (reverted)


@dataclass(frozen=True)
class Plan:
    """What :meth:`Runner.apply` does (or did)."""

    steps: list[Step]
    adopting: bool
    # Installed definitions that differ from the record, which only
    # ``apply --force`` restores (filled by plan() and apply(dry_run=True)).
    definition_problems: list[DefinitionProblem] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``machine-sync migrate plan --json``)."""
        return {
            "adopting": self.adopting,
            "steps": [{"name": s.migration.name, "action": s.action} for s in self.steps],
            "definition_problems": [asdict(p) for p in self.definition_problems],
        }


class Runner:
    """Applies and reverts the migrations of one folder on one database.

    ``conn`` must be in autocommit mode: the runner opens one transaction per
    file itself. It is not closed by the runner.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        directory: Path | None = None,
        *,
        lock_wait: float = 60.0,
        lock_timeout: str = "5s",
        retries: int = 3,
        retry_delay: float = 1.0,
        echo: Echo = _silent,
    ) -> None:
        if not conn.autocommit:
            raise InvalidArgument(
                "the migration runner needs an autocommit connection: it runs each file in "
                "its own transaction"
            )
        if retries < 0 or lock_wait < 0:
            raise InvalidArgument("retries and lock_wait must not be negative")
        self._conn = conn
        self.directory = directory if directory is not None else migrations_dir()
        self._lock_wait = lock_wait
        self._lock_timeout = lock_timeout
        self._retries = retries
        self._retry_delay = retry_delay
        self._echo = echo

    # -- reading ------------------------------------------------------------

    def _rows(self, name: str, **params: Any) -> list[dict[str, Any]]:
        named = query(name)
        with self._conn.cursor(row_factory=dict_row) as cur:
            cur.execute(named.text, named.bind(**params) or None)
            return cur.fetchall() if cur.description is not None else []

    def _has_history(self) -> bool:
        return bool(self._rows("history_exists")[0]["present"])

    def _applied(self) -> dict[str, dict[str, Any]]:
        if not self._has_history():
            return {}
        return {row["migration"]: row for row in self._rows("applied_migrations")}

    def _definitions_recorded(self) -> bool:
        return bool(self._rows("definitions_recorded")[0]["present"])

    def _installed_unrecorded(
        self, migrations: Sequence[Migration], applied: dict[str, dict[str, Any]]
    ) -> set[str]:
        """The files the runner has no history of that ran all the same (with psql):
        files apply in name order, so every one up to the last whose definitions
        the catalog's record names."""
        if not self._definitions_recorded():
            return set()
        latest = max((r["migration"] for r in self._rows("recorded_migrations")), default="")
        return {m.name for m in migrations if m.name not in applied and m.name <= latest}

    def _machine_sync_present(self) -> bool:
        """Whether machine-sync is installed here (its schema exists)."""
        return bool(self._rows("machine_sync_present")[0]["present"])

    @staticmethod
    def _reverted(
        migrations: Sequence[Migration], applied: dict[str, dict[str, Any]], present: bool
    ) -> set[str]:
        """The applied files that install machine-sync, where it is installed no more."""
        if present:
            return set()
        return {m.name for m in migrations if m.installs and m.name in applied}

    def _definition_problems(self) -> list[DefinitionProblem]:
        if not self._definitions_recorded():
            return []
        return [
            DefinitionProblem(r["kind"], r["object_name"], r["problem"])
            for r in self._rows("definition_problems")
        ]

    @contextmanager
    def _looking(self) -> Iterator[None]:
        """A read-only transaction, rolled back: catalog reads, ACCESS SHARE at most."""
        with self._conn.transaction(force_rollback=True):
            self._exec("read_only")
            yield

    def status(self) -> Status:
        """Applied, pending and changed files; installed definitions against the record.

        Only looks: one read-only transaction, no lock stronger than ACCESS SHARE.
        """
        with self._translated(), self._looking():
            migrations = discover(self.directory)
            applied = self._applied()
            recorded = self._definitions_recorded()
            present = self._machine_sync_present()
            installed = self._installed_unrecorded(migrations, applied)
            reverted = self._reverted(migrations, applied, present)
            files = []
            for m in migrations:
                row = applied.get(m.name)
                if row is None:
                    unrecorded = FileState.INSTALLED if m.name in installed else FileState.PENDING
                    files.append(FileStatus(m.name, unrecorded))
                else:
                    if row["sha256"] != m.sha256:
                        state = FileState.CHANGED
                    elif m.name in reverted:
                        state = FileState.REVERTED
                    else:
                        state = FileState.APPLIED
                    files.append(FileStatus(m.name, state, row["applied_at"]))
            known = {m.name for m in migrations}
            files += [
                FileStatus(name, FileState.UNKNOWN, row["applied_at"])
                for name, row in applied.items()
                if name not in known
            ]
            return Status(
                files=sorted(files, key=lambda f: f.name),
                adoptable=not applied and present,
                definitions_recorded=recorded,
                definition_problems=self._definition_problems(),
            )

    def verify(self) -> list[Verification]:
        """Run ``verify/<name>`` of each applied migration, by the runner or with psql
        (every one, without history).

        Each runs in a read-only transaction that is rolled back.
        """
        with self._translated():
            migrations = discover(self.directory)
            applied = self._applied()
            ran = set(applied) | self._installed_unrecorded(migrations, applied)
            results = []
            for m in migrations:
                if applied and m.name not in ran:
                    continue
                script = self.directory / "verify" / m.name
                if not script.is_file():
                    results.append(Verification(m.name, True, "no verify file"))
                    continue
                text = _read(script)
                try:
                    with self._looking():
                        # One simple query, like a migration: a file shipped with them.
                        self._conn.execute(text)
                except psycopg.Error as exc:
                    error = translate(exc)
                    if isinstance(error, DatabaseUnreachable):
                        raise error from exc
                    results.append(Verification(m.name, False, describe(exc)))
                else:
                    results.append(Verification(m.name, True, "verified"))
            return results

    def plan(self, *, force: bool = False) -> Plan:
        """What :meth:`apply` would run; raises what apply would raise (a role
        that does not own the tables included)."""
        with self._translated():
            migrations = discover(self.directory)
            self._refuse_another_owners_tables()
            plan = self._plan(migrations, force=force)
            # With what it leaves as it is: hand-changed definitions.
            return replace(plan, definition_problems=self._definition_problems())

    def _plan(self, migrations: Sequence[Migration], *, force: bool) -> Plan:
        applied = self._applied()
        present = self._machine_sync_present()
        adopting = not applied and present
        changed = [
            m.name
            for m in migrations
            if m.name in applied and applied[m.name]["sha256"] != m.sha256
        ]
        if changed and not force:
            raise ChecksumMismatch(
                f"already applied, but edited since: {', '.join(changed)}. Put the change in a new "
                f"migration, or re-apply the edited file with `{RESTORE_COMMAND}`",
                changed,
            )
        reverted = self._reverted(migrations, applied, present)
        steps = []
        for m in migrations:
            if m.name in applied:
                if force:
                    steps.append(Step(m, "reapply"))
                elif m.name in reverted:
                    steps.append(Step(m, "reinstall"))
            else:
                steps.append(Step(m, "adopt" if adopting else "apply"))
        return Plan(steps, adopting)

    # -- writing ------------------------------------------------------------

    def apply(self, *, force: bool = False, dry_run: bool = False) -> Plan:
        """Run every pending file in order (every file with ``force``); returns the plan run.

        ``force`` also re-applies edited files and restores changed definitions.
        ``dry_run`` only plans: nothing is locked, created or run.
        """
        if dry_run:
            return self.plan(force=force)
        with self._translated():
            migrations = discover(self.directory)
            with self._locked():
                self._refuse_another_owners_tables()
                self._exec("runner_bootstrap")
                plan = self._plan(migrations, force=force)
                if plan.adopting:
                    self._echo(
                        "machine-sync is installed but the runner never ran here (psql?): "
                        "adopting it by re-running the idempotent files"
                    )
                if not plan.steps:
                    self._echo("nothing to apply: every migration is applied")
                for index, step in enumerate(plan.steps, 1):
                    self._run_file(
                        step.migration.name,
                        step.migration.text,
                        f"[{index}/{len(plan.steps)}] {step.action}",
                        record=partial(
                            self._exec,
                            "record_migration",
                            migration=step.migration.name,
                            sha256=step.migration.sha256,
                        ),
                    )
                problems = self._definition_problems()
                if problems:
                    self._echo("warning: " + problems_text(problems))
                return plan

    def _refuse_another_owners_tables(self) -> None:
        """Refuse, before the runner's history is made, a role that does not own the tables.

        The v1 migration refuses any role but the tables' owner; checked only
        there, the history schema (made first, owned by the connected role)
        and the baseline's record would stay behind, and the owner could then
        neither read nor write that history.
        """
        for row in self._rows("machines_owner"):
            if row["tables_owner"] != row["applier"]:
                raise PermissionDenied(
                    f"machine-sync must be applied by the owner of its tables, not by "
                    f"{row['applier']}: public.machines (owned by {row['tables_owner']}); "
                    "nothing was run or recorded (hint: Connect as the tables' owner, or run "
                    "SET ROLE to it first (with psql: PGOPTIONS='-c role=<owner>'))",
                    sqlstate="42501",
                )

    def down(self, steps: int = 1, *, dry_run: bool = False) -> list[str]:
        """Revert the last ``steps`` applied files with ``down/<same name>``; their names."""
        if steps < 1:
            raise InvalidArgument(f"steps must be at least 1, got {steps}")
        with self._translated():
            migrations = discover(self.directory)  # the folder must exist
            if dry_run:
                return self._down_targets(steps, migrations)
            with self._locked():
                targets = self._down_targets(steps, migrations)
                for index, name in enumerate(targets, 1):
                    self._run_file(
                        name,
                        _read(self.directory / "down" / name),
                        f"[{index}/{len(targets)}] revert",
                        record=partial(self._exec, "forget_migration", migration=name),
                    )
                return targets

    def _down_targets(self, steps: int, migrations: Sequence[Migration]) -> list[str]:
        history = self._applied()
        applied = sorted(history, reverse=True)
        if not applied:
            raise MigrationError(
                "nothing to revert: the runner has no record of applied migrations here "
                "(a psql-migrated database is adopted by `machine-sync migrate apply` first)"
            )
        unrecorded = sorted(self._installed_unrecorded(migrations, history))
        if unrecorded:
            raise MigrationError(
                f"{', '.join(unrecorded)} ran here with psql and the runner has no record of it: "
                "record it with `machine-sync migrate apply` first, so that the revert starts "
                "from the last migration"
            )
        if steps > len(applied):
            raise InvalidArgument(
                f"cannot revert {steps} migrations: only {len(applied)} are applied"
            )
        targets = applied[:steps]
        missing = [n for n in targets if not (self.directory / "down" / n).is_file()]
        if missing:
            raise MigrationsNotFound(
                "no revert file for " + ", ".join(str(self.directory / "down" / n) for n in missing)
            )
        return targets

    def _exec(self, name: str, **params: Any) -> None:
        named = query(name)
        self._conn.execute(named.text, named.bind(**params) or None)

    def _run_file(self, name: str, text: str, label: str, record: Callable[[], None]) -> None:
        body = transaction_body(name, text)
        # What the file says it did: its own RAISE NOTICEs (SQLSTATE 00000),
        # not PostgreSQL's (such as 42P07, "already exists, skipping").
        said: list[str] = []

        def keep(notice: psycopg.errors.Diagnostic) -> None:
            if notice.sqlstate == "00000" and notice.message_primary:
                said.append(notice.message_primary)

        def work() -> None:
            said.clear()  # a retried attempt says it again
            # The file's statements as they are, sent as one simple query (no
            # parameters); the file ships with the package, like queries.sql.
            self._conn.execute(body)
            if self._conn.info.transaction_status != TransactionStatus.INTRANS:
                raise MigrationError(
                    f"{name} ends its transaction before its last line; the runner "
                    "cannot record it atomically (keep one BEGIN; ... COMMIT; per file)"
                )
            record()

        self._echo(f"{label} {name} ...")
        started = time.monotonic()
        self._conn.add_notice_handler(keep)
        try:
            self._transaction(name, work, commit=True)
        finally:
            self._conn.remove_notice_handler(keep)
        for line in said:
            self._echo(f"  {line}")
        self._echo(f"  done in {time.monotonic() - started:.2f} s")

    def _transaction(self, what: str, work: Callable[[], None], *, commit: bool) -> None:
        """Run ``work`` in one transaction; retry it when a table is busy (55P03)
        or it lost a deadlock (40P01): either way it was rolled back whole."""
        for attempt in range(1, self._retries + 2):
            try:
                self._conn.execute("BEGIN")
                self._exec("set_lock_timeout", lock_timeout=self._lock_timeout)
                work()
                self._conn.execute("COMMIT" if commit else "ROLLBACK")
                return
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
                self._rollback()
                if attempt > self._retries:
                    raise MigrationFailed(
                        f"{what}: a table it locks stayed busy through {attempt} attempts "
                        f"({describe(exc)}); it was rolled back each time. Find the long "
                        "transaction in pg_stat_activity, or try again later",
                        migration=what,
                        sqlstate=exc.sqlstate,
                    ) from exc
                delay = self._retry_delay * attempt
                self._echo(
                    f"  a table is busy ({describe(exc)}); rolled back, retry "
                    f"{attempt}/{self._retries} in {delay:g} s"
                )
                time.sleep(delay)
            except psycopg.Error as exc:
                self._rollback()
                error = translate(exc)
                if isinstance(error, DatabaseUnreachable):
                    raise error from exc
                raise MigrationFailed(
                    f"{what} failed and was rolled back: "
                    f"{describe(exc, detail=True, hint=_HINTS.get(exc.sqlstate or ''))} "
                    f"(SQLSTATE {exc.sqlstate})",
                    migration=what,
                    sqlstate=exc.sqlstate,
                ) from exc
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        if self._conn.closed:
            return
        if self._conn.info.transaction_status != TransactionStatus.IDLE:
            self._conn.execute("ROLLBACK")

    # -- the lock -----------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        deadline = time.monotonic() + self._lock_wait
        announced = False
        while not self._rows("try_migration_lock")[0]["acquired"]:
            holder = self._holder()
            if time.monotonic() >= deadline:
                raise MigrationLocked(
                    f"another migration runner holds the lock ({holder}); gave up after "
                    f"{self._lock_wait:g} s. Let it finish, or raise --lock-wait"
                )
            if not announced:
                self._echo(f"waiting for the migration lock held by {holder} ...")
                announced = True
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        try:
            yield
        finally:
            if not self._conn.closed:
                self._rollback()
                self._exec("release_migration_lock")

    def _holder(self) -> str:
        rows = self._rows("migration_lock_holder")
        if not rows:
            return "a session that just released it"
        row = rows[0]
        who = row["application_name"] or "unnamed client"
        since = row["backend_start"]
        return f"backend pid {row['pid']}, {who}, user {row['user_name']}" + (
            f", connected since {since:%Y-%m-%d %H:%M:%S %Z}" if since else ""
        )

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except MachineSyncError:
            raise
        except psycopg.Error as exc:
            raise translate(exc, privileged="the owner of the tables applies machine-sync") from exc
