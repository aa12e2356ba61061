"""The legacy code through PostgREST, as `authenticated`, on the migrated production database.

Each legacy path is two PATCH requests (the legacy paths of MIGRATING.md, statement by
statement, in their original order), each its own PostgREST transaction:
role and claims set with set_config, the statement in PostgREST's
`WITH pgrst_source AS (...)` shape, its rows returned as JSON.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

from postgrest import ASSIGNED, LEGACY_MACHINE, patch, request, rpc, upsert

from machines import assert_consistent, machine, state

IDLE = LEGACY_MACHINE.format(1)


def new_process(conn) -> uuid.UUID:
    """A process_executions row: production's machines reference one."""
    (process,) = conn.execute(
        "INSERT INTO process_executions DEFAULT VALUES RETURNING id"
    ).fetchone()
    return process


def started(owner, machine_id) -> uuid.UUID:
    process = new_process(owner)
    owner.execute(
        "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s",
        [process, machine_id],
    )
    return process


def legacy_path(path, process=None, message="pump tripped"):
    """The two (table, body) requests of a legacy path."""
    return {
        "start": [
            (
                "machines",
                {"status": "processing", "current_process_id": process, "updated_at": "2020-01-01"},
            ),
            (
                "machine_state",
                {
                    "current_state": "processing",
                    "process_id": process,
                    "state_since": "2020-01-01T00:00:00Z",
                    "is_failure_mode": False,
                    "failure_component": None,
                    "failure_description": None,
                },
            ),
        ],
        "completion": [
            ("machines", {"status": "idle", "current_process_id": None}),
            (
                "machine_state",
                {
                    "current_state": "idle",
                    "process_id": None,
                    "state_since": "2020-01-01T00:00:00Z",
                    "is_failure_mode": False,
                },
            ),
        ],
        "error": [
            (
                "machine_state",
                {
                    "current_state": "error",
                    "is_failure_mode": True,
                    "failure_description": f"Recipe execution error: {message}",
                },
            ),
            ("machines", {"status": "error", "current_process_id": None}),
        ],
        "stop": [
            ("machines", {"current_process_id": None}),
            (
                "machine_state",
                {"current_state": "idle", "process_id": None, "is_failure_mode": False},
            ),
        ],
    }[path]


@pytest.fixture
def migrated(legacy_db):
    legacy_db.migrate()
    return legacy_db


@pytest.mark.parametrize("path", ["start", "completion", "error", "stop"])
def test_every_legacy_path_as_authenticated_through_postgrest_in_compat(migrated, path):
    with migrated.connect() as owner:
        process = new_process(owner)
        if path != "start":
            started(owner, IDLE)
    with migrated.connect(autocommit=False) as api:
        for table, body in legacy_path(path, process):
            with request(api) as tx:
                rows = patch(tx, table, IDLE, body)
            # supabase-py reads an empty result as a failure: each returns its row.
            assert len(rows) == 1, (table, body)
            if table == "machine_state":
                assert rows[0]["current_state"] == body["current_state"]
    with migrated.connect() as owner:
        m = machine(owner, uuid.UUID(IDLE))
        expected = {
            "start": ("processing", process, None),
            "completion": ("idle", None, None),
            "error": ("error", None, "Recipe execution error: pump tripped"),
            "stop": ("idle", None, None),
        }[path]
        assert (m["status"], m["current_process_id"], m["failure_description"]) == expected
        s = state(owner, uuid.UUID(IDLE))
        assert (s["current_state"], s["process_id"], s["failure_description"]) == expected
        assert s["state_since"] == m["status_since"]  # never the client's 2020
        assert_consistent(owner)


@pytest.mark.parametrize("path", ["start", "completion", "error", "stop"])
def test_a_user_not_assigned_to_the_machine_writes_nothing_through_postgrest(migrated, path):
    with migrated.connect() as owner:
        process = new_process(owner)
        if path != "start":
            started(owner, IDLE)
        before = (machine(owner, uuid.UUID(IDLE)), state(owner, uuid.UUID(IDLE)))
    with migrated.connect(autocommit=False) as api:
        for table, body in legacy_path(path, process):
            with request(api, sub=uuid.uuid4()) as tx:
                assert patch(tx, table, IDLE, body) == []
    with migrated.connect() as owner:
        assert (machine(owner, uuid.UUID(IDLE)), state(owner, uuid.UUID(IDLE))) == before
        assert_consistent(owner)


def test_a_legacy_state_write_the_user_may_not_carry_into_machines_is_refused(migrated):
    """The state row is writable for the user but its machine is not: 42501, nothing written."""
    with migrated.connect() as owner:
        owner.execute('DROP POLICY "users update their machines" ON machines')
        before = (machine(owner, uuid.UUID(IDLE)), state(owner, uuid.UUID(IDLE)))
    with (
        migrated.connect(autocommit=False) as api,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="not visible or not writable"),
        request(api) as tx,
    ):
        patch(tx, "machine_state", IDLE, {"current_state": "maintenance"})
    with migrated.connect() as owner:
        assert (machine(owner, uuid.UUID(IDLE)), state(owner, uuid.UUID(IDLE))) == before
        assert_consistent(owner)


