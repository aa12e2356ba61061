-- Every statement the workload and the demo send, each under a
-- `-- name: <name>` header followed by a one-line description. Python loads
-- them by name (machine_sync._queries); `%(name)s` placeholders are psycopg's
-- bound parameters, never formatted text.


-- The legacy call sites, exactly as production runs them. The client's
-- clock goes into updated_at/state_since, as production's code does.

-- name: legacy_read_status
-- Legacy start, step one: read the status to check it in Python.
SELECT status FROM public.machines
WHERE id = %(machine)s;


-- name: legacy_start_machines
-- Legacy start, first write: machines.
UPDATE public.machines
SET status = 'processing', current_process_id = %(process)s, updated_at = %(now)s
WHERE id = %(machine)s;


-- name: legacy_start_state
-- Legacy start, second write: machine_state.
UPDATE public.machine_state
SET
    current_state = 'processing',
    process_id = %(process)s,
    state_since = %(now)s,
    is_failure_mode = FALSE,
    failure_component = NULL,
    failure_description = NULL
WHERE machine_id = %(machine)s;


-- name: legacy_complete_machines
-- Legacy completion (and reset), first write: machines idle.
UPDATE public.machines SET status = 'idle', current_process_id = NULL
WHERE id = %(machine)s;


-- name: legacy_complete_state
-- Legacy completion (and reset), second write: machine_state idle.
UPDATE public.machine_state
SET current_state = 'idle', process_id = NULL, state_since = %(now)s, is_failure_mode = FALSE
WHERE machine_id = %(machine)s;


-- name: legacy_error_state
-- Legacy error, first write: machine_state (production writes it first).
UPDATE public.machine_state
SET current_state = 'error', is_failure_mode = TRUE, failure_description = %(description)s
WHERE machine_id = %(machine)s;


-- name: legacy_error_machines
-- Legacy error, second write: machines.
UPDATE public.machines SET status = 'error', current_process_id = NULL
WHERE id = %(machine)s;


-- name: legacy_stop_machines
-- Legacy stop, first write: machines loses its process, its status stays.
UPDATE public.machines SET current_process_id = NULL
WHERE id = %(machine)s;


-- name: legacy_stop_state
-- Legacy stop, second write: machine_state idle.
UPDATE public.machine_state
SET current_state = 'idle', process_id = NULL, is_failure_mode = FALSE
WHERE machine_id = %(machine)s;


-- Setup: machines for the workload, each starting with an agreeing state row.

-- name: create_machines
-- Insert count idle machines named prefix and a number; their ids.
INSERT INTO public.machines (
    serial_number, location, lab_name, lab_institution, model, machine_type,
    install_date, last_maintenance_date, status, admin_id
)
SELECT
    %(prefix)s || lpad(n::text, 4, '0') AS serial_number,
    'Bay ' || (1 + mod(n, 3)) AS location,
    'Thin Films Lab' AS lab_name,
    'Example Institute' AS lab_institution,
    'Savannah S200' AS model,
    'ALD' AS machine_type,
    timestamptz '2024-01-01 00:00+00' AS install_date,
    timestamptz '2026-06-01 00:00+00' AS last_maintenance_date,
    'idle' AS status,
    '00000000-0000-4000-b000-000000000001' AS admin_id
FROM generate_series(1, %(count)s) AS n
RETURNING id;


-- name: create_missing_state_rows
-- A state row for each of ids that has none (on a migrated database the
-- mirror already made them: this inserts none).
INSERT INTO public.machine_state (machine_id, current_state)
SELECT
    m.id AS machine_id,
    m.status AS current_state
FROM public.machines AS m
WHERE
    m.id = any(%(ids)s)
    AND NOT EXISTS (
        SELECT FROM public.machine_state AS s
        WHERE s.machine_id = m.id
    );


