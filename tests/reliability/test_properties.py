"""Property-based: random sequences of every kind of write, checked after every
step against a model of what each write means, and against the invariant (one
agreeing machine_state row per machine, machine_sync.drift empty).

The model predicts, for each statement, either the rows it leaves or the one
SQLSTATE it fails with; a failing statement must change nothing. Shrunk
failures found here become regular tests (see test_regressions below).
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import replace
from datetime import datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from .model import (
    ALLOWED,
    FOREIGN_KEY,
    GUARD,
    NOT_NULL_PARAM,
    RULE,
    UNIQUE,
    Refused,
    Row,
    insert_machine,
    inserted_machine,
    legacy_write,
    normalize,
    proposed_machine,
    rpc_update,
    write_machine,
    write_state,
)
from .workload import CLIENT_CLOCK, LEGACY_PATHS, snapshot
from machines import add_machine, assert_consistent, machine

Conn = psycopg.Connection[Any]

POOL = [uuid.UUID(int=0xA000 + n) for n in range(4)]  # machine ids, existing or not
PROCESSES = [uuid.UUID(int=0xB000 + n) for n in range(2)]
COMPONENTS = [uuid.UUID(int=0xC000)]

machine_index = st.integers(0, len(POOL) - 1)
status_input = st.sampled_from(
    [*ALLOWED, "IDLE", " Processing ", "running", "\tError\n", "MAINTENANCE", "Offline"]
) | st.sampled_from(["busy", "", "  ", "idle!", "RUNNINGX"])
process = st.sampled_from([None, *PROCESSES])
component = st.sampled_from([None, *COMPONENTS])
failure = (
    st.none()
    | st.sampled_from(["leak", "O'Reilly", "💥", "", "a;b--"])
    | st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=12)
)


class MachineSync(RuleBasedStateMachine):
    """Model: ``rows`` (id -> Row) and ``mode``; the database must match after every step."""

    conn: Conn  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[uuid.UUID, Row] = {}
        self.mode = "compat"
        # Inside one transaction now() does not move, so state_since cannot
        # show a second change: its check is skipped there.
        self.in_transaction = False
        self.conn.execute("TRUNCATE machines CASCADE")
        self.conn.execute("SELECT machine_sync.set_mode_v1('compat')")

    # -- helpers -------------------------------------------------------------

    def run(self, statement: str, params: Any, predicted: dict[uuid.UUID, Row] | Refused) -> None:
        """Execute one statement; it must fail exactly as predicted (leaving
        everything unchanged) or succeed, after which the model adopts
        ``predicted``. Inside a transaction, run it in a savepoint."""
        if isinstance(predicted, Refused):
            before = snapshot(self.conn)
            # Inside a transaction the failure must not abort it: use a savepoint.
            nested = self.conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            savepoint = self.conn.transaction() if nested else contextlib.nullcontext()
            with pytest.raises(psycopg.Error) as caught, savepoint:
                self.conn.execute(statement, params)
            assert caught.value.sqlstate == predicted.sqlstate, (
                f"{statement!r} {params!r}: expected {predicted.sqlstate}, got {caught.value!r}"
            )
            assert snapshot(self.conn) == before
            return
        self.conn.execute(statement, params)
        self.rows = predicted

    def predict(self, change: Any) -> dict[uuid.UUID, Row] | Refused:
        """Apply ``change(rows) -> rows`` to a copy of the model."""
        rows = dict(self.rows)
        try:
            change(rows)
        except Refused as refused:
            return refused
        return rows

    def state_since(self) -> dict[uuid.UUID, tuple[str, datetime]]:
        return {
            machine_id: (status, since)
            for machine_id, status, since in self.conn.execute(
                "SELECT machine_id, current_state, state_since FROM machine_state"
            )
        }

    def check_state_since(self, before: dict[uuid.UUID, tuple[str, datetime]]) -> None:
        """state_since moves exactly when the state changes."""
        if self.in_transaction:
            return
        for machine_id, (status, since) in self.state_since().items():
            if machine_id in before:
                old_status, old_since = before[machine_id]
                assert (since == old_since) == (status == old_status), (
                    f"{machine_id}: {old_status}@{old_since} -> {status}@{since}"
                )

    # -- a start with machines in every status --------------------------------

    @initialize(statuses=st.lists(st.sampled_from(ALLOWED), min_size=3, max_size=3))
    def seed(self, statuses: list[str]) -> None:
        """Most of the pool exists from the start, in random statuses (a
        processing one runs PROCESSES[0]), so that the rules are met early."""
        for machine_id, status in zip(POOL, statuses, strict=False):
            process_id = PROCESSES[0] if status == "processing" else None
            add_machine(conn=self.conn, id=machine_id, status=status, current_process_id=process_id)
            self.rows[machine_id] = insert_machine(status=status, process_id=process_id)

    # -- new-style writes ----------------------------------------------------

    @rule(i=machine_index, status=status_input, description=failure)
    def insert(self, i: int, status: str, description: str | None) -> None:
        machine_id = POOL[i]

        def change(rows: dict[uuid.UUID, Row]) -> None:
            # The BEFORE INSERT trigger runs before the unique index is
            # checked, the AFTER INSERT check only on a row inserted.
            row = proposed_machine(status=status, failure_description=description)
            if machine_id in rows:
                raise Refused(UNIQUE)
            rows[machine_id] = inserted_machine(row)

        self.run(
            "INSERT INTO machines (id, serial_number, location, lab_name, lab_institution,"
            " model, machine_type, install_date, last_maintenance_date, admin_id, status,"
            " failure_description) VALUES (%s, 'SN', 'Bay', 'Lab', 'Inst', 'S200', 'ALD',"
            " now(), now(), gen_random_uuid(), %s, %s)",
            [machine_id, status, description],
            self.predict(change),
        )

    def _update(self, i: int, statement: str, params: list[Any], **changes: Any) -> None:
        machine_id = POOL[i]

        def change(rows: dict[uuid.UUID, Row]) -> None:
            if machine_id in rows:
                rows[machine_id] = write_machine(rows[machine_id], **changes)

        before = self.state_since()
        self.run(statement, [*params, machine_id], self.predict(change))
        self.check_state_since(before)

    @rule(i=machine_index, status=status_input)
    def update_status(self, i: int, status: str) -> None:
        self._update(i, "UPDATE machines SET status = %s WHERE id = %s", [status], status=status)

    @rule(i=machine_index, process_id=process, processing=st.booleans())
    def update_process(self, i: int, process_id: uuid.UUID | None, processing: bool) -> None:
        if processing:
            self._update(
                i,
                "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s",
                [process_id],
                status="processing",
                process_id=process_id,
            )
        else:
            self._update(
                i,
                "UPDATE machines SET current_process_id = %s WHERE id = %s",
                [process_id],
                process_id=process_id,
            )

    @rule(i=machine_index, description=failure, part=component, to_error=st.booleans())
    def update_failure(
        self, i: int, description: str | None, part: uuid.UUID | None, to_error: bool
    ) -> None:
        extra = {"status": "error"} if to_error else {}
        self._update(
            i,
            "UPDATE machines SET failure_description = %s, failure_component = %s"
            + (", status = 'error'" if to_error else "")
            + " WHERE id = %s",
            [description, part],
            failure_description=description,
            failure_component=part,
            **extra,
        )

    @rule(i=machine_index)
    def delete(self, i: int) -> None:
        machine_id = POOL[i]
        self.run(
            "DELETE FROM machines WHERE id = %s",
            [machine_id],
            self.predict(lambda rows: rows.pop(machine_id, None)),
        )

    @rule(indexes=st.sets(machine_index, min_size=1), status=status_input)
    def update_many(self, indexes: set[int], status: str) -> None:
        ids = [POOL[i] for i in sorted(indexes)]

        def change(rows: dict[uuid.UUID, Row]) -> None:
            for machine_id in ids:
                if machine_id in rows:
                    rows[machine_id] = write_machine(rows[machine_id], status=status)

        before = self.state_since()
        self.run(
            "UPDATE machines SET status = %s WHERE id = ANY(%s)",
            [status, ids],
            self.predict(change),
        )
        self.check_state_since(before)

    @rule(i=machine_index, status=status_input, description=failure, do_nothing=st.booleans())
    def upsert_machine(
        self, i: int, status: str, description: str | None, do_nothing: bool
    ) -> None:
        machine_id = POOL[i]

        def change(rows: dict[uuid.UUID, Row]) -> None:
            # BEFORE INSERT runs even on a conflict: excluded is its result.
            proposed = proposed_machine(status=status, failure_description=description)
            if machine_id not in rows:
                rows[machine_id] = inserted_machine(proposed)
            elif not do_nothing:
                rows[machine_id] = write_machine(
                    rows[machine_id], status=proposed.status, failure_description=description
                )

        action = (
            "DO NOTHING"
            if do_nothing
            else "DO UPDATE SET status = excluded.status,"
            " failure_description = excluded.failure_description"
        )
        self.run(
            "INSERT INTO machines (id, serial_number, location, lab_name, lab_institution,"
            " model, machine_type, install_date, last_maintenance_date, admin_id, status,"
            " failure_description) VALUES (%s, 'SN', 'Bay', 'Lab', 'Inst', 'S200', 'ALD',"
            f" now(), now(), gen_random_uuid(), %s, %s) ON CONFLICT (id) {action}",
            [machine_id, status, description],
            self.predict(change),
        )

    @rule(i=machine_index, status=status_input, remove=st.booleans())
    def merge_machine(self, i: int, status: str, remove: bool) -> None:
        machine_id = POOL[i]

        def change(rows: dict[uuid.UUID, Row]) -> None:
            if machine_id in rows and remove:
                del rows[machine_id]
            elif machine_id in rows:
                rows[machine_id] = write_machine(rows[machine_id], status=status)
            else:
                rows[machine_id] = insert_machine(status=status)

        self.run(
            "MERGE INTO machines AS m"
            " USING (VALUES (%s::uuid, %s::text, %s::boolean)) AS v (id, status, remove)"
            " ON m.id = v.id"
            " WHEN MATCHED AND v.remove THEN DELETE"
            " WHEN MATCHED THEN UPDATE SET status = v.status"
            " WHEN NOT MATCHED THEN INSERT (id, serial_number, location, lab_name,"
            " lab_institution, model, machine_type, install_date, last_maintenance_date,"
            " admin_id, status) VALUES (v.id, 'SN', 'Bay', 'Lab', 'Inst', 'S200', 'ALD',"
            " now(), now(), gen_random_uuid(), v.status)",
            [machine_id, status, remove],
            self.predict(change),
        )

    @rule(i=machine_index)
    def change_machine_id(self, i: int) -> None:
        machine_id = POOL[i]

        def change(rows: dict[uuid.UUID, Row]) -> None:
            if machine_id in rows:
                raise Refused(RULE)  # machines.id cannot change

        self.run(
            "UPDATE machines SET id = gen_random_uuid() WHERE id = %s",
            [machine_id],
            self.predict(change),
        )

    # -- legacy writes -------------------------------------------------------

    @rule(
        i=machine_index,
        path=st.sampled_from(sorted(LEGACY_PATHS)),
        process_id=st.sampled_from(PROCESSES),
        message=failure.filter(lambda m: m is not None),
    )
    def legacy_path(self, i: int, path: str, process_id: uuid.UUID, message: str) -> None:
        machine_id = POOL[i]
        params = {"m": machine_id, "p": process_id, "msg": message, "clock": CLIENT_CLOCK}
        before = self.state_since()
        for table, statement in LEGACY_PATHS[path]:

            def change(rows: dict[uuid.UUID, Row], table: str = table) -> None:
                if machine_id not in rows:
                    return  # UPDATE ... WHERE matches nothing
                rows[machine_id] = legacy_write(
                    rows[machine_id], path, table, self.mode, process_id, message
                )

            self.run(statement, params, self.predict(change))
        self.check_state_since(before)

    @rule(
        i=machine_index,
        status=status_input,
        process_id=process,
        description=failure,
        failure_mode=st.booleans(),
    )
    def legacy_state_update(
        self,
        i: int,
        status: str,
        process_id: uuid.UUID | None,
        description: str | None,
        failure_mode: bool,
    ) -> None:
        machine_id = POOL[i]

        def change(rows: dict[uuid.UUID, Row]) -> None:
            if machine_id in rows:
                # is_failure_mode and state_since are derived; what the writer sends is ignored.
                rows[machine_id] = write_state(
                    rows[machine_id],
                    self.mode,
                    status=status,
                    process_id=process_id,
                    failure_description=description,
                )

        before = self.state_since()
        self.run(
            "UPDATE machine_state SET current_state = %s, process_id = %s,"
            " failure_description = %s, is_failure_mode = %s, state_since = %s"
            " WHERE machine_id = %s",
            [status, process_id, description, failure_mode, CLIENT_CLOCK, machine_id],
            self.predict(change),
        )
        self.check_state_since(before)

    @rule(i=machine_index, status=status_input, process_id=process)
    def legacy_state_insert(self, i: int, status: str, process_id: uuid.UUID | None) -> None:
        """Plain INSERT of a state row: PostgreSQL's meaning (the row exists
        with its machine, so 23505; no machine, the foreign key's 23503)."""
        machine_id = POOL[i]

        def change(rows: dict[uuid.UUID, Row]) -> None:
            if self.mode == "strict":
                raise Refused(GUARD)
            normalize(status)  # the BEFORE INSERT trigger runs first
            raise Refused(UNIQUE if machine_id in rows else FOREIGN_KEY)

        before = self.state_since()
        self.run(
            "INSERT INTO machine_state (machine_id, current_state, process_id) VALUES (%s, %s, %s)",
            [machine_id, status, process_id],
            self.predict(change),
        )
        self.check_state_since(before)

    @rule(i=machine_index, status=status_input, process_id=process, do_nothing=st.booleans())
    def legacy_state_upsert(
        self, i: int, status: str, process_id: uuid.UUID | None, do_nothing: bool
    ) -> None:
        """INSERT ... ON CONFLICT on machine_state keeps PostgreSQL's meaning
        (issued as a top-level statement; see test_upsert_inside_a_function_*)."""
        machine_id = POOL[i]

        def change(rows: dict[uuid.UUID, Row]) -> None:
            if self.mode == "strict":
                raise Refused(GUARD)
            new_status = normalize(status)  # BEFORE INSERT runs even on a conflict
            if machine_id not in rows:
                raise Refused(FOREIGN_KEY)
            if not do_nothing:
                rows[machine_id] = write_state(
                    rows[machine_id], self.mode, status=new_status, process_id=process_id
                )

        before = self.state_since()
        action = (
            "DO NOTHING"
            if do_nothing
            else "DO UPDATE SET current_state = excluded.current_state,"
            " process_id = excluded.process_id"
        )
        self.run(
            "INSERT INTO machine_state (machine_id, current_state, process_id)"
            f" VALUES (%s, %s, %s) ON CONFLICT (machine_id) {action}",
            [machine_id, status, process_id],
            self.predict(change),
        )
        self.check_state_since(before)

    @rule(i=machine_index, status=status_input, description=failure)
    def legacy_state_merge(self, i: int, status: str, description: str | None) -> None:
        machine_id = POOL[i]

        def change(rows: dict[uuid.UUID, Row]) -> None:
            if machine_id in rows:
                rows[machine_id] = write_state(
                    rows[machine_id], self.mode, status=status, failure_description=description
                )
                return
            if self.mode == "strict":
                raise Refused(GUARD)
            normalize(status)
            raise Refused(FOREIGN_KEY)

        self.run(
            "MERGE INTO machine_state AS s USING (VALUES (%s::uuid, %s::text, %s::text))"
            " AS v (id, status, description) ON s.machine_id = v.id"
            " WHEN MATCHED THEN UPDATE SET current_state = v.status,"
            " failure_description = v.description"
            " WHEN NOT MATCHED THEN INSERT (machine_id, current_state) VALUES (v.id, v.status)",
            [machine_id, status, description],
            self.predict(change),
        )

    @rule(i=machine_index)
    def legacy_state_delete(self, i: int) -> None:
        machine_id = POOL[i]

        def change(rows: dict[uuid.UUID, Row]) -> None:
            if machine_id in rows:
                raise Refused(GUARD)

        self.run(
            "DELETE FROM machine_state WHERE machine_id = %s", [machine_id], self.predict(change)
        )

    @rule()
    def truncate_state_alone(self) -> None:
        def change(rows: dict[uuid.UUID, Row]) -> None:
            if rows:
                raise Refused(GUARD)

        self.run("TRUNCATE machine_state", None, self.predict(change))

    # -- legacy RPCs ---------------------------------------------------------

    @rule(
        i=st.none() | machine_index,
        status=st.none() | status_input,
        process_id=process,
        state_status=st.none() | status_input,
        state_process_id=process,
        failure_mode=st.none() | st.booleans(),
        description=failure,
    )
    def rpc_update_machine_state(
        self,
        i: int | None,
        status: str | None,
        process_id: uuid.UUID | None,
        state_status: str | None,
        state_process_id: uuid.UUID | None,
        failure_mode: bool | None,
        description: str | None,
    ) -> None:
        machine_id = None if i is None else POOL[i]
        args = (machine_id, status, process_id, state_status, state_process_id)
        self.run(
            "SELECT atomic_update_machine_state(p_machine_id => %s, p_machine_status => %s,"
            " p_current_process_id => %s, p_machine_state_current_state => %s,"
            " p_machine_state_process_id => %s, p_is_failure_mode => %s,"
            " p_failure_description => %s)",
            [*args, failure_mode, description],
            self.predict(lambda rows: rpc_update(rows, *args, failure_mode, description)),
        )

    @rule(
        i=machine_index,
        kind=st.sampled_from(["complete", "error", "processing"]),
        process_id=process,
        message=st.none() | failure,
    )
    def rpc_shortcut(
        self, i: int, kind: str, process_id: uuid.UUID | None, message: str | None
    ) -> None:
        machine_id = POOL[i]

        def change(rows: dict[uuid.UUID, Row]) -> None:
            if kind == "complete":
                rpc_update(rows, machine_id, status="idle")
            elif kind == "error":
                text = "Recipe execution error: " + ("(no message)" if message is None else message)
                rpc_update(rows, machine_id, status="error", description=text)
            elif process_id is None:
                raise Refused(NOT_NULL_PARAM)
            else:
                rpc_update(rows, machine_id, status="processing", process_id=process_id)

        statement = {
            "complete": "SELECT atomic_complete_machine_state(%s)",
            "error": "SELECT atomic_error_machine_state(%s, %s)",
            "processing": "SELECT atomic_processing_machine_state(%s, %s)",
        }[kind]
        params: list[Any] = [machine_id]
        if kind == "error":
            params.append(message)
        elif kind == "processing":
            params.append(process_id)
        self.run(statement, params, self.predict(change))

    # -- transactions, savepoints, mode -------------------------------------

    @rule(
        first=st.tuples(machine_index, status_input),
        second=st.tuples(machine_index, status_input, process),
        third=st.tuples(machine_index, status_input),
        keep_savepoint=st.booleans(),
        commit=st.booleans(),
    )
    def transaction(
        self,
        first: tuple[int, str],
        second: tuple[int, str, uuid.UUID | None],
        third: tuple[int, str],
        keep_savepoint: bool,
        commit: bool,
    ) -> None:
        """BEGIN; new write; SAVEPOINT; legacy write; RELEASE or ROLLBACK TO;
        RPC; COMMIT or ROLLBACK. The invariant holds after every statement,
        inside the transaction too."""
        committed = dict(self.rows)
        self.in_transaction = True
        with self.conn.transaction(force_rollback=not commit):
            self.update_status(first[0], first[1])
            assert_consistent(self.conn)
            at_savepoint = dict(self.rows)
            try:
                with self.conn.transaction(force_rollback=not keep_savepoint):
                    self.legacy_state_update(second[0], second[1], second[2], None, False)
                    assert_consistent(self.conn)
            finally:
                if not keep_savepoint:
                    self.rows = at_savepoint
            self.rpc_shortcut(third[0], "complete" if third[1] == "idle" else "error", None, None)
            assert_consistent(self.conn)
            self.check_model()
        self.in_transaction = False
        if not commit:
            self.rows = committed

    @rule(i=machine_index, description=failure)
    def drift_then_reconcile(self, i: int, description: str | None) -> None:
        """Drift made by bypassing the mirror (the owner disables it for one
        UPDATE): reconcile() names each drifted machine in a row, repairs it
        from machines, and returns nothing when there is no drift."""
        machine_id = POOL[i]
        old = self.rows.get(machine_id)
        drifts = old is not None and old.failure_description != description
        with self.conn.transaction():
            self.conn.execute("ALTER TABLE machines DISABLE TRIGGER zz_machine_sync")
            self.conn.execute(
                "UPDATE machines SET failure_description = %s WHERE id = %s",
                [description, machine_id],
            )
            self.conn.execute("ALTER TABLE machines ENABLE TRIGGER zz_machine_sync")
        drift = self.conn.execute("SELECT machine_id, problem FROM machine_sync.drift").fetchall()
        assert drift == ([(machine_id, "value_mismatch")] if drifts else [])
        result = self.conn.execute("SELECT * FROM machine_sync.reconcile_v1()").fetchall()
        assert result == ([(machine_id, "value_mismatch", True, None)] if drifts else [])
        if old is not None:
            self.rows[machine_id] = replace(old, failure_description=description)

    @rule(mode=st.sampled_from(["compat", "strict"]))
    def set_mode(self, mode: str) -> None:
        self.conn.execute("SELECT machine_sync.set_mode_v1(%s)", [mode])
        self.mode = mode

    # -- the invariant ---------------------------------------------------------

    def check_model(self) -> None:
        found = {
            row[0]: Row(*row[1:])
            for row in self.conn.execute(
                "SELECT id, status, current_process_id, failure_description, failure_component"
                " FROM machines"
            )
        }
        assert found == self.rows

    @invariant()
    def tables_agree_and_match_the_model(self) -> None:
        assert_consistent(self.conn)
        self.check_model()
        # No client clock ever lands (legacy writers send 2000-01-01).
        oldest = self.conn.execute(
            "SELECT least(min(m.updated_at), min(s.updated_at), min(s.state_since)) < '2020-01-01'"
            " FROM machines m JOIN machine_state s ON s.machine_id = m.id"
        ).fetchone()
        assert oldest in ((False,), (None,))
        # state_since mirrors status_since (drift compares them too).
        assert self.conn.execute(
            "SELECT count(*) FROM machines m JOIN machine_state s ON s.machine_id = m.id"
            " WHERE m.status_since IS DISTINCT FROM s.state_since"
        ).fetchone() == (0,)


