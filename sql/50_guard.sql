-- The guard: writes to machine_state that the mirror did not make.
--
-- The mirror (40_mirror.sql) marks its own writes with the transaction-local
-- setting machine_sync.mirroring = <machine id>, honoured only inside a
-- trigger (a client cannot set its way past the guard). Every other write
-- to a machine_state row is "direct", whoever issues it: a client, a
-- function, a trigger of the application's, a foreign-key action.
--
-- Guarantees:
-- * mode 'compat': a direct UPDATE or INSERT succeeds, reports its row as
--   before, and lands in machines as if written there (with the caller's own
--   privileges on machines); both tables agree when the statement ends. A
--   direct write that already agrees with machines does not write machines.
--   INSERT keeps PostgreSQL's meaning: the machine's row exists from the
--   moment the machine does, so a plain INSERT of it fails (23505) and an
--   upsert (INSERT ... ON CONFLICT) updates it.
-- * In compat, a direct write takes machines' lock before any machine_state
--   row (unless its transaction already writes machines), so legacy writers
--   and machines writers lock rows in one order and cannot deadlock.
-- * mode 'strict': a direct INSERT or UPDATE fails with SQLSTATE MS001.
-- * A direct DELETE fails while the machine exists (delete the machine).
-- * TRUNCATE of machine_state alone fails; TRUNCATE machines CASCADE works.

-- Normalizes a direct write into the row the mirror would have written.
CREATE OR REPLACE FUNCTION machine_sync.machine_state_before_direct_write()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    prior public.machine_state;
    prior_status text;
BEGIN
    IF machine_sync.mode() = 'strict' THEN
        RAISE EXCEPTION 'machine_state is maintained by machine-sync and is read-only in strict mode: write public.machines instead'
        USING ERRCODE = 'MS001',
              HINT = 'UPDATE public.machines SET status = ... WHERE id = ...; machine_state follows in the same transaction.';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF NEW.machine_id IS DISTINCT FROM OLD.machine_id THEN
            RAISE EXCEPTION 'machine_state.machine_id cannot change (from % to %)',
                OLD.machine_id, NEW.machine_id
            USING ERRCODE = 'MS001';
        END IF;
        prior := OLD;
    ELSE
        -- An INSERT makes a new row. For a machine whose state row exists
        -- (the mirror made it with the machine) it fails with 23505 as it
        -- always did, or, with ON CONFLICT, takes the UPDATE path above:
        -- replacing the row instead would change what an upsert means.
        prior := NULL;
    END IF;
    prior_status := machine_sync.canonical_status(prior.current_state);

    NEW.current_state := machine_sync.normalize_status(NEW.current_state);
    IF prior_status = 'error' AND NEW.current_state <> 'error' THEN
        NEW.failure_description := NULL;
        NEW.failure_component := NULL;
    END IF;
    NEW.is_failure_mode := (NEW.current_state = 'error');
    NEW.state_since := CASE
        WHEN prior_status = NEW.current_state THEN prior.state_since
        ELSE now()
    END;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