def test_strict_refuses_the_legacy_state_write_through_postgrest_with_ms001(migrated):
    with migrated.connect() as owner:
        owner.execute("SELECT machine_sync.set_mode_v1('strict')")
        process = new_process(owner)
    with migrated.connect(autocommit=False) as api:
        (first, body), (second, state_body) = legacy_path("start", process)
        with request(api) as tx:
            assert len(patch(tx, first, IDLE, body)) == 1
        with (
            pytest.raises(psycopg.Error, match="read-only in strict mode") as caught,
            request(api) as tx,
        ):
            patch(tx, second, IDLE, state_body)
        assert caught.value.sqlstate == "MS001"
    with migrated.connect() as owner:
        assert machine(owner, uuid.UUID(IDLE))["current_process_id"] == process
        assert_consistent(owner)


def test_rpc_on_a_machine_whose_state_row_rls_hides_returns_machine_state_null(migrated):
    with migrated.connect() as owner:
        owner.execute('DROP POLICY "users see assigned machines" ON machine_state')
    with migrated.connect(autocommit=False) as api, request(api) as tx:
        result = rpc(tx, "atomic_complete_machine_state", p_machine_id=uuid.UUID(IDLE))
    assert result["success"] is True
    assert result["machine"]["id"] == IDLE
    assert result["machine_state"] is None
    with migrated.connect() as owner:
        assert_consistent(owner)


def test_rpc_on_a_missing_or_hidden_machine_is_ms004_not_p0002(migrated):
    with migrated.connect(autocommit=False) as api:
        for machine_id, sub in ((uuid.uuid4(), ASSIGNED), (uuid.UUID(IDLE), uuid.uuid4())):
            with (
                pytest.raises(psycopg.Error, match="does not exist or is not writable") as caught,
                request(api, sub=sub) as tx,
            ):
                rpc(tx, "atomic_complete_machine_state", p_machine_id=machine_id)
            assert caught.value.sqlstate == "MS004"


@pytest.mark.parametrize("table", ["machines", "machine_state"])
def test_ending_a_run_that_is_not_current_is_ms005_and_the_current_run_ends(migrated, table):
    """A PATCH that names the run it ends: refused (HTTP 400) unless it is the current run."""
    with migrated.connect() as owner:
        old = started(owner, IDLE)
        owner.execute("UPDATE machines SET status = 'idle' WHERE id = %s", [IDLE])
        current = started(owner, IDLE)
    key = "current_process_id" if table == "machines" else "process_id"
    status = "status" if table == "machines" else "current_state"
    with migrated.connect(autocommit=False) as api:
        with pytest.raises(psycopg.Error) as caught, request(api) as tx:
            patch(tx, table, IDLE, {status: "idle", key: str(old)})
        assert caught.value.sqlstate == "MS005"
        message = caught.value.diag.message_primary or ""
        assert f"is not running process {old}" in message
        assert f"its status is processing, with process {current}" in message
        with migrated.connect() as owner:
            assert machine(owner, IDLE)["current_process_id"] == current
        with request(api) as tx:
            (row,) = patch(tx, table, IDLE, {status: "idle", key: str(current)})
        assert row[status] == "idle"
        # A legacy state write reports its row as written; the run ends in both tables.
        assert row[key] == (None if table == "machines" else str(current))
    with migrated.connect() as owner:
        assert (machine(owner, IDLE)["status"], state(owner, IDLE)["process_id"]) == ("idle", None)
        assert_consistent(owner)


def test_saving_a_whole_machine_row_with_an_upsert_ends_its_run(migrated):
    """POST /machines with resolution=merge-duplicates, the row as read with a
    new status (an app saving its model object): an UPDATE of the machine, so
    the run it still names ends; saved again once another run started, MS005."""
    with migrated.connect() as owner:
        started(owner, IDLE)
        saved = machine(owner, IDLE)
    with migrated.connect(autocommit=False) as api:
        with request(api, role="service_role") as tx:
            (row,) = upsert(tx, "machines", {**saved, "status": "idle"})
        assert (row["status"], row["current_process_id"]) == ("idle", None)
        with migrated.connect() as owner:
            later = started(owner, IDLE)
        with pytest.raises(psycopg.Error) as caught, request(api, role="service_role") as tx:
            upsert(tx, "machines", {**saved, "status": "idle"})
        assert caught.value.sqlstate == "MS005"
        assert f"its status is processing, with process {later}" in str(caught.value)
    with migrated.connect() as owner:
        assert state(owner, IDLE)["process_id"] == later
        assert_consistent(owner)
