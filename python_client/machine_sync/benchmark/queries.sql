-- Every statement `machine-sync bench` runs, loaded by name.
--
-- Each query starts at a `-- name: <name>` line; the next comment line says
-- what it is for. Placeholders are PostgreSQL's own ($1, $2, ...), sent as
-- they are by psycopg's RawCursor; pgbench scripts are generated from the
-- same text, so both drivers run identical statements. The names public,
-- machine_sync and machine_sync_bench are relocated when the benchmark has
-- to run in scratch schemas instead of a scratch database.
--
-- A state change takes $1 = status, $2 = process id (or NULL),
-- $3 = machine id; the bulk forms take an array of machine ids as $3.

-- name: populate_machines
-- Machines 1..$1, all idle, with production-like required columns.
INSERT INTO public.machines (
    id, serial_number, location, lab_name, lab_institution, model,
    machine_type, install_date, last_maintenance_date, status, admin_id
)
SELECT
    machine_sync_bench.machine_uuid(g) AS id,
    'SN-' || g AS serial_number,
    'Bay ' || (g % 12) AS location,
    'Lab' AS lab_name,
    'Institute' AS lab_institution,
    'S200' AS model,
    'ALD' AS machine_type,
    '2024-01-01T00:00:00Z' AS install_date,
    '2026-01-01T00:00:00Z' AS last_maintenance_date,
    'idle' AS status,
    '00000000-0000-4000-8000-000000000000' AS admin_id
FROM generate_series(1, $1::integer) AS g;

-- name: copy_floor_machines
-- The floor table gets the very rows machines has.
INSERT INTO machine_sync_bench.floor_machines (
    id, serial_number, location, lab_name, lab_institution, model, machine_type,
    install_date, last_maintenance_date, status, current_operator_id, admin_id,
    is_active, current_process_id, created_at, updated_at, is_virtual,
    virtual_config, failure_description, failure_component
)
SELECT
    id,
    serial_number,
    location,
    lab_name,
    lab_institution,
    model,
    machine_type,
    install_date,
    last_maintenance_date,
    status,
    current_operator_id,
    admin_id,
    is_active,
    current_process_id,
    created_at,
    updated_at,
    is_virtual,
    virtual_config,
    failure_description,
    failure_component
FROM public.machines;

-- name: copy_legacy_machines
-- The legacy twin of machines gets the very rows machines has.
INSERT INTO machine_sync_bench.legacy_machines (
    id, serial_number, location, lab_name, lab_institution, model, machine_type,
    install_date, last_maintenance_date, status, current_operator_id, admin_id,
    is_active, current_process_id, created_at, updated_at, is_virtual,
    virtual_config, failure_description, failure_component
)
SELECT
    id,
    serial_number,
    location,
    lab_name,
    lab_institution,
    model,
    machine_type,
    install_date,
    last_maintenance_date,
    status,
    current_operator_id,
    admin_id,
    is_active,
    current_process_id,
    created_at,
    updated_at,
    is_virtual,
    virtual_config,
    failure_description,
    failure_component
FROM public.machines;

-- name: copy_legacy_machine_state
-- The legacy twin of machine_state gets the rows the mirror wrote.
INSERT INTO machine_sync_bench.legacy_machine_state (
    machine_id, current_state, state_since, process_id, is_failure_mode,
    failure_component, failure_description, updated_at
)
SELECT
    machine_id,
    current_state,
    state_since,
    process_id,
    is_failure_mode,
    failure_component,
    failure_description,
    updated_at
FROM public.machine_state;

-- name: copy_minimal_machines
-- The reference mirror's machines get the very rows the legacy twin has.
-- Both are LIKE public.machines, so they have the same columns in the same
-- order, and * is exactly that list.
INSERT INTO machine_sync_bench.minimal_machines
SELECT * FROM machine_sync_bench.legacy_machines;  -- noqa: AM04

