-- Every query the machine_sync package runs, each under a `-- name: <name>`
-- header followed by a one-line description. Python loads them by name
-- (machine_sync._queries); `%(name)s` placeholders are psycopg's bound
-- parameters, never formatted text. Nothing here sets session state (no SET,
-- no temporary objects), so every query works through PgBouncer in
-- transaction mode and as a prepared statement.


-- The state changes below are each one plain UPDATE of machines. The rules
-- (statuses, transitions, busy machines, processing <=> process id, which
-- run may end) are the database's own: the trigger on machines enforces them
-- for every writer and refuses with an SQLSTATE the client maps to a typed
-- error (errors.py). The trigger writes machine_state inside the same
-- statement, so the returned machines row is what both tables now hold
-- (machine_state mirrors it by contract: current_state = status,
-- state_since = status_since, ...). Complete, stop and fail of run P set
-- current_process_id = P with their status: the trigger ends the run when P
-- is the machine's current one and refuses with MS005 otherwise. An UPDATE
-- that returns no row found no machine it may write (or, for complete or
-- stop of whatever run is current, the machine was not processing); only
-- then does the client send `classify` to say which. The client adds each
-- one's RETURNING clause: the columns of machine_sync.client.Machine, listed
-- once (machine_sync._core.WRITTEN_COLUMNS).


-- name: start_process
-- Start run process_id; the database refuses a busy machine or a bad transition.
UPDATE public.machines AS m
SET
    status = 'processing',
    current_process_id = %(process_id)s::uuid
WHERE m.id = %(machine_id)s::uuid;


-- name: end_process
-- Complete or stop run process_id (the current run when it is NULL): the machine goes idle.
UPDATE public.machines AS m
SET
    status = 'idle',
    current_process_id = coalesce(%(process_id)s::uuid, m.current_process_id)
WHERE
    m.id = %(machine_id)s::uuid
    AND (%(process_id)s::uuid IS NOT NULL OR m.status = 'processing');


-- name: fail_process
-- Put the machine in error with a message, ending run process_id (or the current run, if any).
UPDATE public.machines AS m
SET
    status = 'error',
    current_process_id = coalesce(%(process_id)s::uuid, m.current_process_id),
    failure_description = %(failure_description)s::text,
    failure_component = %(failure_component)s::uuid
WHERE m.id = %(machine_id)s::uuid;


-- name: set_status
-- Set a status as given; the database normalizes it and checks the transition.
UPDATE public.machines AS m
SET status = %(status)s::text
WHERE m.id = %(machine_id)s::uuid;


-- name: classify
-- Why a state change wrote no row: the machine's status and run, if it
-- exists, and whether this role may update it (writable: the row can be
-- locked as an UPDATE would, which row-level security's UPDATE policies
-- decide; a row another transaction is writing now raises 55P03). An
-- operation that ends the current run of a machine not processing is
-- refused for that alone: its lock is not tried (NULL).
SELECT
    m.status,
    m.current_process_id,
    CASE
        WHEN %(ends_current)s::boolean AND m.status <> 'processing' THEN NULL
        ELSE EXISTS (
            SELECT FROM public.machines AS w
            WHERE w.id = m.id
            FOR NO KEY UPDATE NOWAIT
        )
    END AS writable
FROM public.machines AS m
WHERE m.id = %(machine_id)s::uuid;


-- name: get_machine
-- One machine and its machine_state row as stored.
SELECT
    m.id,
    m.serial_number,
    m.location,
    m.lab_name,
    m.status,
    m.current_process_id,
    m.failure_description,
    m.failure_component,
    m.status_since,
    m.updated_at,
    s.current_state,
    s.process_id,
    s.is_failure_mode,
    s.failure_description AS state_failure_description,
    s.failure_component AS state_failure_component,
    s.state_since,
    s.machine_id IS NOT NULL AS has_state
FROM public.machines AS m
LEFT JOIN public.machine_state AS s ON m.id = s.machine_id
WHERE m.id = %(machine_id)s::uuid;


-- name: list_machines
-- Every machine and its machine_state row as stored, by serial number.
SELECT
    m.id,
    m.serial_number,
    m.location,
    m.lab_name,
    m.status,
    m.current_process_id,
    m.failure_description,
    m.failure_component,
    m.status_since,
    m.updated_at,
    s.current_state,
    s.process_id,
    s.is_failure_mode,
    s.failure_description AS state_failure_description,
    s.failure_component AS state_failure_component,
    s.state_since,
    s.machine_id IS NOT NULL AS has_state
FROM public.machines AS m
LEFT JOIN public.machine_state AS s ON m.id = s.machine_id
ORDER BY m.serial_number, m.id;


-- name: drift
-- Every machine whose machine_state row is missing, orphaned or disagrees, with
-- both clocks, which the view compares but does not show.
SELECT
    d.machine_id,
    d.problem,
    d.status,
    d.current_state,
    d.current_process_id,
    d.process_id,
    d.is_failure_mode,
    d.failure_description,
    d.state_failure_description,
    d.failure_component,
    d.state_failure_component,
    m.status_since,
    s.state_since
