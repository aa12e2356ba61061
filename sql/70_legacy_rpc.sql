-- The legacy RPC functions, kept for deployed code that calls them through
-- PostgREST with named parameters.
--
-- Guarantees:
-- * Same names, same parameter names, same json result
--   {success, machine, machine_state, updated_at}.
-- * Each is one write to machines; the mirror does the rest.
-- * A missing machine raises SQLSTATE P0002 (no_data_found); contradictory
--   arguments raise 22023. Nothing is half-applied.
-- * SECURITY INVOKER: the caller's own privileges and RLS policies apply.

CREATE OR REPLACE FUNCTION public.atomic_update_machine_state(
    p_machine_id uuid,
    p_machine_status text DEFAULT NULL,
    p_current_process_id uuid DEFAULT NULL,
    p_machine_state_current_state text DEFAULT NULL,
    p_machine_state_process_id uuid DEFAULT NULL,
    p_is_failure_mode boolean DEFAULT NULL,
    p_failure_description text DEFAULT NULL
)
RETURNS json
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    machine public.machines;
    state public.machine_state;
BEGIN
    IF p_machine_id IS NULL THEN
        RAISE EXCEPTION 'p_machine_id must not be null'
        USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- An unknown spelling is reported as such (23514, naming the allowed
    -- values), not as a disagreement.
    PERFORM machine_sync.normalize_status(p_machine_status)
    WHERE p_machine_status IS NOT NULL;
    PERFORM machine_sync.normalize_status(p_machine_state_current_state)
    WHERE p_machine_state_current_state IS NOT NULL;
    IF machine_sync.canonical_status(p_machine_status)
       IS DISTINCT FROM machine_sync.canonical_status(p_machine_state_current_state)
       AND p_machine_status IS NOT NULL AND p_machine_state_current_state IS NOT NULL THEN
        RAISE EXCEPTION 'p_machine_status (%) and p_machine_state_current_state (%) disagree',
            p_machine_status, p_machine_state_current_state
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_current_process_id <> p_machine_state_process_id THEN
        RAISE EXCEPTION 'p_current_process_id (%) and p_machine_state_process_id (%) disagree',
            p_current_process_id, p_machine_state_process_id
        USING ERRCODE = 'invalid_parameter_value';
    END IF;

    UPDATE public.machines AS m
    SET
        status = coalesce(p_machine_status, p_machine_state_current_state, m.status),
        current_process_id = coalesce(p_current_process_id, p_machine_state_process_id),
        failure_description = p_failure_description
    WHERE m.id = p_machine_id
    RETURNING m.* INTO machine;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'machine % does not exist', p_machine_id
        USING ERRCODE = 'no_data_found';
    END IF;
    IF p_is_failure_mode IS DISTINCT FROM (machine.status = 'error')
       AND p_is_failure_mode IS NOT NULL THEN
        RAISE EXCEPTION 'p_is_failure_mode = % contradicts status %', p_is_failure_mode, machine.status
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'is_failure_mode is derived: it is true exactly when status is error.';
    END IF;

    SELECT * INTO state FROM public.machine_state AS s WHERE s.machine_id = p_machine_id;
    RETURN json_build_object(
        'success', true,
        'machine', to_json(machine),
        'machine_state', to_json(state),
        'updated_at', machine.updated_at
    );
END
$$;

CREATE OR REPLACE FUNCTION public.atomic_complete_machine_state(p_machine_id uuid)
RETURNS json
LANGUAGE sql
SET search_path = ''
AS $$
    SELECT public.atomic_update_machine_state(
        p_machine_id => p_machine_id,
        p_machine_status => 'idle'
    )
$$;

CREATE OR REPLACE FUNCTION public.atomic_error_machine_state(
    p_machine_id uuid, p_error_message text
)
RETURNS json
LANGUAGE sql
SET search_path = ''
AS $$
    SELECT public.atomic_update_machine_state(
        p_machine_id => p_machine_id,
        p_machine_status => 'error',
        p_failure_description
        => 'Recipe execution error: ' || coalesce(p_error_message, '(no message)')
    )
$$;

CREATE OR REPLACE FUNCTION public.atomic_processing_machine_state(
    p_machine_id uuid, p_process_id uuid
)
RETURNS json
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    IF p_process_id IS NULL THEN
        RAISE EXCEPTION 'p_process_id must not be null'
        USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN public.atomic_update_machine_state(
        p_machine_id => p_machine_id,
        p_machine_status => 'processing',
        p_current_process_id => p_process_id
    );
END
$$;
