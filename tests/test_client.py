"""The sync client against a real PostgreSQL: every operation, every transition
rule, races, error translation and the number of round trips."""

from __future__ import annotations

import re
import threading
import time
import uuid
from importlib.resources import files
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from client_support import assert_matches_store, pgbouncer, round_trips
from machine_sync import _core
from machine_sync._queries import parse, queries
from machine_sync.client import Client
from machine_sync.errors import (
    _DOING_INSTEAD,
    BY_SQLSTATE,
    ConcurrentUpdate,
    DatabaseError,
    DatabaseUnreachable,
    DirectWriteRefused,
    InvalidArgument,
    InvalidStatus,
    InvalidTransition,
    MachineBusy,
    NotCurrentProcess,
    NotInstalled,
    PermissionDenied,
    UnknownComponent,
    UnknownMachine,
    UnknownProcess,
    translate,
)

from machines import (
    add_machine,
    assert_consistent,
    bypassing_triggers,
    machine,
    state,
    wait_for,
    wait_until_lock_waiting,
)


@pytest.fixture
def client(conn: psycopg.Connection[Any]) -> Client:
    return Client(conn)


def snapshot(conn: psycopg.Connection[Any], machine_id: uuid.UUID) -> tuple[Any, Any]:
    return machine(conn, machine_id), state(conn, machine_id)


def start(
    conn: psycopg.Connection[Any], client: Client, status: str = "idle"
) -> tuple[uuid.UUID, uuid.UUID]:
    machine_id = add_machine(conn, status=status)
    process = uuid.uuid4()
    client.start_process(machine_id, process)
    return machine_id, process


# -- start_process ----------------------------------------------------------


def test_start_from_idle_or_offline(conn, client):
    for initial in ("idle", "offline"):
        machine_id = add_machine(conn, status=initial)
        process = uuid.uuid4()
        result = client.start_process(machine_id, str(process))  # a str id works too
        assert (result.status, result.current_process_id) == ("processing", process)
        assert result.state is not None
        assert (result.state.current_state, result.state.process_id) == ("processing", process)
        assert result.state.is_failure_mode is False
        assert_matches_store(conn, result)
    assert_consistent(conn)


def test_start_on_processing_machine_is_busy_and_names_the_run(conn, client):
    machine_id, running = start(conn, client)
    before = snapshot(conn, machine_id)
    intruder = uuid.uuid4()
    with pytest.raises(MachineBusy) as caught:
        client.start_process(machine_id, intruder)
    err = caught.value
    assert (err.status, err.process_id, err.machine_id) == ("processing", running, machine_id)
    assert err.sqlstate == "MS002"  # the database's own refusal
    assert isinstance(err.__cause__, psycopg.Error)
    assert str(running) in str(err)
    assert str(intruder) in str(err)
    assert snapshot(conn, machine_id) == before


def test_start_refused_from_error_or_maintenance(conn, client):
    for initial in ("error", "maintenance"):
        machine_id = add_machine(conn, status=initial)
        with pytest.raises(InvalidTransition) as caught:
            client.start_process(machine_id, uuid.uuid4())
        assert not isinstance(caught.value, MachineBusy)
        assert caught.value.sqlstate == "MS003"
        assert f"cannot go from {initial} to processing" in str(caught.value)
        assert f"allowed from {initial}:" in str(caught.value)  # the DETAIL
        assert machine(conn, machine_id)["status"] == initial


def test_start_follows_rules_an_operator_tightened(conn, client):
    conn.execute(
        "DELETE FROM machine_sync.allowed_transition"
        " WHERE from_status = 'offline' AND to_status = 'processing'"
    )
    machine_id = add_machine(conn, status="offline")
    with pytest.raises(InvalidTransition, match="cannot go from offline to processing"):
        client.start_process(machine_id, uuid.uuid4())
    assert machine(conn, machine_id)["status"] == "offline"


def test_start_of_a_process_the_legacy_database_lacks(conn, client):
    """Production's machines.current_process_id references process_executions."""
    conn.execute("CREATE TABLE public.process_executions (id uuid PRIMARY KEY)")
    conn.execute(
        "ALTER TABLE public.machines ADD FOREIGN KEY (current_process_id)"
        " REFERENCES public.process_executions (id)"
    )
    machine_id = add_machine(conn, status="idle")
    missing = uuid.uuid4()
    with pytest.raises(UnknownProcess) as caught:
        client.start_process(machine_id, missing)
    assert (caught.value.process_id, caught.value.sqlstate) == (missing, "23503")
    assert str(missing) in str(caught.value)
    known = uuid.uuid4()
    conn.execute("INSERT INTO public.process_executions VALUES (%s)", [known])
    assert client.start_process(machine_id, known).current_process_id == known


def test_failure_of_a_component_the_legacy_database_lacks(conn, client):
    """Production's machine_state.failure_component references
    machine_components; the mirror's write of the state row meets it."""
    conn.execute("CREATE TABLE public.machine_components (id uuid PRIMARY KEY)")
    conn.execute(
        "ALTER TABLE public.machine_state ADD FOREIGN KEY (failure_component)"
        " REFERENCES public.machine_components (id)"
    )
    machine_id = add_machine(conn, status="idle")
    missing = uuid.uuid4()
    with pytest.raises(UnknownComponent) as caught:
        client.fail_process(machine_id, "valve stuck", missing)
    assert (caught.value.component_id, caught.value.sqlstate) == (missing, "23503")
    assert f"component {missing} is not in machine_components" in str(caught.value)
    assert machine(conn, machine_id)["status"] == "idle"
    known = uuid.uuid4()
    conn.execute("INSERT INTO public.machine_components VALUES (%s)", [known])
    assert client.fail_process(machine_id, "valve stuck", known).failure_component == known
    assert_consistent(conn)