-- name: copy_minimal_machine_state
-- The reference mirror's machine_state, likewise from the legacy twin (both
-- LIKE public.machine_state).
INSERT INTO machine_sync_bench.minimal_machine_state
SELECT * FROM machine_sync_bench.legacy_machine_state;  -- noqa: AM04

-- name: empty_tables
-- Start a data set from nothing (the guard allows TRUNCATE ... CASCADE).
TRUNCATE public.machines, machine_sync_bench.floor_machines,
machine_sync_bench.legacy_machines, machine_sync_bench.legacy_machine_state,
machine_sync_bench.minimal_machines, machine_sync_bench.minimal_machine_state
CASCADE;

-- name: idle_machines
-- Before each run, untimed: every machine idle with no run, so that a run's
-- first start of a machine is a start the rules allow (a machine left
-- processing by the previous run is busy: the database refuses another run).
UPDATE public.machines
SET status = 'idle'
WHERE status <> 'idle';

-- name: update_floor
-- Floor: the same single UPDATE on a table with no trigger.
UPDATE machine_sync_bench.floor_machines
SET status = $1, current_process_id = $2, updated_at = now()
WHERE id = $3;

-- name: update_machines
-- machine-sync: one UPDATE; the triggers normalize it and write machine_state.
UPDATE public.machines
SET status = $1, current_process_id = $2, updated_at = now()
WHERE id = $3;

-- name: update_minimal_machines
-- Reference: the same UPDATE on a twin whose trigger only copies into a second table.
UPDATE machine_sync_bench.minimal_machines
SET status = $1, current_process_id = $2, updated_at = now()
WHERE id = $3;

-- name: update_legacy_machines
-- Legacy write 1 of 2: machines.
UPDATE machine_sync_bench.legacy_machines
SET status = $1, current_process_id = $2, updated_at = now()
WHERE id = $3;

-- name: update_legacy_state
-- Legacy write 2 of 2: machine_state, as the recipe service writes it.
UPDATE machine_sync_bench.legacy_machine_state
SET
    current_state = $1,
    process_id = $2,
    state_since = now(),
    is_failure_mode = FALSE,
    failure_component = NULL,
    failure_description = NULL,
    updated_at = now()
WHERE machine_id = $3;

-- name: call_stored_procedure
-- The RPC approach: both legacy writes in one function call.
SELECT machine_sync_bench.set_machine_status($3, $1, $2);

-- name: bulk_update_floor
-- Floor, bulk: one UPDATE of many machines on the table with no trigger.
UPDATE machine_sync_bench.floor_machines
SET status = $1, current_process_id = $2, updated_at = now()
WHERE id = any($3);

-- name: bulk_update_minimal_machines
-- Reference, bulk: one UPDATE of many machines on the twin with the cheapest trigger mirror.
UPDATE machine_sync_bench.minimal_machines
SET status = $1, current_process_id = $2, updated_at = now()
WHERE id = any($3);

-- name: bulk_update_machines
-- machine-sync, bulk: one UPDATE of many machines.
UPDATE public.machines
SET status = $1, current_process_id = $2, updated_at = now()
WHERE id = any($3);

-- name: bulk_update_legacy_machines
-- Legacy, bulk: write 1 of 2.
UPDATE machine_sync_bench.legacy_machines
SET status = $1, current_process_id = $2, updated_at = now()
WHERE id = any($3);

-- name: bulk_update_legacy_state
-- Legacy, bulk: write 2 of 2.
UPDATE machine_sync_bench.legacy_machine_state
SET
    current_state = $1,
    process_id = $2,
    state_since = now(),
    is_failure_mode = FALSE,
    failure_component = NULL,
    failure_description = NULL,
    updated_at = now()
WHERE machine_id = any($3);

-- name: legacy_start_machines
-- Legacy recipe start, write 1 of 2 ($1 machine, $2 process): machines.
UPDATE machine_sync_bench.legacy_machines
SET status = 'processing', current_process_id = $2, updated_at = now()
WHERE id = $1;

