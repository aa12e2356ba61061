-- A legacy database of many machines, drifted as production's was, for
-- migration_time.py: the machines named by the setting legacy.machines,
-- 28% of them with a machine_state row (72% without), statuses in mixed
-- case, with trailing blanks and the alias 'running'; some state rows
-- disagree in case or value, or hold a failure found only there, and some
-- machines are processing without a process. Run after legacy_schema.sql.

INSERT INTO public.process_executions (id, recipe_name)
SELECT
    ('00000000-0000-4000-a000-' || lpad(n::text, 12, '0'))::uuid AS id,
    'ALD cycle ' || n AS recipe_name
FROM generate_series(1, 2000) AS n;

INSERT INTO public.machine_components (id, part_name) VALUES
('00000000-0000-4000-c000-000000000001', 'TMA precursor valve');

INSERT INTO public.machines (
    id, serial_number, location, lab_name, lab_institution, model,
    machine_type, install_date, last_maintenance_date, status,
    admin_id, current_process_id
)
SELECT
    ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid AS id,
    'ALD-' || n AS serial_number,
    'Bay ' || (1 + n % 3) AS location,
    'Thin Films Lab' AS lab_name,
    'Example Institute' AS lab_institution,
    'Savannah S200' AS model,
    'ALD' AS machine_type,
    timestamptz '2022-01-01 00:00+00' + (n % 1000) * interval '1 day' AS install_date,
    timestamptz '2026-06-01 00:00+00' AS last_maintenance_date,
    CASE n % 10
        WHEN 0 THEN 'idle' WHEN 1 THEN 'Idle' WHEN 2 THEN 'OFFLINE' WHEN 3 THEN 'offline'
        WHEN 4 THEN 'processing' WHEN 5 THEN 'error' WHEN 6 THEN 'running'
        WHEN 7 THEN 'idle ' ELSE 'offline'
    END AS status,
    ('00000000-0000-4000-b000-' || lpad((n % 50)::text, 12, '0'))::uuid AS admin_id,
    CASE
        WHEN n % 10 IN (4, 6) AND n % 20 <> 4
            THEN ('00000000-0000-4000-a000-' || lpad((1 + n % 2000)::text, 12, '0'))::uuid
    END AS current_process_id
FROM generate_series(1, current_setting('legacy.machines')::integer) AS n;

INSERT INTO public.machine_state (
    machine_id, current_state, state_since, process_id,
    is_failure_mode, failure_component, failure_description
)
SELECT
    ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid AS machine_id,
    CASE n % 10
        WHEN 0 THEN 'IDLE' WHEN 1 THEN 'idle' WHEN 2 THEN 'offline' WHEN 3 THEN 'Offline'
        WHEN 4 THEN 'processing' WHEN 5 THEN 'error' WHEN 6 THEN 'idle' WHEN 7 THEN 'IDLE'
        ELSE 'error'
    END AS current_state,
    timestamptz '2026-11-01 08:00+00' AS state_since,
    NULL::uuid AS process_id,
    n % 10 IN (5, 8) AS is_failure_mode,
    CASE WHEN n % 10 = 5 THEN '00000000-0000-4000-c000-000000000001'::uuid END AS failure_component,
    CASE
        WHEN n % 10 IN (5, 8) THEN 'Recipe execution error: precursor pressure low ' || n
    END AS failure_description
FROM generate_series(1, current_setting('legacy.machines')::integer) AS n
WHERE n % 25 < 7;

ANALYZE public.machines;
ANALYZE public.machine_state;