# -- complete_process / stop_process ----------------------------------------


@pytest.mark.parametrize("operation", ["complete_process", "stop_process"])
def test_complete_or_stop_the_current_run(conn, client, operation):
    machine_id, process = start(conn, client)
    result = getattr(client, operation)(machine_id, process)
    assert (result.status, result.current_process_id) == ("idle", None)
    assert result.state is not None
    assert (result.state.current_state, result.state.process_id) == ("idle", None)
    assert_matches_store(conn, result)
    assert_consistent(conn)


@pytest.mark.parametrize("operation", ["complete_process", "stop_process"])
def test_complete_or_stop_of_another_run_is_refused(conn, client, operation):
    machine_id, current = start(conn, client)
    stale_run = uuid.uuid4()
    before = snapshot(conn, machine_id)
    with pytest.raises(NotCurrentProcess) as caught:
        getattr(client, operation)(machine_id, stale_run)
    assert (caught.value.status, caught.value.process_id) == ("processing", current)
    assert str(stale_run) in str(caught.value)
    assert snapshot(conn, machine_id) == before


@pytest.mark.parametrize("operation", ["complete_process", "stop_process"])
def test_complete_or_stop_needs_a_running_process(conn, client, operation):
    for initial in ("idle", "offline", "error", "maintenance"):
        machine_id = add_machine(conn, status=initial)
        with pytest.raises(NotCurrentProcess) as caught:
            getattr(client, operation)(machine_id, uuid.uuid4())
        assert caught.value.status == initial
        assert "no current process" in str(caught.value)


@pytest.mark.parametrize("operation", ["complete_process", "stop_process"])
def test_complete_or_stop_without_a_process_id_ends_the_current_run(conn, client, operation):
    machine_id, _process = start(conn, client)
    result = getattr(client, operation)(machine_id)
    assert (result.status, result.current_process_id) == ("idle", None)
    assert_matches_store(conn, result)
    assert_consistent(conn)
    with pytest.raises(InvalidTransition) as caught:
        getattr(client, operation)(machine_id)
    assert not isinstance(caught.value, NotCurrentProcess)
    assert caught.value.status == "idle"
    assert "only a processing machine" in str(caught.value)


def test_not_current_names_what_the_machine_does_for_any_stored_status(db, conn, client):
    """The fields of NotCurrentProcess come from the database's message: a
    status of the vocabulary's full length, and a run on a status stored
    outside it (bypassing the triggers), whose quoted spelling is no status."""
    long_status = "calibrating_" + "x" * 38  # 50 characters, the longest allowed
    conn.execute("INSERT INTO machine_sync.allowed_status VALUES (%s, 'long')", [long_status])
    conn.execute("INSERT INTO machine_sync.allowed_transition VALUES ('idle', %s)", [long_status])
    calibrating = add_machine(conn, status="idle")
    client.set_status(calibrating, long_status)
    with pytest.raises(NotCurrentProcess) as caught:
        client.complete_process(calibrating, uuid.uuid4())
    assert (caught.value.status, caught.value.process_id) == (long_status, None)
    odd, run = add_machine(conn, status="idle"), uuid.uuid4()
    bypassing_triggers(
        db,
        (
            "UPDATE machines SET status = %s, current_process_id = %s WHERE id = %s",
            ["Processing\\", run, odd],
        ),
    )
    with pytest.raises(NotCurrentProcess) as caught:
        client.fail_process(odd, "late", process_id=uuid.uuid4())
    assert (caught.value.status, caught.value.process_id) == (None, run)
    assert "'Processing" in str(caught.value)


def test_a_refusal_in_an_open_transaction_is_contained_by_a_savepoint(db, conn):
    machine_id, current = start(conn, Client(conn))
    with db.connect(autocommit=False) as tx:
        client = Client(tx)
        with pytest.raises(NotCurrentProcess), tx.transaction():
            client.complete_process(machine_id, uuid.uuid4())
        assert client.complete_process(machine_id, current).status == "idle"
        tx.commit()
    assert machine(conn, machine_id)["status"] == "idle"
    assert_consistent(conn)


def test_late_completion_of_an_old_run_does_not_end_the_new_one(conn, client):
    machine_id, first = start(conn, client)
    client.stop_process(machine_id, first)
    second = uuid.uuid4()
    client.start_process(machine_id, second)
    with pytest.raises(NotCurrentProcess):
        client.complete_process(machine_id, first)
    assert machine(conn, machine_id)["current_process_id"] == second


# -- fail_process -----------------------------------------------------------


def test_fail_from_any_status(conn, client):
    for initial in ("idle", "offline", "maintenance", "error"):
        machine_id = add_machine(conn, status=initial)
        component = uuid.uuid4()
        result = client.fail_process(machine_id, "Recipe execution error: valve", component)
        assert (result.status, result.current_process_id) == ("error", None)
        assert (result.failure_description, result.failure_component) == (
            "Recipe execution error: valve",
            component,
        )
        assert result.state is not None
        assert result.state.is_failure_mode is True
        assert result.state.failure_description == "Recipe execution error: valve"
        assert_matches_store(conn, result)
    running, _process = start(conn, client)
    assert client.fail_process(running, "stalled").current_process_id is None
    assert_consistent(conn)


def test_fail_of_the_current_run(conn, client):
    machine_id, process = start(conn, client)
    result = client.fail_process(machine_id, "pump stalled", process_id=process)
    assert (result.status, result.current_process_id, result.failure_component) == (
        "error",
        None,
        None,
    )
    assert_matches_store(conn, result)


def test_fail_of_another_run_is_refused(conn, client):
    machine_id, process = start(conn, client)
    with pytest.raises(NotCurrentProcess) as caught:
        client.fail_process(machine_id, "late error", process_id=uuid.uuid4())
    assert caught.value.process_id == process
    assert machine(conn, machine_id)["status"] == "processing"


