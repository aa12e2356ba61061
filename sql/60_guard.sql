-- The guard: writes to machine_state that the mirror did not make.
--
-- A write is the mirror's exactly when it runs as the database's mirror
-- role (machine_sync.mirror_role(), 00_schema.sql); every other write to
-- machine_state is "direct", whoever makes it: a client, a function, an
-- application's trigger, a foreign-key action, the mirror role of another
-- database of the cluster. The two triggers the mirror's UPDATE meets have
-- no WHEN clause: PostgreSQL reads a WHEN clause anew for every statement,
-- and the mirror's write is a statement per machine, where a function that
-- returns at once costs less. The triggers on rarer writes (INSERT, DELETE) keep theirs.
--
-- Guarantees:
-- * mode 'compat': a direct UPDATE or INSERT succeeds with the caller's own
--   privileges and policies on machines deciding, reports its row as
--   before, and lands in machines as if written there, rules included (a
--   legacy start on a busy machine is refused like any other, MS002). Both
--   tables agree when the statement ends. A direct write that changes
--   nothing mirrored neither writes nor locks machines. INSERT keeps
--   PostgreSQL's meaning: a machine's state row exists from the moment the
--   machine does, so a plain INSERT of it fails (23505) and an upsert
--   (INSERT ... ON CONFLICT DO UPDATE) updates it.
-- * Lock order without a table lock. PostgreSQL locks a machine_state row
--   before any trigger on it runs, and every machines writer locks its
--   machines row first: a legacy write and a machines write of the same
--   machine, each in the instant between its two row locks, would wait for
--   each other. So a legacy write never waits for a lock while it holds the
--   state row: it takes its machine's row at once or polls for it, for at
--   most half of deadlock_timeout (or the caller's lower lock_timeout), and
--   gives up the moment another transaction waits for it; any lock wait on
--   the way (SKIP LOCKED does not skip them all) is cut short at 1 ms,
--   long before deadlock_timeout lets a cycle form. It then fails
--   with a retryable error (40001 in a cycle, 55P03 when time is up) and
--   nothing is half-applied. No mix of writers can deadlock, nothing takes a
--   table lock, and only writers of that one machine ever wait.
-- * mode 'strict': a direct INSERT or UPDATE fails with SQLSTATE MS001.
-- * A direct DELETE fails while the machine exists (delete the machine).
-- * TRUNCATE of machine_state alone fails; TRUNCATE machines CASCADE works.

-- Checks a direct write and locks its machine for the carry below (or, when
-- it changes nothing mirrored, so that a later write of machines in the same
-- transaction takes no lock while it holds this row). Runs with the
-- caller's privileges.
CREATE OR REPLACE FUNCTION machine_sync.machine_state_direct_write()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    since timestamptz;
    in_strict boolean;
    canonical boolean;
    caller_lock_timeout text;
BEGIN
    IF current_user = 'machine_sync_mirror' THEN  -- (the mirror role: named below)
        RETURN NEW;  -- the mirror's own write
    END IF;
    -- One query for the mode and the spelling. (The setting itself, not
    -- machine_sync.mode_v1(): a SQL function with a SET clause is never
    -- inlined, and this runs on every legacy write.)
    SELECT
        s.mode = 'strict',
        EXISTS (SELECT FROM machine_sync.allowed_status AS a WHERE a.status = NEW.current_state)
    INTO in_strict, canonical
    FROM machine_sync.settings AS s
    WHERE s.singleton;
    IF in_strict THEN
        RAISE EXCEPTION 'machine_state is maintained by machine-sync and is read-only in strict mode: write public.machines instead'
        USING ERRCODE = 'MS001',
              HINT = 'UPDATE public.machines SET status = ... WHERE id = ...; machine_state follows in the same transaction.';
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.machine_id IS DISTINCT FROM OLD.machine_id THEN
        RAISE EXCEPTION 'machine_state.machine_id cannot change (from % to %)',
            OLD.machine_id, NEW.machine_id
        USING ERRCODE = 'MS001';
    END IF;
    IF canonical IS NOT TRUE THEN  -- (NULL too: no settings row to read)
        NEW.current_state := machine_sync.normalize_status(NEW.current_state);
    END IF;
    NEW.is_failure_mode := (NEW.current_state = 'error');
    NEW.updated_at := now();
    IF NEW.machine_id IS NULL THEN
        RETURN NEW;  -- the NOT NULL constraint answers (23502)
    END IF;
    -- The machine's row, at once when no other transaction holds it (and
    -- the caller may see and lock it); else lock_machine decides. SKIP
    -- LOCKED and NOWAIT do not cover every wait of a row lock: having
    -- locked a version, PostgreSQL follows the row's update chain and waits
    -- for a writer of a later version, and the caller's policies may wait
    -- for anything. So every lock wait here is cut short at 1 ms (55P03,
    -- retry), long before deadlock_timeout lets a cycle be found; so is a
    -- wait for a table lock that DDL on machines holds (DDL that wants
    -- machine_state next would close a cycle too). An INSERT whose row
    -- exists locks the machine as well: as an upsert whose DO UPDATE ...
    -- WHERE finds nothing to do, it keeps the state row locked with no
    -- UPDATE trigger fired, and a later write of machines in the same
    -- transaction could then close a cycle. So a plain INSERT of an existing
    -- row on a busy machine gives up as any legacy write does (55P03), where
    -- on an idle one it fails on the duplicate key (23505).
    caller_lock_timeout := current_setting('lock_timeout');
    PERFORM set_config('lock_timeout', '1ms', true);
    SELECT m.status_since INTO since
    FROM public.machines AS m
    WHERE m.id = NEW.machine_id
    FOR NO KEY UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        since := machine_sync.lock_machine(NEW.machine_id, caller_lock_timeout);
    END IF;
    PERFORM set_config('lock_timeout', caller_lock_timeout, true);
    IF TG_OP = 'UPDATE' AND (
        NEW.current_state, NEW.process_id, NEW.failure_description, NEW.failure_component
    ) IS NOT DISTINCT FROM (
        OLD.current_state, OLD.process_id, OLD.failure_description, OLD.failure_component
    ) THEN
        -- Nothing mirrored changes: machines is not written.
        NEW.state_since := OLD.state_since;
    ELSE
        -- The carry changes the machine, and its mirror rewrites this row
        -- when the status changes; until then it keeps the machine's since.
        -- (A machine the caller could not lock, hidden, not writable or
        -- missing, is refused by the carry, or first by the foreign key.)
        NEW.state_since := coalesce(since, NEW.state_since);
    END IF;
    RETURN NEW;
