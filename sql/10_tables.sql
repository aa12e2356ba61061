-- The two tables, as production has them, plus what machine-sync adds.
--
-- Guarantees:
-- * On an empty database the tables are created; on production's they are
--   kept with their data, and only the additions below are made.
-- * `machines` holds everything `machine_state` shows: it gains nullable
--   `failure_description` and `failure_component`, and `status_since`, the
--   moment its status last changed (machine_state.state_since mirrors it).
-- * A `machine_state` row lives and dies with its machine: exactly one
--   foreign key to machines, named machine_state_machine_id_fkey, cascading
--   on delete, whatever production called its own.
-- * Foreign keys to tables outside this product (`process_executions`,
--   `machine_components`) are left as they are; a fresh install does not
--   invent those tables.
-- * `id` defaults to the core gen_random_uuid() (production used
--   uuid-ossp's uuid_generate_v4(), which not every server has).
-- * Row Level Security: a fresh install creates both tables with it on and
--   no policy (a table in an exposed schema without it is open to every API
--   role). On an existing database, whether machines has it stays the
--   application's choice.

-- The rules compare statuses as text, one spelling against another. A
-- nondeterministic collation on either status column (one under which
-- 'IDLE' equals 'idle') would let one spelling pass for another, so an
-- existing database with one is refused before anything changes.
DO $$
DECLARE
    columns text;
BEGIN
    SELECT string_agg(format('%s.%I (collation %I)', a.attrelid::regclass, a.attname, c.collname), ', ')
    INTO columns
    FROM pg_catalog.pg_attribute AS a
    INNER JOIN pg_catalog.pg_collation AS c ON a.attcollation = c.oid
    WHERE
        a.attrelid IN (to_regclass('public.machines'), to_regclass('public.machine_state'))
        AND a.attname IN ('status', 'current_state')
        AND NOT a.attisdropped
        AND NOT c.collisdeterministic;
    IF columns IS NOT NULL THEN
        RAISE EXCEPTION 'machine-sync needs a deterministic collation on %: a nondeterministic one lets one status spelling pass for another',
            columns
        USING ERRCODE = 'feature_not_supported',
              HINT = 'Give the column the database''s collation (ALTER TABLE ... ALTER COLUMN ... TYPE <its type> COLLATE "default"), then migrate again.';
    END IF;
END
$$;

-- Remember, for the end of this file, whether this is a fresh install.
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
    machine_id uuid PRIMARY KEY
    CONSTRAINT machine_state_machine_id_fkey
    REFERENCES public.machines (id) ON DELETE CASCADE,
    -- (squawk) varchar(50) is production's column type, kept so that a fresh
    -- install has the table production has; it is created, never resized.
    -- squawk-ignore prefer-text-field
    current_state varchar(50) NOT NULL DEFAULT 'idle',
    state_since timestamptz NOT NULL DEFAULT now(),
    process_id uuid,
    is_failure_mode boolean NOT NULL DEFAULT FALSE,
    failure_component uuid,
    failure_description text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE public.machine_state ENABLE ROW LEVEL SECURITY;

DO $$
BEGIN
    IF current_setting('machine_sync.creating_machines') = 'true' THEN
        ALTER TABLE public.machines ENABLE ROW LEVEL SECURITY;
    END IF;
END
$$;

-- Adding a nullable column, or one whose default is the transaction's
-- now() (a stable expression), rewrites no rows.
ALTER TABLE public.machines
ADD COLUMN IF NOT EXISTS failure_description text,
ADD COLUMN IF NOT EXISTS failure_component uuid,
ADD COLUMN IF NOT EXISTS status_since timestamptz NOT NULL DEFAULT now();

-- The new columns start from what only machine_state held: failure details
-- where machines has none, and state_since where the state row shows the
-- same status (in any case). On a database that has them already, or an
-- empty one, nothing matches.
UPDATE public.machines AS m
SET
    failure_description = coalesce(m.failure_description, s.failure_description),
    failure_component = coalesce(m.failure_component, s.failure_component),
    status_since = CASE
        WHEN lower(m.status COLLATE "C") = lower(s.current_state COLLATE "C")
            THEN s.state_since
        ELSE m.status_since
    END
FROM public.machine_state AS s
WHERE
    s.machine_id = m.id
    AND (
        (
            m.failure_description IS NULL
            AND m.failure_component IS NULL
            AND (s.failure_description IS NOT NULL OR s.failure_component IS NOT NULL)
        )
        OR (
            lower(m.status COLLATE "C") = lower(s.current_state COLLATE "C")
            AND m.status_since IS DISTINCT FROM s.state_since
        )
    );

ALTER TABLE public.machines ALTER COLUMN id SET DEFAULT gen_random_uuid();

DO $$
DECLARE
    fk record;
BEGIN
    FOR fk IN
        SELECT c.conname, c.confdeltype
        FROM pg_catalog.pg_constraint AS c
        WHERE
            c.conrelid = 'public.machine_state'::pg_catalog.regclass
            AND c.contype = 'f'
            AND c.confrelid = 'public.machines'::pg_catalog.regclass
    LOOP
        IF fk.conname <> 'machine_state_machine_id_fkey' OR fk.confdeltype <> 'c' THEN
            EXECUTE format('ALTER TABLE public.machine_state DROP CONSTRAINT %I', fk.conname);
        END IF;
    END LOOP;
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_constraint AS c
        WHERE
            c.conrelid = 'public.machine_state'::pg_catalog.regclass
            AND c.conname = 'machine_state_machine_id_fkey'
    ) THEN
        ALTER TABLE public.machine_state
        ADD CONSTRAINT machine_state_machine_id_fkey
        FOREIGN KEY (machine_id) REFERENCES public.machines (id)
        ON DELETE CASCADE;
    END IF;
END
$$;

COMMENT ON TABLE public.machines IS
'One row per tool. The only table clients write; machine-sync mirrors it '
'into machine_state in the same transaction.';
COMMENT ON COLUMN public.machines.status IS
'Canonical status (machine_sync.allowed_status); input is trimmed and '
'lower-cased, aliases are resolved, transitions are checked '
'(machine_sync.allowed_transition).';
COMMENT ON COLUMN public.machines.status_since IS
'When status last changed; set by the database.';
COMMENT ON TABLE public.machine_state IS
'Read-only mirror of machines, kept by machine-sync for legacy readers '
'(dashboard, Realtime, reports).';