def test_failing_again_keeps_state_since_and_replaces_the_message(conn, client):
    machine_id = add_machine(conn, status="idle")
    first = client.fail_process(machine_id, "first")
    second = client.fail_process(machine_id, "second")
    assert first.state is not None
    assert second.state is not None
    assert second.state.state_since == first.state.state_since
    assert second.failure_description == "second"
    assert_matches_store(conn, second)


# -- set_status -------------------------------------------------------------


def test_set_status_normalizes_and_clears_the_process(conn, client):
    machine_id, _process = start(conn, client)
    result = client.set_status(machine_id, "  MAINTENANCE ")
    assert (result.status, result.current_process_id) == ("maintenance", None)
    assert_matches_store(conn, result)
    assert_consistent(conn)


def test_leaving_error_clears_the_failure(conn, client):
    machine_id = add_machine(conn, status="idle")
    client.fail_process(machine_id, "broken", uuid.uuid4())
    result = client.set_status(machine_id, "idle")
    assert (result.failure_description, result.failure_component) == (None, None)
    assert result.state is not None
    assert (result.state.is_failure_mode, result.state.failure_description) == (False, None)
    assert_matches_store(conn, result)


def test_same_status_keeps_state_since(conn, client):
    machine_id = add_machine(conn, status="idle")
    first = client.set_status(machine_id, "offline")
    again = client.set_status(machine_id, "offline")
    assert first.state is not None
    assert again.state is not None
    assert again.state.state_since == first.state.state_since
    assert_matches_store(conn, again)


def test_set_status_processing_needs_a_process(conn, client):
    """The database's rule, not the client's: processing goes with a run."""
    machine_id = add_machine(conn, status="idle")
    for status in ("processing", " Running"):
        with pytest.raises(InvalidTransition) as caught:
            client.set_status(machine_id, status)
        assert caught.value.sqlstate == "MS003"
        assert "without a process" in str(caught.value)
        assert machine(conn, machine_id)["status"] == "idle"


def test_set_status_error_is_what_any_writer_may_do(conn, client):
    machine_id = add_machine(conn, status="idle")
    result = client.set_status(machine_id, "Error")
    assert (result.status, result.failure_description) == ("error", None)
    assert result.state is not None
    assert result.state.is_failure_mode is True
    assert_matches_store(conn, result)


def test_unknown_status_is_invalid_and_names_the_allowed_ones(conn, client):
    machine_id = add_machine(conn, status="idle")
    with pytest.raises(InvalidStatus) as caught:
        client.set_status(machine_id, "exploded")
    assert caught.value.sqlstate == "23514"
    assert "'exploded'" in str(caught.value)
    assert "idle, maintenance, offline" in str(caught.value)
    assert isinstance(caught.value.__cause__, psycopg.errors.CheckViolation)
    assert machine(conn, machine_id)["status"] == "idle"


def test_operator_added_status_can_be_set(conn, client):
    conn.execute("INSERT INTO machine_sync.allowed_status VALUES ('calibrating', 'Calibrating.')")
    machine_id = add_machine(conn, status="idle")
    with pytest.raises(InvalidTransition, match="cannot go from idle to calibrating"):
        client.set_status(machine_id, "calibrating")
    conn.execute("INSERT INTO machine_sync.allowed_transition VALUES ('idle', 'calibrating')")
    result = client.set_status(machine_id, "Calibrating")
    assert result.status == "calibrating"
    with pytest.raises(InvalidTransition):
        client.start_process(machine_id, uuid.uuid4())


# -- unknown machines and bad arguments --------------------------------------


UNKNOWN_MACHINE_CALLS = [
    lambda c, m: c.start_process(m, uuid.uuid4()),
    lambda c, m: c.complete_process(m, uuid.uuid4()),
    lambda c, m: c.stop_process(m, uuid.uuid4()),
    lambda c, m: c.fail_process(m, "x"),
    lambda c, m: c.set_status(m, "idle"),
    lambda c, m: c.get(m),
]


def test_unknown_machine(client):
    for call in UNKNOWN_MACHINE_CALLS:
        missing = uuid.uuid4()
        with pytest.raises(UnknownMachine) as caught:
            call(client, missing)
        assert caught.value.machine_id == missing
        assert str(missing) in str(caught.value)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda c: c.start_process("not-a-uuid", uuid.uuid4()), "machine_id must be a UUID"),
        (lambda c: c.start_process(uuid.uuid4(), 42), "process_id must be a UUID"),
        (lambda c: c.fail_process(uuid.uuid4(), "  "), "non-empty message"),
        (lambda c: c.fail_process(uuid.uuid4(), "x", "pump"), "component must be a UUID"),
        (lambda c: c.set_status(uuid.uuid4(), None), "status must be a string"),
    ],
    ids=["machine", "process", "message", "component", "status"],
)
def test_bad_arguments(call, words):
    # Refused before any I/O: the pool is never even opened.
    with pytest.raises(InvalidArgument) as caught:
        call(Client(ConnectionPool("", open=False)))
    assert words in str(caught.value)


def test_client_refuses_an_async_connection():
    with pytest.raises(TypeError, match="AsyncClient"):
        Client(object())  # type: ignore[arg-type]


def test_query_file_placeholders():
    """psycopg's own placeholders, as written: the text goes to psycopg unchanged."""
    [named, plain] = parse(
        "-- name: example\n-- What it does.\n"
        "SELECT 1::int, %(yes)s::uuid, ':no'\nFROM t WHERE %(yes)s IS NOT NULL AND %(also)s;\n\n"
        "-- name: plain\nSELECT '100%'"
    ).values()
    assert named.description == "What it does."
    assert named.params == {"yes", "also"}
    assert named.text.endswith("AND %(also)s")  # the final ; goes, the text stays
    with pytest.raises(TypeError, match=r"takes \['also', 'yes'\], got \['typo'\]"):
        named.bind(typo=1)
    assert plain.text == "SELECT '100%'"
    assert plain.params == frozenset()


