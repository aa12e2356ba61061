-- The mirror: every write to machines is reflected in machine_state by the
-- same statement, inside the same transaction.
--
-- Guarantees:
-- * machines.status is always canonical (see 20_status.sql).
-- * machines.updated_at is the database's clock, never the client's.
-- * Leaving 'error' clears failure_description and failure_component.
-- * After every INSERT or UPDATE of a machine, its machine_state row exists
--   and has current_state = status, process_id = current_process_id,
--   is_failure_mode = (status = 'error') and the same failure fields.
-- * state_since moves only when the state changes; a write that changes
--   nothing mirrored does not rewrite machine_state.
-- * DELETE needs no trigger: the foreign key cascades (10_tables.sql).
-- * The mirror is SECURITY DEFINER with an empty search_path, so it works
--   when the writer may not touch machine_state (RLS, revoked grants).

CREATE OR REPLACE FUNCTION machine_sync.machines_before_write()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        NEW.status := machine_sync.normalize_status(NEW.status);
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.status = 'error' AND NEW.status <> 'error' THEN
        NEW.failure_description := NULL;
        NEW.failure_component := NULL;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION machine_sync.machines_before_write() IS
'Normalizes status, stamps updated_at, clears failure fields on leaving error.';

CREATE OR REPLACE FUNCTION machine_sync.mirror_machine_state()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    UPDATE public.machine_state AS s
    SET
        current_state = NEW.status,
        state_since = CASE
            WHEN machine_sync.canonical_status(s.current_state) = NEW.status
                THEN s.state_since
            ELSE now()
        END,
        process_id = NEW.current_process_id,
        is_failure_mode = (NEW.status = 'error'),
        failure_component = NEW.failure_component,
        failure_description = NEW.failure_description,
        updated_at = now()
    WHERE
        s.machine_id = NEW.id
        AND (s.current_state, s.process_id, s.is_failure_mode,
             s.failure_component, s.failure_description)
            IS DISTINCT FROM
            (NEW.status, NEW.current_process_id, NEW.status = 'error',
             NEW.failure_component, NEW.failure_description);
    IF NOT FOUND THEN
        -- Either the row already agrees (nothing to do) or it is missing
        -- (a new machine, or drift made by bypassing triggers): create it.
        INSERT INTO public.machine_state AS s (
            machine_id, current_state, state_since, process_id,
            is_failure_mode, failure_component, failure_description, updated_at
        ) VALUES (
            NEW.id, NEW.status, now(), NEW.current_process_id,
            NEW.status = 'error', NEW.failure_component,
            NEW.failure_description, now()
        )
        ON CONFLICT (machine_id) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION machine_sync.mirror_machine_state() IS
'Writes the machine_state row of NEW so that it agrees with machines.';

CREATE OR REPLACE TRIGGER machines_before_write
BEFORE INSERT OR UPDATE ON public.machines
FOR EACH ROW EXECUTE FUNCTION machine_sync.machines_before_write();

CREATE OR REPLACE TRIGGER machines_mirror_state
AFTER INSERT OR UPDATE ON public.machines
FOR EACH ROW EXECUTE FUNCTION machine_sync.mirror_machine_state();
