-- Every query the machine_sync package runs, each under a `-- name: <name>`
-- header followed by a one-line description. Python loads them by name
-- (machine_sync._queries); `:name` placeholders are bound parameters, never
-- formatted text. Nothing here sets session state (no SET, no temporary
-- objects), so every query works through PgBouncer in transaction mode and
-- as a prepared statement.


-- name: transition
-- One guarded state change of one machine (start, complete, fail, stop, set).
--
-- The whole operation is this one statement: it locks the machine's row,
-- decides from the row it locked whether the transition is allowed, writes
-- machines (the mirror trigger writes machine_state in the same statement)
-- and returns what was written together with the mirrored machine_state
-- values. Exactly one row comes back, with `outcome`:
--   unknown  -- no such machine (or row-level security hides it)
--   refused  -- the rules below say no; previous_* is the current row
--   stale    -- see `moved` below; nothing was written, run it again
--   write    -- written; `written` is false only if a policy or another
--               trigger silently skipped the row
--
-- Races: `target` locks the row before anything is decided. A writer that
-- got there first makes this statement wait; when it commits, the lock
-- returns its committed row (READ COMMITTED re-reads a row it had to wait
-- for), so the loser of two simultaneous starts sees the winner's process.
--
-- Mirrored values are not read back from machine_state: its row is written
-- by an AFTER trigger that fires when this statement ends, so nothing in the
-- statement could see it. By contract (sql/40_mirror.sql) the mirror equals
-- the machines row, so current_state, process_id, is_failure_mode and the
-- failure fields are taken from the row written here. state_since follows
-- the mirror's own rule: kept when the state row already had this status,
-- else now() (the trigger runs in this transaction: the same now()).
-- `prior` reads the state row from this statement's snapshot. That is the
-- row the trigger will see unless another writer committed after the
-- snapshot was taken (`moved`: the row we locked is not the row we saw).
-- Then the prior state row was rewritten by that writer's mirror from the
-- locked row, so its status is `previous_status`: a write that changes the
-- status gets now(); one that keeps it cannot know when the status began
-- and answers `stale` instead, writing nothing, and the client runs it again
-- with a fresh snapshot.
WITH request AS MATERIALIZED (
    -- normalize_status raises 23514 for an unknown status, before any lock.
    SELECT
        :operation::text AS op,
        machine_sync.normalize_status(:status::text) AS status,
        :process_id::uuid AS process_id,
        :failure_description::text AS failure_description,
        :failure_component::uuid AS failure_component
),

target AS MATERIALIZED (
    SELECT
        m.id,
        m.status,
        m.current_process_id,
        m.xmin::text AS row_version
    FROM public.machines AS m
    WHERE m.id = :machine_id::uuid
    FOR NO KEY UPDATE OF m
),

seen AS (
    SELECT m.xmin::text AS row_version
    FROM public.machines AS m
    WHERE m.id = :machine_id::uuid
),

decision AS MATERIALIZED (
    SELECT
        t.id,
        t.status AS previous_status,
        t.current_process_id AS previous_process_id,
        r.status,
        r.failure_description,
        r.failure_component,
        (t.row_version IS DISTINCT FROM s.row_version) AS moved,
        CASE r.op WHEN 'start' THEN r.process_id END AS new_process_id,
        -- The transition rules (MIGRATING.md has them as a table).
        CASE
            WHEN
                r.op = 'start'
                AND t.status IN ('idle', 'offline')
                THEN 'allowed'
            WHEN
                r.op IN ('complete', 'stop')
                AND t.status = 'processing'
                AND (r.process_id IS NULL OR t.current_process_id = r.process_id)
                THEN 'allowed'
            WHEN
                r.op = 'fail'
                AND (r.process_id IS NULL OR t.current_process_id = r.process_id)
                THEN 'allowed'
            WHEN
                r.op = 'set'
                AND r.status NOT IN ('processing', 'error')
                THEN 'allowed'
            ELSE 'refused'
        END AS verdict
    FROM target AS t
    CROSS JOIN request AS r
    LEFT JOIN seen AS s ON TRUE
),

outcome AS MATERIALIZED (
    SELECT
        d.*,
        CASE
            WHEN d.verdict = 'refused' THEN 'refused'
            WHEN d.moved AND d.status = d.previous_status THEN 'stale'
            ELSE 'write'
        END AS outcome
    FROM decision AS d
),

written AS (
    UPDATE public.machines AS m
    SET
        status = o.status,
        current_process_id = o.new_process_id,
        failure_description = o.failure_description,
        failure_component = o.failure_component
    FROM outcome AS o
    WHERE m.id = o.id AND o.outcome = 'write'
    RETURNING
        m.id,
        m.serial_number,
        m.location,
        m.lab_name,
        m.status,
        m.current_process_id,
        m.failure_description,
        m.failure_component,
        m.updated_at
),

prior AS (
    SELECT
        s.current_state,
        s.state_since
    FROM public.machine_state AS s
    WHERE s.machine_id = :machine_id::uuid
)

SELECT
    w.id,
    w.serial_number,
    w.location,
    w.lab_name,
    w.status,
    w.current_process_id,
    w.failure_description,
    w.failure_component,
    w.updated_at,
    w.status AS current_state,
    w.current_process_id AS process_id,
    w.failure_description AS state_failure_description,
    w.failure_component AS state_failure_component,
    o.previous_status,
    o.previous_process_id,
    r.status AS requested_status,
    w.status = 'error' AS is_failure_mode,
    w.id IS NOT NULL AS has_state,
    w.id IS NOT NULL AS written,
    coalesce(o.outcome, 'unknown') AS outcome,
    CASE
        WHEN w.id IS NULL THEN NULL
        WHEN o.moved THEN now()
        WHEN machine_sync.canonical_status(p.current_state) = w.status THEN p.state_since
        ELSE now()
    END AS state_since