def test_every_shipped_query_parses():
    for name, named in queries().items():
        assert named.description, name
        assert named.text.strip(), name


# -- the mirrored values come from the same statement ------------------------


def test_result_state_is_the_mirror_by_contract(conn, client):
    """state_since is the machine's status_since; the trigger wrote both in one statement."""
    machine_id = add_machine(conn, status="idle")
    result = client.set_status(machine_id, "offline")
    assert result.state is not None
    assert result.state.state_since == result.status_since
    assert result.state.current_state == result.status
    assert_matches_store(conn, result)
    assert_consistent(conn)


def test_missing_state_row_is_recreated_and_reported(db, conn, client):
    machine_id = add_machine(conn, status="idle")
    bypassing_triggers(db, ("DELETE FROM machine_state WHERE machine_id = %s", [machine_id]))
    assert client.get(machine_id).state is None
    result = client.set_status(machine_id, "offline")
    assert_matches_store(conn, result)
    assert_consistent(conn)


# -- reads and administration -----------------------------------------------


def test_get_and_list_read_both_tables(conn, client):
    first = add_machine(conn, status="idle", serial_number="SN-B")
    second = add_machine(conn, status="offline", serial_number="SN-A")
    process = uuid.uuid4()
    written = client.start_process(first, process)
    got = client.get(first)
    assert got == written
    listed = client.list()
    assert [m.id for m in listed] == [second, first]  # by serial number
    assert listed[1] == written
    assert listed[0].state is not None
    assert listed[0].state.current_state == "offline"


def test_drift_reconcile_and_mode(db, conn, client):
    machine_id = add_machine(conn, status="idle")
    assert client.drift() == []
    bypassing_triggers(
        db, ("UPDATE machine_state SET current_state = 'IDLE' WHERE machine_id = %s", [machine_id])
    )
    [row] = client.drift()
    assert (row.machine_id, row.problem, row.status, row.current_state) == (
        machine_id,
        "status_case",
        "idle",
        "IDLE",
    )
    [fixed] = client.reconcile()
    assert (fixed.machine_id, fixed.problem, fixed.repaired, fixed.reason) == (
        machine_id,
        "status_case",
        True,
        None,
    )
    assert client.drift() == []
    assert client.reconcile() == []
    assert client.mode() == "compat"
    change = client.set_mode(" STRICT ")
    assert (change.previous, change.current) == ("compat", "strict")
    assert client.mode() == "strict"
    with pytest.raises(InvalidArgument, match="'compat' or 'strict'") as caught:
        client.set_mode("lenient")
    assert caught.value.sqlstate == "22023"


def test_direct_write_refusal_is_translated(conn, client):
    machine_id = add_machine(conn, status="idle")
    client.set_mode("strict")
    with pytest.raises(psycopg.Error) as raw:
        conn.execute(
            "UPDATE machine_state SET current_state = 'error' WHERE machine_id = %s", [machine_id]
        )
    translated = translate(raw.value)
    assert isinstance(translated, DirectWriteRefused)
    assert translated.sqlstate == "MS001"
    assert "write public.machines instead" in str(translated)


def test_errors_are_classes_keyed_on_sqlstate():
    for code, error in BY_SQLSTATE.items():
        assert error.sqlstate in (code, None) or issubclass(error, ConcurrentUpdate), code
    assert BY_SQLSTATE["MS002"] is MachineBusy
    assert BY_SQLSTATE["MS004"] is UnknownMachine
    assert BY_SQLSTATE["23503"] is UnknownProcess
    assert all(BY_SQLSTATE[s] is ConcurrentUpdate for s in ("55P03", "40P01", "40001"))
    assert ConcurrentUpdate.retryable
    assert not InvalidTransition.retryable


def test_migrating_guide_lists_the_exception_of_every_sqlstate():
    """MIGRATING.md's SQLSTATE table says which exception each code becomes:
    it names every code BY_SQLSTATE maps, and the class translate gives."""
    guide = (files("machine_sync") / "MIGRATING.md").read_text()
    table = guide.split("## The SQLSTATEs", 1)[1].split("\n\n", 2)[1]
    listed: dict[str, set[str]] = {}
    for line in table.splitlines()[2:]:
        codes, _, exception = line.strip("|").split(" | ")
        for code in re.findall(r"`(\w+)`", codes):
            listed.setdefault(code, set()).update(re.findall(r"`(\w+)`", exception))
    assert set(BY_SQLSTATE) <= set(listed)
    for code, error in BY_SQLSTATE.items():
        assert error.__name__ in listed[code], code
    # 23503 is UnknownProcess or, from machine_state's foreign key, UnknownComponent.
    assert listed["23503"] == {"UnknownProcess", "UnknownComponent"}


def test_missing_objects_are_not_installed(db):
    with db.connect() as other:
        other.execute("DROP SCHEMA machine_sync CASCADE")
        with pytest.raises(NotInstalled, match="migrate apply") as caught:
            Client(other).drift()
    assert caught.value.sqlstate in ("42P01", "3F000")


def test_missing_privilege_is_permission_denied(db, conn):
    role = f"t_nobody_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{role}"')
    conn.execute(f'GRANT "{role}" TO CURRENT_USER')
    machine_id = add_machine(conn, status="idle")
    try:
        with db.connect() as other:
            other.execute(f'SET ROLE "{role}"')  # test setup only: the client sets nothing
            with pytest.raises(PermissionDenied) as caught:
                Client(other).set_status(machine_id, "offline")
        assert "permission denied" in str(caught.value)
    finally:
        conn.execute(f'DROP ROLE "{role}"')


