-- The two tables, as production has them, plus the columns machine-sync adds.
--
-- Guarantees:
-- * `machines` can hold everything `machine_state` shows: it gains nullable
--   `failure_description` and `failure_component`.
-- * A `machine_state` row lives and dies with its machine (ON DELETE CASCADE).
-- * Foreign keys to tables outside this product (`process_executions`,
--   `machine_components`) exist on the legacy database and are left as they
--   are; a fresh install does not invent those tables.
-- * `id` defaults to the core gen_random_uuid() (production used
--   uuid-ossp's uuid_generate_v4(), which embedded servers lack).

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
    virtual_config jsonb,
    failure_description text,
    failure_component uuid
);

COMMENT ON TABLE public.machines IS
'One row per tool. The only table clients write; machine-sync mirrors it '
'into machine_state in the same transaction.';
COMMENT ON COLUMN public.machines.status IS
'Canonical status (see machine_sync.allowed_status); input is trimmed, '
'lower-cased and aliases are resolved.';

CREATE TABLE IF NOT EXISTS public.machine_state (
    machine_id uuid PRIMARY KEY
    CONSTRAINT machine_state_machine_id_fkey
    REFERENCES public.machines (id) ON DELETE CASCADE,
    current_state varchar(50) NOT NULL DEFAULT 'idle',
    state_since timestamptz NOT NULL DEFAULT now(),
    process_id uuid,
    is_failure_mode boolean NOT NULL DEFAULT FALSE,
    failure_component uuid,
    failure_description text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Row Level Security on both: production has it on machine_state, and a
-- table in an exposed schema without it is open to every API role (Supabase
-- lint 0013). With no policy only the owner and BYPASSRLS roles
-- (service_role) see rows until the project adds its own policies. The
-- migrations enable it on machines only when they create the table: on an
-- existing database that choice belongs to the application.
ALTER TABLE public.machines ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.machine_state ENABLE ROW LEVEL SECURITY;

COMMENT ON TABLE public.machine_state IS
'Read-only mirror of machines, kept by machine-sync triggers for legacy '
'readers (dashboard, Realtime, reports).';