def run_machine(db: Any, examples: int, steps: int) -> None:
    with db.connect() as conn:
        machine = type("Run", (MachineSync,), {"conn": conn})
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=steps,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )


def test_random_write_sequences_keep_the_tables_in_agreement(db: Any) -> None:
    run_machine(db, examples=20, steps=25)


@pytest.mark.soak
def test_random_write_sequences_soak(db: Any) -> None:
    run_machine(db, examples=400, steps=60)


# ---------------------------------------------------------------------------
# Regular tests for what the random runs showed or cannot check.


def test_legacy_upserts_keep_unnamed_columns(conn: Conn) -> None:
    """PostgREST's upserts (Prefer: resolution=merge-duplicates / ignore-duplicates)
    name only the columns the client sent; the others keep their values."""
    process_id = PROCESSES[0]
    machine_id = add_machine(conn, status="processing", current_process_id=process_id)
    conn.execute(
        "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'Processing')"
        " ON CONFLICT (machine_id) DO UPDATE SET machine_id = excluded.machine_id,"
        " current_state = excluded.current_state",
        [machine_id],
    )
    assert_consistent(conn)
    assert machine(conn, machine_id)["current_process_id"] == process_id
    conn.execute(
        "INSERT INTO machine_state (machine_id, current_state) VALUES (%s, 'error')"
        " ON CONFLICT (machine_id) DO NOTHING",
        [machine_id],
    )
    assert_consistent(conn)
    assert machine(conn, machine_id)["status"] == "processing"


def test_upsert_inside_a_function_keeps_postgresql_meaning(conn: Conn) -> None:
    conn.execute(
        "CREATE FUNCTION public.ensure_state(p_machine_id uuid) RETURNS void LANGUAGE sql"
        " AS $$ INSERT INTO public.machine_state (machine_id, current_state)"
        " VALUES (p_machine_id, 'idle') ON CONFLICT (machine_id) DO NOTHING $$"
    )
    process_id = PROCESSES[0]
    machine_id = add_machine(conn, status="processing", current_process_id=process_id)
    conn.execute("SELECT public.ensure_state(%s)", [machine_id])
    assert_consistent(conn)
    row = machine(conn, machine_id)
    assert row is not None
    assert (row["status"], row["current_process_id"]) == ("processing", process_id)