def test_an_update_policy_narrower_than_the_select_policy_is_permission_denied(db, conn):
    machine_id = add_machine(conn, status="idle")
    conn.execute("ALTER TABLE machines ENABLE ROW LEVEL SECURITY")
    conn.execute("CREATE POLICY t_see ON machines FOR SELECT TO authenticated USING (true)")
    conn.execute("CREATE POLICY t_write ON machines FOR UPDATE TO authenticated USING (false)")
    with db.connect() as user:
        user.execute("SET ROLE authenticated")  # test setup only: the client sets nothing
        with pytest.raises(PermissionDenied, match="row-level security policy lets this role see"):
            Client(user).set_status(machine_id, "offline")
    assert machine(conn, machine_id)["status"] == "idle"


def add_skipping_trigger(conn) -> None:
    """An application's BEFORE UPDATE trigger on machines that skips every update."""
    conn.execute(
        "CREATE FUNCTION public.t_skip() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RETURN NULL; END $$"
    )
    conn.execute(
        "CREATE TRIGGER a_skip BEFORE UPDATE ON machines FOR EACH ROW"
        " EXECUTE FUNCTION public.t_skip()"
    )


def test_a_trigger_that_skips_the_update_is_named(conn, client):
    machine_id = add_machine(conn, status="idle")
    add_skipping_trigger(conn)
    with pytest.raises(PermissionDenied, match=r"a trigger on public\.machines skipped the update"):
        client.set_status(machine_id, "offline")
    assert machine(conn, machine_id)["status"] == "idle"


@pytest.mark.parametrize("operation", ["complete_process", "stop_process"])
def test_ending_the_current_run_past_a_trigger_that_skips_the_update_names_the_trigger(
    conn, client, operation
):
    """A machine processing all along whose end, without a run id, an
    application's trigger skips: the answer must not claim that another
    writer started it meanwhile (nobody did), and is no retry."""
    machine_id = add_machine(conn, status="idle")
    run = uuid.uuid4()
    client.start_process(machine_id, run)
    add_skipping_trigger(conn)
    with pytest.raises(InvalidTransition) as caught:
        getattr(client, operation)(machine_id)
    assert not caught.value.retryable
    assert "a trigger on public.machines skipped the update" in str(caught.value)
    assert (caught.value.status, caught.value.process_id) == ("processing", run)
    assert machine(conn, machine_id)["current_process_id"] == run


@pytest.mark.parametrize("operation", ["complete_process", "stop_process"])
def test_ending_the_current_run_of_a_machine_started_meanwhile(
    db, conn, client, operation, monkeypatch
):
    """Without a run id, complete and stop end the run current when they
    run. A machine idle then, and started before the client asks why nothing
    was written: refused (not a permission problem), the new run untouched."""
    machine_id = add_machine(conn, status="idle")
    run = uuid.uuid4()
    classify = _core.classify

    def start_first(request: _core.Request) -> _core.Request:
        with db.connect() as other:
            Client(other).start_process(machine_id, run)
        return classify(request)

    monkeypatch.setattr(_core, "classify", start_first)
    with pytest.raises(InvalidTransition, match="another writer has started it since") as caught:
        getattr(client, operation)(machine_id)
    assert type(caught.value) is InvalidTransition
    assert (caught.value.status, caught.value.process_id) == ("processing", run)
    assert machine(conn, machine_id)["current_process_id"] == run
    assert_consistent(conn)


@pytest.mark.parametrize("operation", ["complete_process", "stop_process"])
def test_ending_the_current_run_of_a_machine_another_transaction_is_starting(
    db, conn, client, operation, monkeypatch
):
    """Idle when the client's UPDATE ran, being started by a transaction not
    committed yet when it asks why nothing was written: refused as idle, as
    its snapshot has it, not a retry that would end the other's new run."""
    machine_id = add_machine(conn, status="idle")
    classify = _core.classify
    with db.connect(autocommit=False) as other:

        def start_first(request: _core.Request) -> _core.Request:
            Client(other).start_process(machine_id, uuid.uuid4())  # not committed yet
            return classify(request)

        monkeypatch.setattr(_core, "classify", start_first)
        with pytest.raises(InvalidTransition, match="only a processing machine") as caught:
            getattr(client, operation)(machine_id)
        other.rollback()
    assert type(caught.value) is InvalidTransition
    assert caught.value.status == "idle"
    assert machine(conn, machine_id)["status"] == "idle"


def test_a_machine_being_written_while_the_client_asks_why_is_retryable(
    db, conn, client, monkeypatch
):
    """A write skipped (here by an application's trigger) on a machine that
    another transaction locks before the client asks why: may succeed if
    retried, so ConcurrentUpdate, not a verdict."""
    machine_id = add_machine(conn, status="idle")
    add_skipping_trigger(conn)
    classify = _core.classify
    with db.connect(autocommit=False) as other:

        def lock_first(request: _core.Request) -> _core.Request:
            other.execute("SELECT FROM machines WHERE id = %s FOR UPDATE", (machine_id,))
            return classify(request)

        monkeypatch.setattr(_core, "classify", lock_first)
        with pytest.raises(ConcurrentUpdate) as caught:
            client.set_status(machine_id, "offline")
        other.rollback()
    assert caught.value.retryable
    assert "roll it back if it is still open, then retry it from its start" in str(caught.value)
    assert machine(conn, machine_id)["status"] == "idle"


def test_service_role_gets_exact_results(db, conn):
    """Supabase's service_role (BYPASSRLS) sees machine_state, so results are exact."""
    machine_id = add_machine(conn, status="idle")
    with db.connect() as service:
        service.execute("SET ROLE service_role")
        client = Client(service)
        first = client.set_status(machine_id, "offline")
        again = client.set_status(machine_id, "offline")
    assert first.state is not None
    assert again.state is not None
    assert again.state.state_since == first.state.state_since
    assert_matches_store(conn, again)


