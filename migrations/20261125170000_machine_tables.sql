-- Baseline: the two tables as production has them (MIGRATING.md, "The
-- system it migrates from").
-- On the production database this is a no-op; on an empty database it
-- creates them, so that every later migration starts from the same place.
-- Foreign keys to tables outside this product (process_executions,
-- machine_components) are not invented here.

-- squawk-ignore-file require-statement-timeout
-- (squawk) No statement_timeout: the lock_timeout below caps the only long
-- wait these statements have, another session's lock; their own work is
-- bounded by one row per lab machine.

BEGIN;
SET LOCAL lock_timeout = '5s';
-- Names resolve in pg_catalog alone (everything else here is schema
-- qualified): a function created in a schema on the caller's search_path
-- (public is writable by every role in a database made before PostgreSQL
-- 15) can neither stand in for a built-in one nor run as the migrating role.
SET LOCAL search_path = pg_catalog, pg_temp;

-- Remember, for the end of this transaction, whether this is a fresh install.
SELECT set_config(
    'machine_sync.creating_machines',
    (to_regclass('public.machines') IS NULL)::text,
    TRUE
) AS fresh_install;

CREATE TABLE IF NOT EXISTS public.machines (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    serial_number text NOT NULL,
    location text NOT NULL,
    lab_name text NOT NULL,
    lab_institution text NOT NULL,
    model text NOT NULL,
    machine_type text NOT NULL,
    install_date timestamptz NOT NULL,
    last_maintenance_date timestamptz NOT NULL,
    status text NOT NULL DEFAULT 'offline',
    current_operator_id uuid,
    admin_id uuid NOT NULL,
    is_active boolean NOT NULL DEFAULT TRUE,
    current_process_id uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    is_virtual boolean NOT NULL DEFAULT FALSE,
    virtual_config jsonb
);

CREATE TABLE IF NOT EXISTS public.machine_state (
    machine_id uuid PRIMARY KEY REFERENCES public.machines (id),
    -- (squawk) varchar(50) is production's column type, kept so that a fresh
    -- install equals production; this creates it, it never resizes it.
    -- squawk-ignore prefer-text-field
    current_state varchar(50) NOT NULL DEFAULT 'idle',
    state_since timestamptz NOT NULL DEFAULT now(),
    process_id uuid,
    is_failure_mode boolean NOT NULL DEFAULT FALSE,
    failure_component uuid,
    failure_description text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- A table in an exposed schema without RLS is open to every API role
-- (Supabase lint 0013): a fresh install starts closed. On an existing
-- database, whether machines has RLS is the application's choice;
-- machine_state gets it where it lacks it. ALTER TABLE takes ACCESS
-- EXCLUSIVE even when RLS is on already, and would queue for it behind any
-- open transaction on machine_state, every reader and writer queueing
-- behind it: on production, which has RLS on, nothing here takes a lock.
DO $$
BEGIN
    IF NOT (SELECT c.relrowsecurity FROM pg_class AS c WHERE c.oid = 'public.machine_state'::regclass) THEN
        ALTER TABLE public.machine_state ENABLE ROW LEVEL SECURITY;
    END IF;
    IF current_setting('machine_sync.creating_machines') = 'true' THEN
        ALTER TABLE public.machines ENABLE ROW LEVEL SECURITY;
    END IF;
END
$$;

COMMIT;