FROM machine_sync.drift AS d
LEFT JOIN public.machines AS m ON d.machine_id = m.id
LEFT JOIN public.machine_state AS s ON d.machine_id = s.machine_id
ORDER BY d.machine_id;


-- name: reconcile
-- Repair all drift from machines; one row per drifted machine, repaired or why not.
SELECT
    r.machine_id,
    r.problem,
    r.repaired,
    r.reason
FROM machine_sync.reconcile_v1() AS r;


-- name: mode
-- The machine-sync mode: compat or strict.
SELECT machine_sync.mode_v1() AS mode;


-- name: set_mode
-- Switch the mode; the mode before (the statement's snapshot) and after.
SELECT
    machine_sync.mode_v1() AS previous_mode,
    machine_sync.set_mode_v1(%(mode)s::text) AS current_mode;


-- name: machines_owner
-- Who owns public.machines (no row before the baseline makes it), and who
-- is connected: the runner's history is the tables' owner's.
SELECT
    current_user AS applier,
    pg_catalog.pg_get_userbyid(c.relowner) AS tables_owner
FROM pg_catalog.pg_class AS c
WHERE c.oid = pg_catalog.to_regclass('public.machines');


-- name: runner_bootstrap
-- The migration runner's own bookkeeping, outside schema machine_sync.
CREATE SCHEMA IF NOT EXISTS machine_sync_migrations;

COMMENT ON SCHEMA machine_sync_migrations IS
'machine-sync migration runner: the files it applied.';

REVOKE ALL ON SCHEMA machine_sync_migrations FROM public;

CREATE TABLE IF NOT EXISTS machine_sync_migrations.applied (
    migration text PRIMARY KEY,
    sha256 text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    applied_by text NOT NULL DEFAULT current_user
);

COMMENT ON TABLE machine_sync_migrations.applied IS
'One row per migration file applied by the runner (sha256 of its text).';


-- name: history_exists
-- Whether the runner has ever run here.
SELECT to_regclass('machine_sync_migrations.applied') IS NOT NULL AS present;


-- name: machine_sync_present
-- Whether machine-sync is installed (a psql-migrated database). The tables
-- alone do not count: the legacy database has them before any migration.
SELECT to_regnamespace('machine_sync') IS NOT NULL AS present;


-- name: applied_migrations
-- The files the runner applied, oldest first.
SELECT
    a.migration,
    a.sha256,
    a.applied_at
FROM machine_sync_migrations.applied AS a
ORDER BY a.migration;


-- name: record_migration
-- Remember one applied file (re-applying it refreshes the row).
INSERT INTO machine_sync_migrations.applied AS a (migration, sha256)
VALUES (%(migration)s::text, %(sha256)s::text)
ON CONFLICT (migration) DO UPDATE
    SET
        sha256 = excluded.sha256,
        applied_at = now(),
        applied_by = current_user;


-- name: forget_migration
-- Forget one reverted file.
DELETE FROM machine_sync_migrations.applied AS a
WHERE a.migration = %(migration)s::text;


-- name: set_lock_timeout
-- lock_timeout for the rest of this transaction (a file may set its own).
SELECT set_config('lock_timeout', %(lock_timeout)s::text, TRUE);


-- name: try_migration_lock
-- Take the runner's session advisory lock if it is free.
-- The key is the bytes of 'msmigrat' read as a bigint.
SELECT pg_try_advisory_lock(7886767671930413428) AS acquired;


-- name: release_migration_lock
-- Give the runner's advisory lock back.
SELECT pg_advisory_unlock(7886767671930413428) AS released;


-- name: migration_lock_holder
-- Who holds the runner's advisory lock (bigint key = classid:objid).
SELECT
    a.pid,
    a.application_name,
    a.usename::text AS user_name,
    a.backend_start
FROM pg_catalog.pg_locks AS l
LEFT JOIN pg_catalog.pg_stat_activity AS a ON l.pid = a.pid
WHERE
    l.locktype = 'advisory'
    AND l.granted
    AND l.objsubid = 1
    AND l.classid::bigint = (7886767671930413428 >> 32)
    AND l.objid::bigint = (7886767671930413428 & 4294967295)
ORDER BY l.pid
LIMIT 1;


-- name: read_only
-- This transaction only looks (migrate status, migrate verify).
SELECT set_config('transaction_read_only', 'on', TRUE) AS read_only;


-- name: definitions_recorded
-- Whether a migration recorded what it installed (machine_sync_installed).
SELECT to_regprocedure('machine_sync_installed.problems_v1()') IS NOT NULL AS present;


-- name: recorded_migrations
-- The migrations whose definitions the catalog's record holds (written by
-- the migration itself, so by psql installs too).
SELECT DISTINCT d.migration
FROM machine_sync_installed.definition AS d;


-- name: definition_problems
-- Each function, trigger or view that is not as the migrations installed it.
-- Reads the catalog and the record only: ACCESS SHARE at most.
SELECT
    p.kind,
    p.object_name,
    p.problem
FROM machine_sync_installed.problems_v1() AS p;
