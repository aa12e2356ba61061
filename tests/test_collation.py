"""The databases of the suite's second collation (--collation) really sort
another way than C, and nothing machine-sync says or accepts depends on it:
the status rules, the vocabulary's own check and the order of every list in
a message are those of C in every collation."""

from __future__ import annotations

import psycopg
import pytest

from machines import add_machine

# Sorted one way in C (by code point: '0' < '_') and the other way in ICU's
# en-US ('_' is punctuation, before digits) and glibc's en_US (it ignores
# '_' at first).
C_ORDER = ["cal0", "cal_"]


def test_the_database_has_the_collation_it_was_made_with(cluster, conn):
    provider, collate = conn.execute(
        # (daticulocale is datlocale from PostgreSQL 17 on.)
        "SELECT d.datlocprovider::text, coalesce(to_jsonb(d) ->> 'datlocale',"
        " to_jsonb(d) ->> 'daticulocale', d.datcollate)"
        " FROM pg_database AS d WHERE d.datname = current_database()"
    ).fetchone()
    sorted_like_c = conn.execute("SELECT %s::text < %s::text", C_ORDER).fetchone() == (True,)
    if cluster.locale:
        assert (provider, collate) in {("i", "en-US"), ("c", "en_US.UTF-8")}
        assert not sorted_like_c
    else:
        assert (provider, collate) == ("c", "C")
        assert sorted_like_c


def test_messages_list_values_in_code_point_order(conn):
    for status in C_ORDER:
        conn.execute("INSERT INTO machine_sync.allowed_status VALUES (%s, 'test')", [status])
        conn.execute("INSERT INTO machine_sync.allowed_transition VALUES ('idle', %s)", [status])
        conn.execute(
            "INSERT INTO machine_sync.status_alias VALUES (%s, %s)", [f"{status}x", status]
        )
    statuses = [r[0] for r in conn.execute("SELECT status FROM machine_sync.allowed_status")]
    aliases = conn.execute("SELECT alias, status FROM machine_sync.status_alias").fetchall()
    targets = [r[0] for r in conn.execute(
        "SELECT to_status FROM machine_sync.allowed_transition WHERE from_status = 'idle'"
    )]  # fmt: skip
    with pytest.raises(psycopg.errors.CheckViolation) as bad:
        add_machine(conn, status="melted")
    assert bad.value.diag.message_primary == (
        f"invalid machine status 'melted': allowed statuses are {', '.join(sorted(statuses))}"
    )
    assert bad.value.diag.message_detail == "accepted aliases: " + ", ".join(
        f"{alias} -> {status}" for alias, status in sorted(aliases)
    )
    machine_id = add_machine(conn, status="idle")
    conn.execute(
        "UPDATE machines SET status = 'processing', current_process_id = gen_random_uuid()"
        " WHERE id = %s",
        [machine_id],
    )
    with pytest.raises(psycopg.Error) as refused:
        conn.execute("UPDATE machines SET status = 'cal0' WHERE id = %s", [machine_id])
    assert refused.value.sqlstate == "MS003"
    assert refused.value.diag.message_detail == (
        f"allowed from processing: {', '.join(sorted(['offline', 'idle', 'maintenance', 'error']))}"
    )
    conn.execute("UPDATE machines SET status = 'offline' WHERE id = %s", [machine_id])
    conn.execute("UPDATE machines SET status = 'idle' WHERE id = %s", [machine_id])
    conn.execute("UPDATE machines SET status = 'CAL_X' WHERE id = %s", [machine_id])
    assert conn.execute("SELECT status FROM machines WHERE id = %s", [machine_id]).fetchone() == (
        "cal_",
    )
    assert sorted(targets) == sorted(targets, key=lambda t: t.encode())


# e with an acute accent, full-width "idle", a zero-width space, a dotted
# capital I (which some locales lower-case to i), a full-width capital I.
NOT_ASCII = ["caf\u00e9", "\uff49\uff44\uff4c\uff45", "idle\u200b", "\u0130dle", "\uff29"]


@pytest.mark.parametrize("status", NOT_ASCII)
def test_vocabulary_and_input_stay_ascii(conn, status):
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO machine_sync.allowed_status VALUES (%s, 'x')", [status])
    with pytest.raises(psycopg.errors.CheckViolation):
        add_machine(conn, status=status)
