"""Attacks on the triggers by the API roles, each a regression test.

pg_temp shadowing: an API role creates temporary types and tables named like
the ones our functions use, hoping one of our functions (the mirror runs as
the database's mirror role) resolves a name to them and runs the attacker's code
with its privileges. Forged markers: settings, foreign-key actions and
application triggers must not pass for the mirror's own writes.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

from postgrest import ASSIGNED, LEGACY_MACHINE, patch, request, rpc, upsert

from machines import assert_consistent, machine

IDLE = LEGACY_MACHINE.format(1)
SPARE = LEGACY_MACHINE.format(2)

# Every type name our functions use, in every spelling a lookup could take.
SHADOWED_TYPES = [
    "text",
    "uuid",
    "timestamptz",
    "boolean",
    "bool",
    "json",
    "jsonb",
    "name",
    "regclass",
    "regprocedure",
    "interval",
    "integer",
    "int4",
    "bigint",
    "int8",
    "double precision",
    "float8",
    "numeric",
    "varchar",
    "character varying",
    "oid",
    "record",
    "trigger",
]
SHADOWED_TABLES = [
    "machines",
    "machine_state",
    "allowed_status",
    "status_alias",
    "settings",
    "allowed_transition",
    "drift",
]
# The SQL spellings of built-in types (their catalog names differ).
BASES = {
    "record": None,
    "trigger": None,
    "boolean": "pg_catalog.bool",
    "integer": "pg_catalog.int4",
    "bigint": "pg_catalog.int8",
    "double precision": "pg_catalog.float8",
    "character varying": "pg_catalog.varchar",
}


def arm(conn: psycopg.Connection) -> list[str]:
    """Plant the hostile objects in this session's pg_temp; return the types planted.

    The recorder cannot be found implicitly (functions in pg_temp never are),
    so the domains' CHECKs and the tables' policies and triggers name it
    qualified. It raises a WARNING naming current_user and its call stack
    (delivered even when the statement is rolled back or an exception
    handler swallows an error), counts itself in a sequence (not
    transactional either) and lets the statement go on, so that the write
    reaches our functions.
    """
    conn.execute("CREATE TEMP SEQUENCE hostile_runs")
    conn.execute("GRANT ALL ON SEQUENCE pg_temp.hostile_runs TO PUBLIC")
    conn.execute(
        """CREATE FUNCTION pg_temp.hostile() RETURNS pg_catalog.bool
           LANGUAGE plpgsql AS $$
           DECLARE
               stack pg_catalog.text;
           BEGIN
               GET DIAGNOSTICS stack = PG_CONTEXT;
               RAISE WARNING 'HOSTILE CODE RAN AS % VIA %', current_user,
                   pg_catalog.replace(stack, E'\n', ' | ');
               PERFORM pg_catalog.nextval('pg_temp.hostile_runs');
               RETURN true;
           END $$"""
    )
    conn.execute(
        """CREATE FUNCTION pg_temp.hostile_trigger() RETURNS trigger
           LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_temp.hostile(); RETURN NULL; END $$"""
    )
    conn.execute("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pg_temp TO PUBLIC")
    planted = []
    for name in SHADOWED_TYPES:
        base = BASES.get(name, f'pg_catalog."{name}"')
        if base is None:
            continue  # pseudo-types: no domain over them; the names are tried below
        conn.execute(f'CREATE DOMAIN pg_temp."{name}" AS {base} CHECK (pg_temp.hostile())')
        planted.append(name)
    for name in ("record", "trigger"):
        # A composite type may take a pseudo-type's name.
        conn.execute(f'CREATE TYPE pg_temp."{name}" AS (x pg_catalog.int4)')
        planted.append(name)
    for name in SHADOWED_TABLES:
        conn.execute(
            f'CREATE TEMP TABLE "{name}" (machine_id pg_catalog.uuid, id pg_catalog.uuid,'
            " status pg_catalog.text, mode pg_catalog.text, singleton pg_catalog.bool,"
            " from_status pg_catalog.text, to_status pg_catalog.text, alias pg_catalog.text)"
        )
        # Poisoned contents: strict mode, no statuses, any transition.
        conn.execute(
            f'INSERT INTO pg_temp."{name}" VALUES'
            " (NULL, NULL, 'idle', 'strict', true, 'idle', 'bogus', 'idle')"
        )
        conn.execute(f'ALTER TABLE pg_temp."{name}" ENABLE ROW LEVEL SECURITY')
        conn.execute(f'ALTER TABLE pg_temp."{name}" FORCE ROW LEVEL SECURITY')
        conn.execute(
            f'CREATE POLICY hostile ON pg_temp."{name}" USING (pg_temp.hostile())'
            " WITH CHECK (pg_temp.hostile())"
        )
        conn.execute(
            f'CREATE TRIGGER hostile BEFORE INSERT OR UPDATE OR DELETE ON pg_temp."{name}"'
            " FOR EACH ROW EXECUTE FUNCTION pg_temp.hostile_trigger()"
        )
        conn.execute(f'GRANT ALL ON pg_temp."{name}" TO PUBLIC')
    conn.commit()
    # The planted objects really are hostile: a lookup that reaches them runs the recorder.
    conn.execute("SELECT '00000000-0000-0000-0000-000000000000'::uuid, 'x'::text")
    assert hostile_runs(conn) == 2
    # Reads of the tables run it too, except for a role that bypasses RLS
    # (service_role): for it the tables' poisoned rows are the tell.
    conn.execute("SELECT * FROM machine_state")
    conn.execute("SELECT pg_catalog.setval('pg_temp.hostile_runs', 1, false)")
    conn.commit()
    return planted


def hostile_runs(conn: psycopg.Connection) -> int:
    (value,) = conn.execute(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pg_temp.hostile_runs"
    ).fetchone()
    return value


def write_paths(role: str):
    """Every write path, as (name, statement runner) pairs, for one API role."""
    sub = ASSIGNED if role == "authenticated" else None
    process = uuid.uuid4()

    def machines_update(tx):
        patch(tx, "machines", IDLE, {"status": "maintenance"})
        patch(tx, "machines", IDLE, {"status": "idle"})

    def machines_start_and_stop(tx):
        patch(tx, "machines", IDLE, {"status": "processing", "current_process_id": str(process)})
        patch(tx, "machines", IDLE, {"current_process_id": None})

    def machines_insert(tx):
        tx.execute(
            """INSERT INTO public.machines (serial_number, location, lab_name,
                   lab_institution, model, machine_type, install_date,
                   last_maintenance_date, admin_id, status)
               VALUES ('SN-X', 'Bay', 'Lab', 'Inst', 'M', 'ALD', now(), now(), %s, ' IDLE ')""",
            [ASSIGNED],
        )

    def legacy_update(tx):
        patch(tx, "machine_state", IDLE, {"current_state": "MAINTENANCE"})

    def legacy_upsert(tx):
        upsert(tx, "machine_state", {"machine_id": IDLE, "current_state": "offline"})

    def legacy_insert(tx):
        with pytest.raises(psycopg.errors.UniqueViolation):
            tx.execute(
                "INSERT INTO public.machine_state (machine_id, current_state) VALUES (%s, 'idle')",
                [uuid.UUID(IDLE)],
            )

    def rpcs(tx):
        rpc(
            tx,
            "atomic_processing_machine_state",
            p_machine_id=uuid.UUID(SPARE),
            p_process_id=process,
        )
        rpc(tx, "atomic_error_machine_state", p_machine_id=uuid.UUID(SPARE), p_error_message="x")
        rpc(tx, "atomic_complete_machine_state", p_machine_id=uuid.UUID(SPARE))
        rpc(
            tx,
            "atomic_update_machine_state",
            p_machine_id=uuid.UUID(SPARE),
            p_machine_status="Maintenance",
        )

    def set_mode(tx):
        tx.execute("SELECT machine_sync.set_mode_v1('compat')")

    def reconcile(tx):
        tx.execute("SELECT * FROM machine_sync.reconcile_v1()").fetchall()
        tx.execute("SELECT * FROM machine_sync.drift").fetchall()

    paths = [
        ("machines update", machines_update),
        ("machines start and stop", machines_start_and_stop),
        ("machines insert", machines_insert),
        ("legacy machine_state update", legacy_update),
        ("legacy machine_state upsert", legacy_upsert),
        ("legacy machine_state insert", legacy_insert),
        ("legacy RPCs", rpcs),
    ]
    if role == "service_role":
        paths += [("set_mode", set_mode), ("reconcile and drift", reconcile)]
    return sub, paths


# PostgREST's own search_path leaves pg_temp implicit, so it is searched first
# for the attacker's own top-level names: Supabase's auth.uid() (a SQL
# function without a search_path, inlined into the RLS policies) then casts
# with the attacker's types, as the attacker, in the attacker's statement.
# That gains nothing; what must never happen is hostile code running inside
# our functions or as any other role. With pg_temp listed last nothing at
# all resolves to the attacker's objects, so there it must never run.
@pytest.mark.parametrize("search_path", ["postgrest", "pg_temp last"])
@pytest.mark.parametrize("role", ["authenticated", "service_role"])
def test_pg_temp_types_and_tables_never_run_hostile_code_in_any_write_path(
    legacy_db, role, search_path
):
    legacy_db.migrate()
    with legacy_db.connect() as owner:
        # Random process ids (production's foreign key would want real runs).
        owner.execute("ALTER TABLE machines DROP CONSTRAINT machines_current_process_id_fkey")
        # Let authenticated insert its own machines.
        owner.execute(
            "CREATE POLICY own_insert ON machines FOR INSERT TO authenticated"
            " WITH CHECK (admin_id = auth.uid())"
        )
    with legacy_db.connect(admin=True) as admin:
        # Some drift for reconcile to repair.
        admin.execute("SET session_replication_role = replica")
        admin.execute(
            "UPDATE machine_state SET current_state = 'IDLE' WHERE machine_id = %s",
            [uuid.UUID(LEGACY_MACHINE.format(3))],
        )
    sub, paths = write_paths(role)
    warnings: list[str] = []
    with legacy_db.connect(autocommit=False) as api:
        api.add_notice_handler(lambda notice: warnings.append(notice.message_primary or ""))
        api.execute("SELECT set_config('role', %s, false)", [role])
        api.commit()
        planted = arm(api)
        assert len(planted) == len(SHADOWED_TYPES)
        warnings.clear()  # the probes' own
        failures = {}
        for name, run in paths:
            try:
                with request(api, role=role, sub=sub) as tx:
                    if search_path == "pg_temp last":
                        tx.execute(
                            "SELECT set_config('search_path', 'public, extensions, pg_temp', true)"
                        )
                    run(tx)
            except psycopg.Error as error:
                failures[name] = f"{error.sqlstate}: {error}"
        api.execute("RESET ROLE")
        api.commit()
        runs = hostile_runs(api)
        api.commit()
    assert failures == {}, failures
    hostile = [w for w in warnings if "HOSTILE" in w]
    assert len(hostile) == runs
    for warning in hostile:
        assert warning.startswith(f"HOSTILE CODE RAN AS {role} VIA"), warning
        assert "machine_sync." not in warning, warning
        assert "atomic_" not in warning, warning
    if search_path == "pg_temp last" or role == "service_role":
        assert hostile == []  # service_role bypasses RLS: no auth.uid() either
    with legacy_db.connect() as owner:
        assert machine(owner, uuid.UUID(IDLE))["status"] == "offline"
        assert machine(owner, uuid.UUID(SPARE))["status"] == "maintenance"
        assert owner.execute("SELECT machine_sync.mode_v1()").fetchone() == ("compat",)
        assert owner.execute(
            "SELECT count(*) FROM machines WHERE serial_number = 'SN-X' AND status = 'idle'"
        ).fetchone() == (1,)
        if role == "authenticated":
            owner.execute("SELECT * FROM machine_sync.reconcile_v1()")
        assert_consistent(owner)


# Every statement a role granted the tables before migrating could use to run
# code as the mirror (a trigger on machine_state fires as the role that
# writes it: for the mirror's writes, the mirror) or as the owner (a trigger
# on machines, when reconcile_v1() repairs it), or to delete state rows.
OWNER_ONLY_STATEMENTS = [
    "CREATE TRIGGER a_forge AFTER UPDATE ON public.machine_state"
    " FOR EACH ROW EXECUTE FUNCTION pg_temp.forge()",
    "CREATE TRIGGER a_forge AFTER UPDATE ON public.machines"
    " FOR EACH ROW EXECUTE FUNCTION pg_temp.forge()",
    "DELETE FROM public.machine_state WHERE false",
    "TRUNCATE public.machines, public.machine_state",
]


@pytest.mark.parametrize(
    "statement",
    OWNER_ONLY_STATEMENTS,
    ids=["trigger_on_state", "trigger_on_machines", "delete_state", "truncate"],
)
def test_a_role_granted_the_tables_before_migrating_keeps_no_owner_only_privilege(
    legacy_db, statement
):
    """The migration takes TRIGGER, TRUNCATE, REFERENCES (MAINTAIN) on both
    tables and DELETE on machine_state from every role but the owner, not
    from the API roles alone: a reporting role given ALL on them could attach
    a trigger to machine_state that, firing for the mirror's write, updates
    machine_state as the mirror, past the guard, in strict mode too."""
    role = f"t_reporting_{uuid.uuid4().hex[:8]}"
    with legacy_db.connect() as conn:
        conn.execute(f'CREATE ROLE "{role}"')
        conn.execute(f'GRANT ALL ON machines, machine_state TO "{role}"')
        conn.execute(f'GRANT REFERENCES (id) ON machines TO "{role}"')
    try:
        legacy_db.migrate()
        with legacy_db.connect(admin=True) as attacker:
            attacker.execute(f'SET ROLE "{role}"')
            attacker.execute(
                """CREATE FUNCTION pg_temp.forge() RETURNS trigger LANGUAGE plpgsql AS $$
                   BEGIN
                       UPDATE public.machine_state SET current_state = 'maintenance'
                       WHERE machine_id = NEW.machine_id AND current_state <> 'maintenance';
                       RETURN NULL;
                   END $$"""
            )
            attacker.execute("GRANT EXECUTE ON FUNCTION pg_temp.forge() TO PUBLIC")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                attacker.execute(statement)
            assert not attacker.execute(
                "SELECT has_table_privilege('public.machines', 'REFERENCES')"
                " OR has_column_privilege('public.machines', 'id', 'REFERENCES')"
                " OR has_table_privilege('public.machine_state', 'REFERENCES')"
            ).fetchone()[0]
        with legacy_db.connect() as owner:
            owner.execute("UPDATE machines SET status = 'maintenance' WHERE id = %s", [IDLE])
            assert_consistent(owner)
    finally:
        with legacy_db.connect(admin=True) as admin:
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')


MACHINE_SYNC_GRANTS = r"""
    SELECT o.kind, o.name, a.privilege_type
    FROM (
        SELECT 'schema' AS kind, n.nspname::text AS name, n.nspacl AS acl
        FROM pg_namespace AS n WHERE n.nspname LIKE 'machine\_sync%%'
        UNION ALL
        SELECT 'relation', c.oid::regclass::text, c.relacl
        FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname LIKE 'machine\_sync%%'
        UNION ALL
        SELECT 'function', p.oid::regprocedure::text, p.proacl
        FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname LIKE 'machine\_sync%%'
    ) AS o
    CROSS JOIN LATERAL aclexplode(o.acl) AS a
    WHERE a.grantee = %s::regrole
    ORDER BY 1, 2, 3
