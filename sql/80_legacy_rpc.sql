-- The legacy RPC functions, kept for deployed code that calls them through
-- PostgREST with named parameters.
--
-- Guarantees:
-- * Same names, same parameter names, same json result
--   {success, machine, machine_state, updated_at}; machine_state is null
--   when the caller may not see the state row.
-- * Each is one write to machines; the mirror does the rest, and the rules
--   apply as to any writer (a start on a busy machine raises MS002).
-- * A missing (or hidden) machine raises SQLSTATE MS004, which PostgREST
--   answers with HTTP 400, not 500; contradictory arguments raise 22023.
--   Nothing is half-applied.
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
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    machine public.machines;
    state json;
BEGIN
    IF p_machine_id IS NULL THEN
        RAISE EXCEPTION 'p_machine_id must not be null'
        USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- An unknown spelling is reported as such (23514, naming the allowed
    -- values), not as a disagreement.
    IF
        p_machine_status IS NOT NULL
        AND p_machine_state_current_state IS NOT NULL
        AND machine_sync.normalize_status(p_machine_status)
        <> machine_sync.normalize_status(p_machine_state_current_state)
    THEN
        RAISE EXCEPTION 'p_machine_status (%) and p_machine_state_current_state (%) disagree',
            machine_sync.quote_bounded(p_machine_status),
            machine_sync.quote_bounded(p_machine_state_current_state)
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
        RAISE EXCEPTION 'machine % does not exist or is not writable for role %',
            p_machine_id, current_user
        USING ERRCODE = 'MS004';
    END IF;
    IF p_is_failure_mode IS DISTINCT FROM (machine.status = 'error')
       AND p_is_failure_mode IS NOT NULL THEN
        RAISE EXCEPTION 'p_is_failure_mode = % contradicts status %', p_is_failure_mode, machine.status
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'is_failure_mode is derived: it is true exactly when status is error.';
    END IF;

    SELECT to_json(s) INTO state
    FROM public.machine_state AS s WHERE s.machine_id = p_machine_id;
    RETURN json_build_object(
        'success', TRUE,
        'machine', to_json(machine),
        'machine_state', state,
        'updated_at', machine.updated_at
    );
END
$$;

CREATE OR REPLACE FUNCTION public.atomic_complete_machine_state(p_machine_id uuid)
RETURNS json
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
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
SET search_path = pg_catalog, pg_temp
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
SET search_path = pg_catalog, pg_temp
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
