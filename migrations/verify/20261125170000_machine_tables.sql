-- Verify the baseline: both tables, with every column the baseline creates.
-- Reads no row (WHERE FALSE) and takes ACCESS SHARE only; a missing table or
-- column fails with PostgreSQL's own error naming it.
-- psql -v ON_ERROR_STOP=1 -f migrations/verify/20261125170000_machine_tables.sql

SELECT
    m.id,
    m.serial_number,
    m.location,
    m.lab_name,
    m.lab_institution,
    m.model,
    m.machine_type,
    m.install_date,
    m.last_maintenance_date,
    m.status,
    m.current_operator_id,
    m.admin_id,
    m.is_active,
    m.current_process_id,
    m.created_at,
    m.updated_at,
    m.is_virtual,
    m.virtual_config
FROM public.machines AS m
WHERE FALSE;

SELECT
    s.machine_id,
    s.current_state,
    s.state_since,
    s.process_id,
    s.is_failure_mode,
    s.failure_component,
    s.failure_description,
    s.updated_at
FROM public.machine_state AS s
WHERE FALSE;