# -- connections, pools, transactions ---------------------------------------


def test_closed_connection_is_unreachable(db):
    conn = db.connect()
    conn.close()
    with pytest.raises(DatabaseUnreachable, match="cannot reach the database"):
        Client(conn).list()


@pytest.mark.parametrize("setting", ["idle_session_timeout", "idle_in_transaction_session_timeout"])
def test_a_session_the_server_ended_is_unreachable(db, conn, setting):
    """A timeout that ends the session (57P05, 25P03) leaves no connection:
    DatabaseUnreachable, as for one that was closed, not a DatabaseError."""
    ended = db.connect(autocommit=setting == "idle_session_timeout")
    pid = ended.info.backend_pid
    ended.execute(f"SET {setting} = '100ms'")
    ended.execute("SELECT 1")  # in a transaction, unless autocommit
    wait_for(
        "the server to end the session",
        lambda: (
            conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()[
                0
            ]
            == 0
        ),
    )
    with pytest.raises(DatabaseUnreachable, match="cannot reach the database"):
        Client(ended).mode()
    ended.close()


def test_pool_without_server_is_unreachable():
    # Port 1 on localhost: nothing listens, the refusal is immediate.
    with (
        ConnectionPool("host=127.0.0.1 port=1 connect_timeout=1", min_size=1, timeout=0.3) as pool,
        pytest.raises(DatabaseUnreachable),
    ):
        Client(pool).list()


def test_pool(db, conn):
    for autocommit in (True, False):
        machine_id = add_machine(conn, status="idle")
        kwargs = {"autocommit": autocommit}
        with ConnectionPool(db.dsn, min_size=1, max_size=2, kwargs=kwargs) as pool:
            client = Client(pool)
            process = uuid.uuid4()
            client.start_process(machine_id, process)
            with pytest.raises(MachineBusy):
                client.start_process(machine_id, uuid.uuid4())
            assert client.get(machine_id).current_process_id == process
        assert machine(conn, machine_id)["current_process_id"] == process  # committed


def test_joins_the_callers_transaction(db, conn):
    machine_id = add_machine(conn, status="idle")
    with db.connect(autocommit=False) as tx:
        client = Client(tx)
        client.start_process(machine_id, uuid.uuid4())
        assert client.get(machine_id).status == "processing"
        tx.rollback()
        assert client.get(machine_id).status == "idle"
    assert machine(conn, machine_id)["status"] == "idle"


def test_prepared_statements(db, conn):
    machine_id = add_machine(conn, status="idle")
    with db.connect(prepare_threshold=0) as prepared:
        client = Client(prepared)
        for _ in range(2):
            process = uuid.uuid4()
            client.start_process(machine_id, process)
            client.complete_process(machine_id, process)
        client.get(machine_id)
        names = prepared.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql"
        ).fetchone()
    assert names is not None
    assert names[0] >= 2  # transition and get_machine ran as prepared statements
    assert_consistent(conn)


def test_in_pipeline_mode_what_a_call_returns_is_committed(db, conn):
    """On an autocommit connection in pipeline mode, a statement that fails
    after the call (before the pipeline's next sync) does not undo it."""
    machine_id = add_machine(conn, status="idle")
    run = uuid.uuid4()
    started: list[Any] = []

    def start_then_fail(piped: psycopg.Connection[Any]) -> None:
        with piped.pipeline():
            started.append(Client(piped).start_process(machine_id, run))
            piped.execute("SELECT 1 / 0")

    with db.connect() as piped, pytest.raises(psycopg.errors.DivisionByZero):
        start_then_fail(piped)
    assert [m.current_process_id for m in started] == [run]
    row = machine(conn, machine_id)
    assert (row["status"], row["current_process_id"]) == ("processing", run)
    assert_consistent(conn)


def test_in_pipeline_mode_a_call_after_a_failed_statement_runs_nothing(db, conn):
    """The server skips a pipeline's statements after a failure up to the
    next sync: the call says so (not a lost connection), and the pipeline
    works again after it."""
    machine_id = add_machine(conn, status="idle")
    with db.connect() as piped, piped.pipeline():
        client = Client(piped)
        with pytest.raises(psycopg.errors.DivisionByZero):
            piped.execute("SELECT 1 / 0").fetchall()
        with pytest.raises(DatabaseError, match="earlier statement in this pipeline failed"):
            client.start_process(machine_id, uuid.uuid4())
        assert client.get(machine_id).status == "idle"
    assert machine(conn, machine_id)["status"] == "idle"
    assert_consistent(conn)


# A statement of the caller's own, queued in its pipeline and not yet read,
# that fails: MachineBusy of another machine, a table that does not exist.
EARLIER_FAILURES = {
    "busy": "UPDATE machines SET status = 'processing', current_process_id = %s WHERE id = %s",
    "missing_table": "SELECT * FROM no_such_table WHERE %s::uuid <> %s",
}


@pytest.mark.parametrize("earlier", sorted(EARLIER_FAILURES))
def test_in_pipeline_mode_an_earlier_statements_failure_is_not_the_calls(db, conn, earlier):
    """A call made while a statement the caller queued before it has failed
    unseen says so: not that this machine is busy, nor that machine-sync is
    not installed. Nothing of the call was applied, and the next call runs."""
    busy = add_machine(conn, status="idle")
    Client(conn).start_process(busy, uuid.uuid4())
    machine_id = add_machine(conn, status="idle")
    run = uuid.uuid4()
    with db.connect() as piped, piped.pipeline():
        client = Client(piped)
        piped.execute(EARLIER_FAILURES[earlier], [uuid.uuid4(), busy])
        earlier_failed = "earlier statement in this pipeline failed"
        with pytest.raises(DatabaseError, match=earlier_failed) as info:
            client.start_process(machine_id, run)
        assert type(info.value) is DatabaseError
        assert machine(conn, machine_id)["status"] == "idle"
        assert client.start_process(machine_id, run).current_process_id == run
    assert machine(conn, machine_id)["current_process_id"] == run
    assert_consistent(conn)


