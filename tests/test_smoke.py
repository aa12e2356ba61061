from machines import add_machine, assert_consistent, state


def test_insert_creates_state(conn):
    machine_id = add_machine(conn, status=" IDLE ")
    row = state(conn, machine_id)
    assert row is not None and row["current_state"] == "idle"
    assert_consistent(conn)
