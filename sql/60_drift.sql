-- Drift: machines whose machine_state row is missing or disagrees.
--
-- Drift cannot arise while the triggers run; it can only come from bypassing
-- them (session_replication_role = replica during a data-only restore,
-- ALTER TABLE ... DISABLE TRIGGER) or from data that predates machine-sync.
--
-- Guarantees:
-- * machine_sync.drift lists every such machine, one row each, and is empty
--   in normal operation. It runs with the caller's privileges
--   (security_invoker), so it never shows rows RLS hides from the caller.
-- * machine_sync.reconcile() repairs all drift from machines and returns how
--   many drift rows it repaired; afterwards the view is empty.

CREATE OR REPLACE VIEW machine_sync.drift
WITH (security_invoker = TRUE)
AS
SELECT
    m.status,
    s.current_state,
    m.current_process_id,
    s.process_id,
    s.is_failure_mode,
    m.failure_description,
    s.failure_description AS state_failure_description,
    m.failure_component,
    s.failure_component AS state_failure_component,
    coalesce(m.id, s.machine_id) AS machine_id,
    CASE
        WHEN s.machine_id IS NULL THEN 'missing_state'
        WHEN m.id IS NULL THEN 'orphaned_state'
        WHEN
            lower(m.status) = lower(s.current_state)
            AND m.status <> s.current_state
            THEN 'status_case'
        WHEN (m.status IS DISTINCT FROM machine_sync.canonical_status(m.status))
            THEN 'noncanonical_status'
        ELSE 'value_mismatch'
    END AS problem
FROM public.machines AS m
FULL OUTER JOIN public.machine_state AS s ON m.id = s.machine_id
WHERE
    m.id IS NULL
    OR s.machine_id IS NULL
    OR m.status IS DISTINCT FROM machine_sync.canonical_status(m.status)
    OR (
        m.status, m.current_process_id, m.status = 'error',
        m.failure_description, m.failure_component
    )
    IS DISTINCT FROM
    (
        s.current_state::text, s.process_id, s.is_failure_mode,
        s.failure_description, s.failure_component
    );

COMMENT ON VIEW machine_sync.drift IS
'Machines whose machine_state row is missing, orphaned or disagrees. '
'Empty in normal operation; repair with SELECT machine_sync.reconcile().';

CREATE OR REPLACE FUNCTION machine_sync.reconcile()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    drifted integer;
BEGIN
    IF current_setting('session_replication_role') = 'replica' THEN
        RAISE EXCEPTION 'reconcile needs the machine-sync triggers, which do not fire while session_replication_role = replica'
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = 'SET session_replication_role = origin; then call it again.';
    END IF;
    SELECT count(*) INTO drifted FROM machine_sync.drift;
    IF drifted = 0 THEN
        RETURN 0;
    END IF;

    -- Statuses stored in a legacy spelling ('IDLE'); an unknown status
    -- raises here, naming the allowed values.
    UPDATE public.machines AS m
    SET status = machine_sync.normalize_status(m.status)
    WHERE m.status IS DISTINCT FROM machine_sync.canonical_status(m.status);

    -- State rows whose machine is gone (foreign keys are not checked in
    -- replica mode). The delete guard allows it: the machine does not exist.
    DELETE FROM public.machine_state AS s
    WHERE NOT EXISTS (SELECT FROM public.machines AS m WHERE m.id = s.machine_id);

    -- Any write to a machine re-runs its mirror, which creates or corrects
    -- the state row; updated_at is the only column that changes.
    UPDATE public.machines AS m
    SET updated_at = now()
    WHERE m.id IN (SELECT d.machine_id FROM machine_sync.drift AS d);

    IF EXISTS (SELECT FROM machine_sync.drift) THEN
        RAISE EXCEPTION 'reconcile left drift behind; is a machine-sync trigger disabled?'
        USING ERRCODE = 'internal_error';
    END IF;
    RETURN drifted;
END
$$;

COMMENT ON FUNCTION machine_sync.reconcile() IS
'Repairs every row of machine_sync.drift from machines; returns how many.';