def test_through_pgbouncer_in_transaction_mode(db, conn):
    """Two clients share one server connection: nothing may rely on session state."""
    machine_id = add_machine(conn, status="idle")
    with pgbouncer(db.dsn) as through:
        # PgBouncer before 1.21 cannot carry prepared statements in this mode.
        options = {"autocommit": True, "prepare_threshold": None}
        with psycopg.connect(through, **options) as a, psycopg.connect(through, **options) as b:
            first, second = Client(a), Client(b)
            for _ in range(3):
                process = uuid.uuid4()
                started = first.start_process(machine_id, process)
                with pytest.raises(MachineBusy):
                    second.start_process(machine_id, uuid.uuid4())
                failed = second.fail_process(machine_id, "x", process_id=process)
                assert started.current_process_id == process
                assert_matches_store(conn, failed)
                assert first.set_status(machine_id, "idle").status == "idle"
            assert second.get(machine_id).status == "idle"
            assert len(first.list()) == 1
    assert_consistent(conn)


# -- round trips ------------------------------------------------------------


OPERATIONS = {
    "start_process": lambda c, m, p: c.start_process(m, p),
    "complete_process": lambda c, m, p: c.complete_process(m, p),
    "start_again": lambda c, m, p: c.start_process(m, p),
    "stop_process": lambda c, m, p: c.stop_process(m, p),
    "fail_process": lambda c, m, p: c.fail_process(m, "boom"),
    "set_status": lambda c, m, p: c.set_status(m, "idle"),
    "get": lambda c, m, p: c.get(m),
    "list": lambda c, m, p: c.list(),
}


def test_each_operation_is_one_round_trip(conn, client):
    machine_id = add_machine(conn, status="idle")
    process = uuid.uuid4()
    counted = {}
    for name, call in OPERATIONS.items():
        with round_trips(conn) as trips:
            call(client, machine_id, process)
        counted[name] = trips.count
    assert counted == dict.fromkeys(OPERATIONS, 1)


def test_refusal_by_the_database_is_one_round_trip_too(conn, client):
    machine_id, current = start(conn, client)
    refusals = (
        (MachineBusy, lambda: client.start_process(machine_id, uuid.uuid4())),
        (NotCurrentProcess, lambda: client.complete_process(machine_id, uuid.uuid4())),
        (NotCurrentProcess, lambda: client.stop_process(machine_id, uuid.uuid4())),
        (
            NotCurrentProcess,
            lambda: client.fail_process(machine_id, "late", process_id=uuid.uuid4()),
        ),
    )
    for error, call in refusals:
        with round_trips(conn) as trips, pytest.raises(error) as caught:
            call()
        assert trips.count == 1, trips.statements
        assert caught.value.process_id == current
    assert machine(conn, machine_id)["current_process_id"] == current


def test_an_update_that_finds_no_row_takes_one_more_read(conn, client):
    """Only when the UPDATE returned no row: one SELECT says why."""
    idle = add_machine(conn, status="idle")
    for call, error in (
        (lambda: client.complete_process(uuid.uuid4(), uuid.uuid4()), UnknownMachine),
        (lambda: client.stop_process(idle), InvalidTransition),
    ):
        with round_trips(conn) as trips, pytest.raises(error):
            call()
        assert trips.count == 2
        # The trace shows each query's first line: its description in queries.sql.
        assert queries()["end_process"].description in trips.statements[0]
        assert queries()["classify"].description in trips.statements[1]


def test_pool_round_trips(db, conn):
    """One per call with an autocommit pool; psycopg adds BEGIN and COMMIT otherwise."""
    machine_id = add_machine(conn, status="idle")
    for autocommit, expected in ((True, 1), (False, 3)):
        with ConnectionPool(
            db.dsn, min_size=1, max_size=1, kwargs={"autocommit": autocommit}
        ) as pool:
            client = Client(pool)
            with pool.connection() as pooled:
                pass
            with round_trips(pooled) as trips:
                client.set_status(machine_id, "offline")
            assert trips.count == expected, (autocommit, trips.statements)


def test_one_top_level_statement_per_operation(db, conn, client):
    """Cross-check with pg_stat_statements: one statement, nested trigger work aside."""
    admin = db.connect(admin=True)
    try:
        admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        admin.execute("SELECT pg_stat_statements_reset()")
    except psycopg.Error as exc:  # a server given by DSN may not preload it
        admin.close()
        pytest.skip(f"pg_stat_statements unavailable: {exc}")
    with admin:
        machine_id = add_machine(conn, status="idle")
        with db.connect() as measured:
            measured_client = Client(measured)
            process = uuid.uuid4()
            admin.execute("SELECT pg_stat_statements_reset()")
            measured_client.start_process(machine_id, process)
            measured_client.complete_process(machine_id, process)
            measured_client.fail_process(machine_id, "boom")
            measured_client.set_status(machine_id, "idle")
        calls = admin.execute(
            """
            SELECT sum(calls)::int FROM pg_stat_statements
            WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
              AND toplevel AND query NOT LIKE '%%pg_stat_statements%%'
            """
        ).fetchone()
    assert calls == (4,)


# -- races ------------------------------------------------------------------