-- name: legacy_start_state
-- Legacy recipe start, write 2 of 2: machine_state, failure cleared.
UPDATE machine_sync_bench.legacy_machine_state
SET
    current_state = 'processing',
    process_id = $2,
    state_since = now(),
    is_failure_mode = FALSE,
    failure_component = NULL,
    failure_description = NULL,
    updated_at = now()
WHERE machine_id = $1;

-- name: legacy_complete_machines
-- Legacy recipe completion, write 1 of 2 ($1 machine): machines.
UPDATE machine_sync_bench.legacy_machines
SET status = 'idle', current_process_id = NULL, updated_at = now()
WHERE id = $1;

-- name: legacy_complete_state
-- Legacy recipe completion, write 2 of 2: machine_state.
UPDATE machine_sync_bench.legacy_machine_state
SET current_state = 'idle', process_id = NULL, state_since = now(), updated_at = now()
WHERE machine_id = $1;

-- name: legacy_error_state
-- Legacy recipe error, write 1 of 2 ($1 machine): machine_state first.
UPDATE machine_sync_bench.legacy_machine_state
SET
    current_state = 'error',
    is_failure_mode = TRUE,
    failure_description = 'Recipe execution error: bench',
    state_since = now(),
    updated_at = now()
WHERE machine_id = $1;

-- name: legacy_error_machines
-- Legacy recipe error, write 2 of 2: machines, no process.
UPDATE machine_sync_bench.legacy_machines
SET status = 'error', current_process_id = NULL, updated_at = now()
WHERE id = $1;

-- name: legacy_stop_machines
-- Legacy recipe stop, write 1 of 2 ($1 machine): the process only.
UPDATE machine_sync_bench.legacy_machines
SET current_process_id = NULL, updated_at = now()
WHERE id = $1;

-- name: legacy_stop_state
-- Legacy recipe stop, write 2 of 2: machine_state idle.
UPDATE machine_sync_bench.legacy_machine_state
SET current_state = 'idle', process_id = NULL, state_since = now(), updated_at = now()
WHERE machine_id = $1;

-- name: sync_error
-- machine-sync recipe error ($1 machine): one UPDATE with the message (sent to
-- the real machines table, see on_real_tables in queries.py).
UPDATE machine_sync_bench.legacy_machines
SET
    status = 'error',
    failure_description = 'Recipe execution error: bench',
    current_process_id = NULL,
    updated_at = now()
WHERE id = $1;

-- name: legacy_read_machine
-- The legacy code paths' read before they write ($1 machine).
SELECT
    status,
    current_process_id
FROM machine_sync_bench.legacy_machines
WHERE id = $1;

-- name: idle_legacy_machines
-- Before each run of the checked legacy code paths, untimed: twins idle.
UPDATE machine_sync_bench.legacy_machines
SET
    status = 'idle',
    current_process_id = NULL,
    failure_description = NULL,
    failure_component = NULL
WHERE status <> 'idle' OR current_process_id IS NOT NULL;

-- name: idle_legacy_machine_state
-- The same for the legacy twin of machine_state.
UPDATE machine_sync_bench.legacy_machine_state
SET
    current_state = 'idle',
    process_id = NULL,
    is_failure_mode = FALSE,
    failure_description = NULL,
    failure_component = NULL
WHERE current_state <> 'idle' OR process_id IS NOT NULL;

-- name: sync_drift
-- Machines whose machine_state row disagrees, by machine-sync's own view.
SELECT count(*) FROM machine_sync.drift;

-- name: legacy_drift
-- Machines whose legacy twin rows disagree (or one of the two is missing);
-- also run on the minimal-trigger twins (queries.on_tables).
SELECT count(*)
FROM machine_sync_bench.legacy_machines AS m
FULL OUTER JOIN machine_sync_bench.legacy_machine_state AS s
    ON m.id = s.machine_id
WHERE
    m.id IS NULL
    OR s.machine_id IS NULL
    OR m.status IS DISTINCT FROM s.current_state
    OR m.current_process_id IS DISTINCT FROM s.process_id;