-- Carries a direct write into machines. SECURITY INVOKER on purpose: the
-- caller's own grants and RLS policies on machines decide whether it may.
CREATE OR REPLACE FUNCTION machine_sync.machine_state_carry_to_machines()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    UPDATE public.machines AS m
    SET
        status = NEW.current_state,
        current_process_id = NEW.process_id,
        failure_description = NEW.failure_description,
        failure_component = NEW.failure_component
    WHERE
        m.id = NEW.machine_id
        AND (m.status, m.current_process_id, m.failure_description, m.failure_component)
            IS DISTINCT FROM
            (NEW.current_state::text, NEW.process_id, NEW.failure_description,
             NEW.failure_component);
    -- Nothing updated: fine if machines already agrees (checked with the
    -- caller's own visibility), an error if the row is hidden or read-only.
    IF NOT FOUND AND NOT EXISTS (
        SELECT FROM public.machines AS m
        WHERE
            m.id = NEW.machine_id
            AND m.status = NEW.current_state
            AND m.current_process_id IS NOT DISTINCT FROM NEW.process_id
            AND m.failure_description IS NOT DISTINCT FROM NEW.failure_description
            AND m.failure_component IS NOT DISTINCT FROM NEW.failure_component
    ) THEN
        RAISE EXCEPTION 'cannot carry this machine_state write into machines: machine % is not visible or not writable for role %',
            NEW.machine_id, current_user
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Write public.machines directly.';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION machine_sync.machine_state_before_direct_delete()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF EXISTS (SELECT FROM public.machines AS m WHERE m.id = OLD.machine_id) THEN
        RAISE EXCEPTION 'machine_state rows are deleted with their machine: DELETE FROM public.machines WHERE id = %',
            quote_literal(OLD.machine_id)
        USING ERRCODE = 'MS001';
    END IF;
    RETURN OLD;
END
$$;

CREATE OR REPLACE FUNCTION machine_sync.machine_state_after_truncate()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF EXISTS (SELECT FROM public.machines) THEN
        RAISE EXCEPTION 'TRUNCATE of machine_state alone would leave machines without state: use TRUNCATE public.machines CASCADE'
        USING ERRCODE = 'MS001';
    END IF;
    RETURN NULL;
END
$$;

-- Lock order. A direct write locks its machine_state row before any of our
-- code runs, then (carry) the machines row; every machines writer locks the
-- two the other way round, so racing writers could deadlock. In compat, the
-- first write of a transaction therefore takes machines' lock for the whole
-- statement first, unless the transaction already holds a write lock on
-- machines: then it has rows of its own there, and upgrading its lock could
-- deadlock with another such transaction. (Only a transaction that has
-- written something pays for the pg_locks look-up.)
-- While it holds that lock, every machines writer waits for it; so that a
-- legacy write stuck behind some other lock cannot stall them for long, the
-- statement's lock waits are capped at one second (a lower lock_timeout of
-- the caller's stands; the caller's own is back when the statement ends). It
-- then fails with 55P03 and can be retried; nothing is half-applied.
CREATE OR REPLACE FUNCTION machine_sync.machine_state_lock_order()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF
        machine_sync.mode() = 'compat'
        AND (
            txid_current_if_assigned() IS NULL
            OR NOT EXISTS (
                SELECT
                FROM pg_catalog.pg_locks AS l
                WHERE
                    l.pid = pg_backend_pid()
                    AND l.locktype = 'relation'
                    AND l.relation = 'public.machines'::regclass
                    AND l.mode IN (
                        'RowExclusiveLock', 'ShareRowExclusiveLock',
                        'ExclusiveLock', 'AccessExclusiveLock'
                    )
            )
        )
    THEN
        IF current_setting('lock_timeout')::interval NOT BETWEEN '1 ms' AND '1 s' THEN
            PERFORM set_config(
                'machine_sync.caller_lock_timeout', current_setting('lock_timeout'), TRUE
            );
            PERFORM set_config('lock_timeout', '1s', TRUE);
        END IF;
        LOCK TABLE public.machines IN SHARE ROW EXCLUSIVE MODE;
    END IF;
    RETURN NULL;
END
$$;

-- Gives the caller its own lock_timeout back once the statement is done.
CREATE OR REPLACE FUNCTION machine_sync.machine_state_lock_order_end()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    caller_lock_timeout text := current_setting('machine_sync.caller_lock_timeout', TRUE);
BEGIN
    IF caller_lock_timeout <> '' THEN
        PERFORM set_config('lock_timeout', caller_lock_timeout, TRUE);
        PERFORM set_config('machine_sync.caller_lock_timeout', '', TRUE);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER machine_state_lock_order
BEFORE INSERT OR UPDATE ON public.machine_state
FOR EACH STATEMENT
WHEN (pg_trigger_depth() < 1)
EXECUTE FUNCTION machine_sync.machine_state_lock_order();

CREATE OR REPLACE TRIGGER machine_state_lock_order_end
AFTER INSERT OR UPDATE ON public.machine_state
FOR EACH STATEMENT
WHEN (pg_trigger_depth() < 1)
EXECUTE FUNCTION machine_sync.machine_state_lock_order_end();

CREATE OR REPLACE TRIGGER machine_state_direct_write
BEFORE INSERT OR UPDATE ON public.machine_state
FOR EACH ROW
WHEN (
    pg_trigger_depth() < 1
    OR current_setting('machine_sync.mirroring', TRUE) IS DISTINCT FROM new.machine_id::text
)
EXECUTE FUNCTION machine_sync.machine_state_before_direct_write();

CREATE OR REPLACE TRIGGER machine_state_carry_to_machines
AFTER INSERT OR UPDATE ON public.machine_state
FOR EACH ROW
WHEN (
    pg_trigger_depth() < 1
    OR current_setting('machine_sync.mirroring', TRUE) IS DISTINCT FROM new.machine_id::text
)
EXECUTE FUNCTION machine_sync.machine_state_carry_to_machines();

CREATE OR REPLACE TRIGGER machine_state_direct_delete
BEFORE DELETE ON public.machine_state
FOR EACH ROW
WHEN (
    pg_trigger_depth() < 1
    OR current_setting('machine_sync.mirroring', TRUE) IS DISTINCT FROM old.machine_id::text
)
EXECUTE FUNCTION machine_sync.machine_state_before_direct_delete();

CREATE OR REPLACE TRIGGER machine_state_truncate_alone
AFTER TRUNCATE ON public.machine_state
FOR EACH STATEMENT EXECUTE FUNCTION machine_sync.machine_state_after_truncate();