END
$$;

-- Locks a machine's row for a legacy write without ever waiting for a lock:
-- the caller holds the machine's state row already, and every writer of
-- machines takes the two rows the other way round, so a wait here could
-- close a cycle (and the guard's 1 ms lock_timeout cuts short the waits
-- that SKIP LOCKED and NOWAIT leave). It polls instead, every millisecond,
-- for at most half of
-- deadlock_timeout (or the caller's own lower lock_timeout), and gives up at
-- once when some transaction is waiting for this one (that transaction holds
-- the machine and wants the state row: neither could go on). Either way it
-- raises a retryable error and nothing is half-applied: 40001 for the cycle,
-- 55P03 when the time is up. Returns the machine's status_since, or NULL
-- when the caller may not lock the row (not visible, or not writable).
-- Called only when the row could not be taken at once (the guard tries
-- that itself, with no call, first).
CREATE OR REPLACE FUNCTION machine_sync.lock_machine(machine_id uuid, caller_lock_timeout text)
RETURNS timestamptz
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    caller_ms numeric;
    bound_ms numeric;
    deadline timestamptz;
    since timestamptz;
BEGIN
    -- The caller's SKIP LOCKED found nothing: locked by another
    -- transaction, or not ours to lock. NOWAIT tells.
    BEGIN
        SELECT m.status_since INTO since
        FROM public.machines AS m
        WHERE m.id = lock_machine.machine_id
        FOR NO KEY UPDATE NOWAIT;
        RETURN since;  -- NULL when not found: not visible or not writable
    EXCEPTION WHEN lock_not_available THEN
        NULL;
    END;
    caller_ms := extract(epoch FROM caller_lock_timeout::interval) * 1000;
    bound_ms := extract(epoch FROM current_setting('deadlock_timeout')::interval) * 500;
    IF caller_ms > 0 AND caller_ms < bound_ms THEN
        bound_ms := caller_ms;
    END IF;
    deadline := clock_timestamp() + make_interval(secs => bound_ms / 1000);
    LOOP
        IF EXISTS (
            SELECT
            FROM pg_catalog.pg_locks AS l
            WHERE
                NOT l.granted
                AND pg_catalog.pg_backend_pid() = ANY (pg_catalog.pg_blocking_pids(l.pid))
        ) THEN
            RAISE EXCEPTION 'machine % is being written by another transaction that waits for this one: this write to machine_state gave up; retry',
                lock_machine.machine_id
            USING ERRCODE = 'serialization_failure',
                  HINT = 'In compat mode a write to machine_state also writes machines; write public.machines directly and no such conflict arises.';
        END IF;
        IF clock_timestamp() >= deadline THEN
            RAISE EXCEPTION 'machine % is being written by another transaction: this write to machine_state waited % ms for it and gave up; retry',
                lock_machine.machine_id, ceil(bound_ms)::bigint
            USING ERRCODE = 'lock_not_available',
                  HINT = 'In compat mode a write to machine_state also writes machines; write public.machines directly to wait as long as any writer.';
        END IF;
        PERFORM pg_catalog.pg_sleep(0.001);
        BEGIN
            SELECT m.status_since INTO since
            FROM public.machines AS m
            WHERE m.id = lock_machine.machine_id
            FOR NO KEY UPDATE SKIP LOCKED;
            EXIT WHEN FOUND;
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- a wait SKIP LOCKED did not skip, cut short: poll on
        END;
    END LOOP;
    RETURN since;
END
$$;

-- Carries a direct write into machines. SECURITY INVOKER on purpose: the
-- caller's own grants and RLS policies on machines decide whether it may.
-- The machines trigger then applies the rules and rewrites this row only
-- where they changed what was written (a run ends, a failure clears).
CREATE OR REPLACE FUNCTION machine_sync.machine_state_carry_to_machines()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_user = 'machine_sync_mirror' THEN  -- (the mirror role: named below)
        RETURN NULL;  -- the mirror's own write
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF (
            NEW.current_state, NEW.process_id, NEW.failure_description, NEW.failure_component
        ) IS NOT DISTINCT FROM (
            OLD.current_state, OLD.process_id, OLD.failure_description, OLD.failure_component
        ) THEN
            RETURN NULL;  -- nothing mirrored changed: machines is not written
        END IF;
    END IF;
    UPDATE public.machines AS m
    SET
        status = NEW.current_state,
        current_process_id = NEW.process_id,
        failure_description = NEW.failure_description,
        failure_component = NEW.failure_component
    WHERE m.id = NEW.machine_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cannot carry this machine_state write into machines: machine % is not visible or not writable for role %',
            NEW.machine_id, current_user
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Write public.machines directly.';
    END IF;
    RETURN NULL;
END
$$;

-- Runs as the owner: whether the machine still exists must not depend on
-- what the caller may see.
CREATE OR REPLACE FUNCTION machine_sync.machine_state_direct_delete()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT FROM public.machines) THEN
        RAISE EXCEPTION 'TRUNCATE of machine_state alone would leave machines without state: use TRUNCATE public.machines CASCADE'
        USING ERRCODE = 'MS001';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER machine_state_direct_write