-- name: table_writes
-- Row updates so far per table ($1 = schema names), from the statistics.
SELECT
    n.nspname || '.' || c.relname AS table_name,
    pg_catalog.pg_stat_get_tuples_updated(c.oid) AS updated,
    pg_catalog.pg_stat_get_tuples_hot_updated(c.oid) AS hot_updated
FROM pg_catalog.pg_class AS c
INNER JOIN pg_catalog.pg_namespace AS n ON c.relnamespace = n.oid
WHERE c.relkind = 'r' AND n.nspname = any($1);

-- name: flush_statistics
-- Make this session's pending statistics visible now (PostgreSQL 15+).
SELECT pg_catalog.pg_stat_force_next_flush();

-- name: server_settings
-- What decides how honest the numbers are.
SELECT
    s.name,
    s.setting
FROM pg_catalog.pg_settings AS s
WHERE s.name IN (
    'fsync', 'synchronous_commit', 'full_page_writes', 'wal_level',
    'shared_buffers', 'server_version'
);

-- name: vacuum_tables
-- Same starting point for every table before a group of runs.
VACUUM (ANALYZE) public.machines, public.machine_state,
machine_sync_bench.floor_machines, machine_sync_bench.legacy_machines,
machine_sync_bench.legacy_machine_state, machine_sync_bench.minimal_machines,
machine_sync_bench.minimal_machine_state;

-- name: catalog_fingerprint
-- Objects in the schemas $1, with the transaction that last changed each:
-- relocated migrations must leave the user's own schemas exactly as they were.
SELECT
    'relation' AS kind,
    c.oid::regclass::text AS object_name,
    c.xmin::text AS changed_by
FROM pg_catalog.pg_class AS c
INNER JOIN pg_catalog.pg_namespace AS n ON c.relnamespace = n.oid
WHERE n.nspname = any($1)
UNION ALL
SELECT
    'function' AS kind,
    p.oid::regprocedure::text AS object_name,
    p.xmin::text AS changed_by
FROM pg_catalog.pg_proc AS p
INNER JOIN pg_catalog.pg_namespace AS n ON p.pronamespace = n.oid
WHERE n.nspname = any($1)
UNION ALL
SELECT
    'trigger' AS kind,
    t.tgrelid::regclass::text || ' ' || t.tgname AS object_name,
    t.xmin::text AS changed_by
FROM pg_catalog.pg_trigger AS t
INNER JOIN pg_catalog.pg_class AS c ON t.tgrelid = c.oid
INNER JOIN pg_catalog.pg_namespace AS n ON c.relnamespace = n.oid
WHERE n.nspname = any($1)
UNION ALL
SELECT
    'schema' AS kind,
    n.nspname::text AS object_name,
    n.xmin::text AS changed_by
FROM pg_catalog.pg_namespace AS n
WHERE n.nspname = any($1)
ORDER BY kind, object_name;

-- name: set_search_path
-- Unqualified names in a relocated migration land in the scratch schema.
SELECT pg_catalog.set_config('search_path', $1, TRUE);

-- name: database_name
-- The database the connection landed in.
SELECT pg_catalog.current_database();

-- name: mirror_roles_of_database
-- The mirror roles that own objects in database $1 (the migrations make one
-- per database; DROP DATABASE leaves roles, which are the cluster's).
SELECT DISTINCT r.rolname
FROM pg_catalog.pg_shdepend AS d
INNER JOIN pg_catalog.pg_database AS db ON d.dbid = db.oid
INNER JOIN pg_catalog.pg_roles AS r ON d.refobjid = r.oid
WHERE
    db.datname = $1
    AND d.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass
    AND d.deptype = 'o'
    AND r.rolname LIKE 'machine\_sync\_mirror\_%';

-- name: ping
-- The cheapest round trip, to measure what the proxy adds.
SELECT 1 AS one;