"""


def test_the_owners_default_privileges_give_no_role_anything_of_machine_syncs(legacy_db):
    """Default privileges the owner has for every schema (ALTER DEFAULT
    PRIVILEGES without IN SCHEMA) applied to what the migration makes: a role
    they name could run stored_machine() (every machine, past row-level
    security), the mirror's trigger function, write the transitions, create
    objects in machine-sync's schemas, or rewrite the record of grants that
    the down migration replays as the owner."""
    role = f"t_defaults_{uuid.uuid4().hex[:8]}"
    defaults = [
        f'ALL ON TABLES TO "{role}"',
        f'ALL ON FUNCTIONS TO "{role}"',
        f'ALL ON SCHEMAS TO "{role}"',
    ]
    with legacy_db.connect() as conn:
        conn.execute(f'CREATE ROLE "{role}"')
        for default in defaults:
            conn.execute(f"ALTER DEFAULT PRIVILEGES GRANT {default}")
    try:
        legacy_db.migrate()
        with legacy_db.connect() as conn:
            assert conn.execute(MACHINE_SYNC_GRANTS, [role]).fetchall() == []
        with legacy_db.connect(admin=True) as attacker:
            attacker.execute(f'SET ROLE "{role}"')
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                attacker.execute("SELECT * FROM machine_sync.stored_machine(%s)", [IDLE])
    finally:
        with legacy_db.connect() as conn:
            for default in defaults:
                conn.execute(f"ALTER DEFAULT PRIVILEGES REVOKE {default.replace(' TO ', ' FROM ')}")
        with legacy_db.connect(admin=True) as admin:
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')