BEFORE INSERT OR UPDATE ON public.machine_state
FOR EACH ROW
EXECUTE FUNCTION machine_sync.machine_state_direct_write();

CREATE OR REPLACE TRIGGER machine_state_carry_update
AFTER UPDATE ON public.machine_state
FOR EACH ROW
EXECUTE FUNCTION machine_sync.machine_state_carry_to_machines();

-- The mirror's own writes are told by the name of the database's mirror
-- role (machine_sync.mirror_role(), 00_schema.sql), written into the two
-- functions above as a constant where they say 'machine_sync_mirror' (any
-- lookup of it would cost every write of machines), and into the WHEN
-- clauses of the triggers on rarer writes.
DO $$
DECLARE
    mirror constant name := machine_sync.mirror_role();
    placeholder constant text := $p$current_user = 'machine_sync_mirror'$p$;
    guard regprocedure;
    definition text;
BEGIN
    FOREACH guard IN ARRAY ARRAY[
        'machine_sync.machine_state_direct_write()'::regprocedure,
        'machine_sync.machine_state_carry_to_machines()'::regprocedure
    ] LOOP
        definition := pg_get_functiondef(guard);
        IF array_length(string_to_array(definition, placeholder), 1) <> 2 THEN
            RAISE EXCEPTION 'cannot name the mirror role in %: "%" is not in it exactly once', guard, placeholder;
        END IF;
        EXECUTE replace(definition, placeholder, format('current_user = %L', mirror));
    END LOOP;
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER machine_state_carry_insert
        AFTER INSERT ON public.machine_state
        FOR EACH ROW
        WHEN (current_user <> %L)
        EXECUTE FUNCTION machine_sync.machine_state_carry_to_machines()', mirror
    );
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER machine_state_direct_delete
        BEFORE DELETE ON public.machine_state
        FOR EACH ROW
        WHEN (current_user <> %L)
        EXECUTE FUNCTION machine_sync.machine_state_direct_delete()', mirror
    );
END
$$;

CREATE OR REPLACE TRIGGER machine_state_truncate_alone
AFTER TRUNCATE ON public.machine_state
FOR EACH STATEMENT EXECUTE FUNCTION machine_sync.machine_state_after_truncate();
