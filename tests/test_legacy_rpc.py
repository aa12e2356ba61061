"""The legacy RPC functions keep working for deployed code, each as one write to machines."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from machines import add_machine, assert_consistent, machine, start, state


def call(conn, function, **arguments):
    # PostgREST calls RPCs with named parameters; so do we.
    named = ", ".join(f"{name} => %({name})s" for name in arguments)
    (result,) = conn.execute(f"SELECT public.{function}({named})", arguments).fetchone()
    return result


def assert_result_shape(result, machine_id):
    assert set(result) == {"success", "machine", "machine_state", "updated_at"}
    assert result["success"] is True
    assert result["machine"]["id"] == str(machine_id)
    assert result["machine_state"]["machine_id"] == str(machine_id)
    assert result["machine_state"]["current_state"] == result["machine"]["status"]


def test_processing_then_error_then_complete(conn):
    machine_id, process = add_machine(conn), uuid.uuid4()
    result = call(
        conn, "atomic_processing_machine_state", p_machine_id=machine_id, p_process_id=process
    )
    assert_result_shape(result, machine_id)
    assert result["machine_state"]["process_id"] == str(process)

    result = call(
        conn, "atomic_error_machine_state", p_machine_id=machine_id, p_error_message="pump tripped"
    )
    assert_result_shape(result, machine_id)
    assert result["machine"]["failure_description"] == "Recipe execution error: pump tripped"
    assert result["machine_state"]["is_failure_mode"] is True
    assert result["machine"]["current_process_id"] is None

    result = call(conn, "atomic_complete_machine_state", p_machine_id=machine_id)
    assert_result_shape(result, machine_id)
    assert result["machine"]["status"] == "idle"
    assert result["machine_state"]["failure_description"] is None
    assert_consistent(conn)


def test_update_with_every_parameter(conn):
    machine_id, process = add_machine(conn), uuid.uuid4()
    result = call(
        conn,
        "atomic_update_machine_state",
        p_machine_id=machine_id,
        p_machine_status="Running",
        p_current_process_id=process,
        p_machine_state_current_state="processing",
        p_machine_state_process_id=process,
        p_is_failure_mode=False,
        p_failure_description=None,
    )
    assert_result_shape(result, machine_id)
    assert result["machine"]["status"] == "processing"
    assert json.loads(json.dumps(result))["updated_at"] == result["machine"]["updated_at"]
    assert_consistent(conn)


@pytest.mark.parametrize(
    ("function", "arguments"),
    [
        ("atomic_complete_machine_state", {}),
        ("atomic_error_machine_state", {"p_error_message": "x"}),
        ("atomic_processing_machine_state", {"p_process_id": uuid.uuid4()}),
        ("atomic_update_machine_state", {"p_machine_status": "idle"}),
    ],
)
def test_a_missing_machine_is_ms004_not_p0002(conn, function, arguments):
    """MS004: PostgREST answers 400 (P0002 would be a 500)."""
    missing = uuid.uuid4()
    with pytest.raises(psycopg.Error, match=f"machine {missing} does not exist") as caught:
        call(conn, function, p_machine_id=missing, **arguments)
    assert caught.value.sqlstate == "MS004"
    assert conn.execute("SELECT count(*) FROM machines").fetchone() == (0,)


def test_a_start_on_a_busy_machine_is_refused_naming_the_running_process(conn):
    machine_id = add_machine(conn)
    running = start(conn, machine_id)
    other = uuid.uuid4()
    with pytest.raises(psycopg.Error, match=f"running process {running}") as caught:
        call(conn, "atomic_processing_machine_state", p_machine_id=machine_id, p_process_id=other)
    assert caught.value.sqlstate == "MS002"
    assert str(other) in (caught.value.diag.message_detail or "")
    assert state(conn, machine_id)["process_id"] == running
    # The same process again is a no-op, not a refusal.
    result = call(
        conn, "atomic_processing_machine_state", p_machine_id=machine_id, p_process_id=running
    )
    assert result["machine"]["current_process_id"] == str(running)
    assert_consistent(conn)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"p_machine_status": "idle", "p_machine_state_current_state": "error"}, "disagree"),
        (
            {"p_current_process_id": uuid.uuid4(), "p_machine_state_process_id": uuid.uuid4()},
            "disagree",
        ),
        ({"p_machine_status": "idle", "p_is_failure_mode": True}, "contradicts"),
    ],
)
def test_contradictory_arguments_are_refused_and_change_nothing(conn, arguments, message):
    machine_id = add_machine(conn, status="maintenance")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        call(conn, "atomic_update_machine_state", p_machine_id=machine_id, **arguments)
    assert machine(conn, machine_id)["status"] == "maintenance"
    assert_consistent(conn)


def test_null_arguments_are_refused(conn):
    machine_id = add_machine(conn)
    with pytest.raises(psycopg.errors.NullValueNotAllowed, match="p_machine_id"):
        call(conn, "atomic_complete_machine_state", p_machine_id=None)
    with pytest.raises(psycopg.errors.NullValueNotAllowed, match="p_process_id"):
        call(conn, "atomic_processing_machine_state", p_machine_id=machine_id, p_process_id=None)


def test_error_with_no_message_still_records_the_error(conn):
    machine_id = add_machine(conn)
    start(conn, machine_id)
    result = call(conn, "atomic_error_machine_state", p_machine_id=machine_id, p_error_message=None)
    assert result["machine"]["status"] == "error"
    assert result["machine"]["failure_description"] == "Recipe execution error: (no message)"
    assert result["machine"]["current_process_id"] is None
    assert result["machine_state"]["process_id"] is None
    assert_consistent(conn)


def test_invalid_status_through_the_rpc(conn):
    machine_id = add_machine(conn)
    with pytest.raises(psycopg.errors.CheckViolation, match="allowed statuses"):
        call(
            conn,
            "atomic_update_machine_state",
            p_machine_id=machine_id,
            p_machine_status="exploded",
        )