-- name: has_process_table
-- Whether process_executions exists (production's schema).
SELECT to_regclass('public.process_executions') IS NOT NULL;


-- name: create_processes
-- Insert count process_executions rows; their ids.
INSERT INTO public.process_executions (recipe_name)
SELECT 'machine-sync workload' FROM generate_series(1, %(count)s)
RETURNING id;


-- name: set_statement_timeout
-- Set this session's statement_timeout.
SELECT set_config('statement_timeout', %(value)s, FALSE);


-- name: set_lock_timeout
-- Set this session's lock_timeout.
SELECT set_config('lock_timeout', %(value)s, FALSE);


-- name: schema_is_migrated
-- Whether machine-sync's drift view exists.
SELECT to_regclass('machine_sync.drift') IS NOT NULL;


-- Fault injection: hold the row the second write needs, then kill its writer.

-- name: lock_state_row
-- Lock the machine_state row of machine.
SELECT FROM public.machine_state
WHERE machine_id = %(machine)s FOR UPDATE;


-- name: lock_machine_row
-- Lock the machines row of machine.
SELECT FROM public.machines
WHERE id = %(machine)s FOR UPDATE;


-- name: is_blocking
-- Whether this session blocks the backend victim.
SELECT pg_backend_pid() = any(pg_blocking_pids(%(victim)s));


-- name: terminate
-- Terminate the backend victim.
SELECT pg_terminate_backend(%(victim)s);


-- name: legacy_drift
-- Drift on a legacy database, where machine_sync.drift does not exist yet:
-- the same problems in the same precedence as the view, over the three pairs
-- a legacy machines row can express (status, process, failure mode). All
-- machines when ids is NULL.
SELECT
    m.id AS machine_id,
    CASE
        WHEN s.machine_id IS NULL THEN 'missing_state'
        WHEN m.status <> s.current_state AND lower(m.status) = lower(s.current_state)
            THEN 'status_case'
        ELSE 'value_mismatch'
    END AS problem
FROM public.machines AS m
LEFT JOIN public.machine_state AS s ON m.id = s.machine_id
WHERE
    (%(ids)s::uuid[] IS NULL OR m.id = any(%(ids)s))
    AND (
        s.machine_id IS NULL
        OR (m.status, m.current_process_id, m.status = 'error')
        IS DISTINCT FROM (s.current_state::text, s.process_id, s.is_failure_mode)
    );


-- name: migrated_drift
-- Drift on a migrated database: machine_sync.drift (all machines when ids is NULL).
SELECT
    machine_id,
    problem
FROM machine_sync.drift
WHERE %(ids)s::uuid[] IS NULL OR machine_id = any(%(ids)s);


-- The audit of production's tables: how many machines, how many state rows, and
-- which statuses each table holds.

-- name: audit_counts
-- How many machines and how many state rows.
SELECT
    (SELECT count(*) FROM public.machines) AS machines,
    (SELECT count(*) FROM public.machine_state) AS state_rows;


-- name: audit_statuses
-- Which statuses each table holds, and how often.
SELECT
    'machines.status' AS origin,
    status AS spelling,
    count(*) AS n
FROM public.machines
GROUP BY status
UNION ALL
SELECT
    'machine_state.current_state' AS origin,
    current_state::text AS spelling,
    count(*) AS n
FROM public.machine_state
GROUP BY current_state
ORDER BY origin DESC, spelling ASC;


-- name: legacy_rpcs_present
-- How many of the functions names exist in schema public.
SELECT count(*) FROM pg_catalog.pg_proc AS p
INNER JOIN pg_catalog.pg_namespace AS n ON p.pronamespace = n.oid
WHERE n.nspname = 'public' AND p.proname = any(%(names)s);


-- name: agreeing_machines
-- How many of ids have a state row and no drift.
SELECT count(*)
FROM public.machines AS m
INNER JOIN public.machine_state AS s ON m.id = s.machine_id
WHERE
    m.id = any(%(ids)s)
    AND NOT EXISTS (
        SELECT FROM machine_sync.drift AS d
        WHERE d.machine_id = m.id
    );


-- name: list_machine_ids
-- Every machine's id.
SELECT id FROM public.machines
ORDER BY id;


-- The legacy RPCs, called the way PostgREST calls them: named arguments.

-- name: rpc_processing
-- atomic_processing_machine_state: start process on machine.
SELECT public.atomic_processing_machine_state(
    p_machine_id => %(machine)s, p_process_id => %(process)s
);


-- name: rpc_complete
-- atomic_complete_machine_state: machine back to idle.
SELECT public.atomic_complete_machine_state(p_machine_id => %(machine)s);


-- name: rpc_error
-- atomic_error_machine_state: machine fails with message.
SELECT public.atomic_error_machine_state(
    p_machine_id => %(machine)s, p_error_message => %(message)s
);


-- name: rpc_update
-- atomic_update_machine_state: both tables of machine to status.
SELECT public.atomic_update_machine_state(
    p_machine_id => %(machine)s, p_machine_status => %(status)s,
    p_machine_state_current_state => %(status)s
);


-- name: state_row
-- The machine_state row of machine, as the RPC checks read it.
SELECT
    current_state,
    process_id,
    is_failure_mode,
    failure_description
FROM public.machine_state
WHERE machine_id = %(machine)s;


-- name: server_version
-- The server's major version.
SELECT current_setting('server_version_num')::int / 10000;