FROM request AS r
LEFT JOIN outcome AS o ON TRUE
LEFT JOIN written AS w ON TRUE
LEFT JOIN prior AS p ON TRUE;


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
WHERE m.id = :machine_id::uuid;


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
-- Every machine whose machine_state row is missing, orphaned or disagrees.
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
    d.state_failure_component
FROM machine_sync.drift AS d
ORDER BY d.machine_id;


-- name: reconcile
-- Repair all drift from machines; how many drift rows were repaired.
SELECT machine_sync.reconcile() AS repaired;


-- name: mode
-- The machine-sync mode: compat or strict.
SELECT machine_sync.mode() AS mode;


-- name: set_mode
-- Switch the mode; the mode before (the statement's snapshot) and after.
SELECT
    machine_sync.mode() AS previous_mode,
    machine_sync.set_mode(:mode::text) AS current_mode;


-- name: runner_bootstrap
-- The migration runner's own bookkeeping, outside schema machine_sync.
CREATE SCHEMA IF NOT EXISTS machine_sync_migrations;

COMMENT ON SCHEMA machine_sync_migrations IS
'machine-sync migration runner: applied files and installed definitions.';

REVOKE ALL ON SCHEMA machine_sync_migrations FROM public;

CREATE TABLE IF NOT EXISTS machine_sync_migrations.applied (
    migration text PRIMARY KEY,
    sha256 text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    applied_by text NOT NULL DEFAULT current_user
);

COMMENT ON TABLE machine_sync_migrations.applied IS
'One row per migration file applied by the runner (sha256 of its text).';

CREATE TABLE IF NOT EXISTS machine_sync_migrations.definition (
    kind text NOT NULL,
    object_name text NOT NULL,
    digest text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, object_name)
);

COMMENT ON TABLE machine_sync_migrations.definition IS
'md5 of each machine-sync function, trigger and view as the applied '
'migrations create them; migrate status compares the catalog with it.';


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
VALUES (:migration::text, :sha256::text)
ON CONFLICT (migration) DO UPDATE
    SET
        sha256 = excluded.sha256,
        applied_at = now(),
        applied_by = current_user;


-- name: forget_migration
-- Forget one reverted file.
DELETE FROM machine_sync_migrations.applied AS a
WHERE a.migration = :migration::text;


-- name: set_lock_timeout
-- lock_timeout for the rest of this transaction (a file may set its own).
SELECT set_config('lock_timeout', :lock_timeout::text, TRUE);


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


-- name: pin_search_path
-- An empty search_path for the rest of this transaction: catalog functions
-- then print every name schema-qualified, whatever the session's path.
SELECT set_config('search_path', '', TRUE);


-- name: installed_definitions
-- A digest of every function, trigger and view machine-sync installs:
-- functions and views in schema machine_sync, the legacy RPCs in public,
-- and the triggers that call machine_sync functions (their enabled state
-- is part of the digest: a disabled mirror is not the shipped mirror).
SELECT
    'function' AS kind,
    p.oid::regprocedure::text AS object_name,
    md5(pg_catalog.pg_get_functiondef(p.oid)) AS digest,
    NULL AS enabled
FROM pg_catalog.pg_proc AS p
WHERE
    p.prokind IN ('f', 'p')
    AND (
        p.pronamespace = to_regnamespace('machine_sync')
        OR (
            p.pronamespace = 'public'::regnamespace
            AND p.proname IN (
                'atomic_update_machine_state',
                'atomic_complete_machine_state',
                'atomic_error_machine_state',
                'atomic_processing_machine_state'
            )
        )
    )
UNION ALL
SELECT
    'trigger' AS kind,
    t.tgname || ' on ' || t.tgrelid::regclass::text AS object_name,
    md5(pg_catalog.pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text) AS digest,
    t.tgenabled <> 'D' AS enabled
FROM pg_catalog.pg_trigger AS t
INNER JOIN pg_catalog.pg_proc AS p ON t.tgfoid = p.oid
WHERE
    NOT t.tgisinternal
    AND p.pronamespace = to_regnamespace('machine_sync')
UNION ALL
SELECT
    'view' AS kind,
    c.oid::regclass::text AS object_name,
    md5(pg_catalog.pg_get_viewdef(c.oid)) AS digest,
    NULL AS enabled
FROM pg_catalog.pg_class AS c
WHERE
    c.relkind IN ('v', 'm')
    AND c.relnamespace = to_regnamespace('machine_sync')
ORDER BY kind, object_name;


-- name: recorded_definitions
-- The digests the applied migrations produce (recorded by apply and down).
SELECT
    d.kind,
    d.object_name,
    d.digest
FROM machine_sync_migrations.definition AS d
ORDER BY d.kind, d.object_name;


-- name: clear_definitions
-- Forget the recorded digests (before recording the current ones).
DELETE FROM machine_sync_migrations.definition;


-- name: record_definition
-- Record one digest (after clear_definitions).
INSERT INTO machine_sync_migrations.definition (kind, object_name, digest)
VALUES (:kind::text, :object_name::text, :digest::text);
