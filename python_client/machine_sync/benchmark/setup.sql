-- Scratch objects for `machine-sync bench`, created after the real
-- migrations in a scratch database (or relocated into scratch schemas).
--
-- Guarantees:
-- * The twin tables are copies of public.machines and public.machine_state
--   made with LIKE ... INCLUDING ALL (same columns, defaults, constraints,
--   indexes) plus the same storage parameters, and carry no trigger but the
--   reference mirror's: they measure the legacy dual write, the cheapest
--   trigger mirror and the no-trigger floor on equal terms.
-- * Machine ids are a pure function of a machine number, so psycopg and
--   pgbench clients address the same rows without reading them first.

CREATE SCHEMA IF NOT EXISTS machine_sync_bench;

CREATE TABLE machine_sync_bench.floor_machines (
    LIKE public.machines INCLUDING ALL
);

CREATE TABLE machine_sync_bench.legacy_machines (
    LIKE public.machines INCLUDING ALL
);

CREATE TABLE machine_sync_bench.legacy_machine_state (
    LIKE public.machine_state INCLUDING ALL,
    -- Production's foreign key, which never cascaded before machine-sync.
    CONSTRAINT legacy_machine_state_machine_id_fkey
    FOREIGN KEY (machine_id) REFERENCES machine_sync_bench.legacy_machines (id)
);

-- The reference mirror's twins (see minimal_mirror below).
CREATE TABLE machine_sync_bench.minimal_machines (
    LIKE public.machines INCLUDING ALL
);

CREATE TABLE machine_sync_bench.minimal_machine_state (
    LIKE public.machine_state INCLUDING ALL,
    CONSTRAINT minimal_machine_state_machine_id_fkey
    FOREIGN KEY (machine_id) REFERENCES machine_sync_bench.minimal_machines (id)
);

-- LIKE does not copy storage parameters; a fillfactor on the real tables
-- must hold for the twins too or HOT updates would differ.
DO $$
DECLARE
    pair record;
    options text[];
BEGIN
    FOR pair IN
        SELECT *
        FROM (VALUES
            ('public.machines', 'machine_sync_bench.floor_machines'),
            ('public.machines', 'machine_sync_bench.legacy_machines'),
            ('public.machine_state', 'machine_sync_bench.legacy_machine_state'),
            ('public.machines', 'machine_sync_bench.minimal_machines'),
            ('public.machine_state', 'machine_sync_bench.minimal_machine_state')
        ) AS p (source_table, twin_table)
    LOOP
        SELECT c.reloptions INTO options
        FROM pg_catalog.pg_class AS c
        WHERE c.oid = pair.source_table::regclass;
        IF options IS NOT NULL THEN
            EXECUTE format(
                'ALTER TABLE %s SET (%s)',
                pair.twin_table::regclass, array_to_string(options, ', ')
            );
        END IF;
    END LOOP;
END
$$;

-- The id of machine number n (1, 2, ...).
CREATE FUNCTION machine_sync_bench.machine_uuid(n bigint)
RETURNS uuid
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid
$$;

-- A process id unique to (run, client, step), for pgbench clients: a run
-- never sets a machine to the process id it already has.
CREATE FUNCTION machine_sync_bench.process_uuid(run bigint, client bigint, step bigint)
RETURNS uuid
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT (
        lpad(to_hex(run), 8, '0') || '-' || lpad(to_hex(client), 4, '0')
        || '-4000-9000-' || lpad(to_hex(step), 12, '0')
    )::uuid
$$;

-- The RPC approach done right: both legacy writes in one function call, so
-- in one transaction and one round trip. SET search_path as every function
-- this project ships has (Supabase's linter demands it), so it pays the same
-- per-call setting cost as the machine-sync triggers.
CREATE FUNCTION machine_sync_bench.set_machine_status(
    p_machine_id uuid, p_status text, p_process_id uuid
)
RETURNS void
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    UPDATE machine_sync_bench.legacy_machines AS m
    SET status = p_status, current_process_id = p_process_id, updated_at = now()
    WHERE m.id = p_machine_id;
    UPDATE machine_sync_bench.legacy_machine_state AS s
    SET
        current_state = p_status,
        process_id = p_process_id,
        state_since = now(),
        is_failure_mode = FALSE,
        failure_component = NULL,
        failure_description = NULL,
        updated_at = now()
    WHERE s.machine_id = p_machine_id;
END
$$;

-- The cheapest mirror a trigger can be, measured for reference: one BEFORE
-- UPDATE trigger that copies the status and the process into the twin of
-- machine_state and does nothing else (no rule, no normalization, no role
-- switch, no guard on the second table). Every trigger that keeps a second
-- table in step pays at least this; what machine-sync costs beyond it is
-- the price of its guarantees. SET search_path as above.
CREATE FUNCTION machine_sync_bench.minimal_mirror()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    UPDATE machine_sync_bench.minimal_machine_state AS s
    SET
        current_state = NEW.status,
        process_id = NEW.current_process_id,
        state_since = now(),
        updated_at = NEW.updated_at
    WHERE s.machine_id = NEW.id;
    RETURN NEW;
END
$$;

CREATE TRIGGER minimal_mirror
BEFORE UPDATE OF status, current_process_id ON machine_sync_bench.minimal_machines
FOR EACH ROW EXECUTE FUNCTION machine_sync_bench.minimal_mirror();