def test_simultaneous_starts_from_threads_have_one_winner(db, conn):
    machine_id = add_machine(conn, status="idle")
    contenders = 8
    barrier = threading.Barrier(contenders)
    outcomes: dict[uuid.UUID, Any] = {}

    def press_start(process: uuid.UUID) -> None:
        with db.connect() as own:
            client = Client(own)
            barrier.wait()
            try:
                outcomes[process] = client.start_process(machine_id, process)
            except MachineBusy as busy:
                outcomes[process] = busy

    threads = [
        threading.Thread(target=press_start, args=(uuid.uuid4(),)) for _ in range(contenders)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [p for p, o in outcomes.items() if not isinstance(o, MachineBusy)]
    assert len(winners) == 1
    assert len(outcomes) == contenders
    for process, outcome in outcomes.items():
        if process != winners[0]:
            assert outcome.process_id == winners[0]
            assert str(winners[0]) in str(outcome)
    assert machine(conn, machine_id)["current_process_id"] == winners[0]
    assert_consistent(conn)


@pytest.mark.parametrize("first_commits", [True, False])
def test_loser_waits_for_the_winner_and_sees_its_commit(db, conn, first_commits):
    machine_id = add_machine(conn, status="idle")
    first, second = uuid.uuid4(), uuid.uuid4()
    outcome: list[Any] = []
    with db.connect(autocommit=False) as winner_conn, db.connect() as loser_conn:
        Client(winner_conn).start_process(machine_id, first)  # row locked, not committed

        def loser() -> None:
            try:
                outcome.append(Client(loser_conn).start_process(machine_id, second))
            except MachineBusy as busy:
                outcome.append(busy)

        thread = threading.Thread(target=loser)
        thread.start()
        wait_until_lock_waiting(conn, loser_conn.info.backend_pid)
        if first_commits:
            winner_conn.commit()
        else:
            winner_conn.rollback()
        thread.join()
    [result] = outcome
    if first_commits:
        assert isinstance(result, MachineBusy)
        assert result.process_id == first
    else:
        assert not isinstance(result, MachineBusy)
        assert result.current_process_id == second
    assert_consistent(conn)


def test_overtaken_write_that_keeps_the_status_is_one_round_trip_and_exact(db, conn):
    """The trigger runs on the row the winner committed: state_since is the winner's."""
    machine_id = add_machine(conn, status="idle")
    outcome: list[Any] = []
    with db.connect(autocommit=False) as first_conn, db.connect() as second_conn:
        first = Client(first_conn).fail_process(machine_id, "first")

        def second() -> None:
            with round_trips(second_conn) as trips:
                outcome.append(Client(second_conn).fail_process(machine_id, "second"))
            outcome.append(trips)

        thread = threading.Thread(target=second)
        thread.start()
        wait_until_lock_waiting(conn, second_conn.info.backend_pid)
        first_conn.commit()
        thread.join()
    result, trips = outcome
    assert trips.count == 1
    assert result.failure_description == "second"
    assert first.state is not None
    assert result.state.state_since == first.state.state_since
    assert_matches_store(conn, result)


def test_overtaken_write_that_changes_the_status_is_written_at_once(db, conn):
    """A writer committed while this one waited; the status changes, so no resend."""
    machine_id = add_machine(conn, status="idle")
    outcome: list[Any] = []
    with db.connect(autocommit=False) as first_conn, db.connect() as second_conn:
        Client(first_conn).fail_process(machine_id, "first")

        def second() -> None:
            with round_trips(second_conn) as trips:
                outcome.append(Client(second_conn).set_status(machine_id, "maintenance"))
            outcome.append(trips)

        thread = threading.Thread(target=second)
        thread.start()
        wait_until_lock_waiting(conn, second_conn.info.backend_pid)
        first_conn.commit()
        thread.join()
    result, trips = outcome
    assert trips.count == 1
    assert (result.status, result.failure_description) == ("maintenance", None)  # error left
    assert_matches_store(conn, result)
    assert_consistent(conn)


def test_compat_writer_racing_a_machines_writer_gives_up_cleanly(db, conn):
    """Rollout hazard, pinned: a transaction that row-locks a machine before writing it,
    racing a legacy machine_state write (compat), would wait in a cycle with it. The
    legacy write polls for its machine instead of waiting, sees the client's write
    waiting for it and gives up (40001); nothing is half-applied, it is reported as
    retryable, and no deadlock (40P01) happens."""
    machine_id = add_machine(conn, status="idle")
    legacy: list[Any] = []

    def legacy_write() -> None:
        with db.connect() as old:
            try:
                old.execute(
                    "UPDATE machine_state SET current_state = 'maintenance' WHERE machine_id = %s",
                    [machine_id],
                )
                legacy.append("written")
            except psycopg.Error as exc:
                legacy.append(translate(exc))

    with db.connect(autocommit=False) as new:
        # A transaction that holds the machine's row lock (an earlier write, say).
        new.execute("SELECT FROM machines WHERE id = %s FOR NO KEY UPDATE", [machine_id])
        thread = threading.Thread(target=legacy_write)
        thread.start()
        deadline = time.monotonic() + 10
        while conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event = 'PgSleep' AND query LIKE 'UPDATE machine_state%%'"
        ).fetchone() == (0,):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        Client(new).set_status(machine_id, "offline")  # needs the state row: a cycle
        new.commit()
        thread.join()
    [victim] = legacy
    assert isinstance(victim, ConcurrentUpdate)
    assert victim.retryable
    assert victim.sqlstate == "40001"
    assert "retry" in str(victim)
    assert machine(conn, machine_id)["status"] == "offline"
    assert_consistent(conn)


@pytest.mark.parametrize(
    "wording",
    [
        "its status is error, with no current process",
        "it is error with no current process",  # definitions installed before the rewording
    ],
)
def test_ms005_is_read_in_either_wording(wording):
    machine = uuid.uuid4()
    found = _DOING_INSTEAD.match(
        f"machine {machine} is not running process {uuid.uuid4()}: {wording}"
    )
    assert found is not None
    assert (found[1], found[2]) == ("error", None)
