-- The mirror: every write to machines is checked against the rules and
-- reflected in machine_state by the same statement, in the same transaction.
--
-- Guarantees:
-- * machines.status is always canonical (20_status.sql) and changes only as
--   the rules allow (30_transitions.sql), for every writer. (One exception,
--   under "Ordering" below: a change an application's own BEFORE trigger
--   makes to an UPDATE whose SET names no watched column.)
-- * machines.updated_at is the database's clock, never the client's;
--   machines.status_since moves exactly when the status changes. Both are
--   set here and nowhere else.
-- * After every INSERT or UPDATE of a machine its machine_state row exists
--   and has current_state = status, state_since = status_since,
--   process_id = current_process_id, is_failure_mode = (status = 'error')
--   and the same failure fields (with the same exception). A write that
--   changes none of these does not rewrite machine_state, and one that
--   changes no watched column (below) leaves the machine as it was,
--   updated_at included.
-- * DELETE needs no trigger: the foreign key cascades (10_tables.sql).
-- * On a logical replication subscriber of machines alone, with
--   zz_machine_sync_applied enabled for replica mode (below), applied rows
--   are mirrored as the publisher wrote them: no rule is checked again, no
--   clock is reset, and an applied delete takes its state row along.
-- * One trigger call per UPDATE: the BEFORE trigger decides the row and
--   writes its state row. An UPDATE that sets none of the columns it
--   watches (status, current_process_id, the failure fields, status_since,
--   updated_at, id) calls no function at all (the trigger's column list;
--   a WHEN clause would cost more, as PostgreSQL reads it anew for every
--   statement). A new machine takes two calls: its state row can only be
--   written AFTER the machine exists, because of the foreign key.
-- * The function runs as the database's mirror role (00_schema.sql,
--   machine_sync.mirror_role()): that is how the guard on machine_state
--   (60_guard.sql) knows the mirror's own writes, and why they work when
--   the writer may not write machine_state.
--   Its search_path puts pg_catalog before pg_temp, so no temporary type or
--   table can stand in for one it uses; every other name is qualified.
--
-- Ordering with the application's own triggers: BEFORE triggers fire in
-- name order and this one is named zz_machine_sync so that it fires after
-- the usual ones (an updated_at stamper, say) and sees their changes. It
-- fires when the UPDATE itself sets a watched column: an application's
-- BEFORE trigger that changes the status (or the process, or the failure
-- fields) of an UPDATE that sets none of them, or that sorts after
-- zz_machine_sync, is not seen, and machine_state would miss that change
-- (machine_sync.drift reports it; machine-sync reconcile repairs it).
-- AFTER UPDATE triggers of the application's see both tables already
-- written. A new machine's state row is written by the AFTER INSERT trigger
-- zz_machine_sync_insert_state, from the machine as it is when that trigger
-- fires: an application AFTER INSERT trigger sorting before it does not see
-- the state row yet, and what it changes in the new machine is mirrored.

-- The machine as stored now, whatever row-level security would show the
-- mirror (its AFTER triggers write a state row from it, below). It runs as
-- the owner of the tables, whom their policies do not filter, and only the
-- mirror may call it (90_grants.sql). Where they would (FORCE ROW LEVEL
-- SECURITY and an owner without BYPASSRLS), row_security = off makes the
-- read fail with PostgreSQL's 42501 naming the table, rather than find
-- nothing and leave the machine without its state row.
CREATE OR REPLACE FUNCTION machine_sync.stored_machine(machine pg_catalog.uuid)
RETURNS SETOF public.machines
LANGUAGE sql
STABLE
ROWS 1
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET row_security = off
AS $$
    SELECT m.* FROM public.machines AS m WHERE m.id = machine
$$;

COMMENT ON FUNCTION machine_sync.stored_machine(pg_catalog.uuid) IS
'The machines row as stored, past row-level security: for the mirror''s AFTER triggers.';

CREATE OR REPLACE FUNCTION machine_sync.machines_sync()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
-- Written for its hot path, an UPDATE that changes the status to one the
-- rules allow: every condition and assignment below is an expression
-- PostgreSQL prepares anew in each transaction, and a condition with a
-- subquery is a whole query however it short-circuits. So such a change
-- meets one condition that tells it apart, one probe and its write (the
-- shortcut, first); every other write takes the general path after it,
-- which states each rule.
DECLARE
    -- The status before this write, canonical; NULL for a new machine or a
    -- stored status outside the vocabulary (which may be corrected freely).
    was text;
    -- TRUE when a probe found the change from `was` to NEW.status allowed,
    -- FALSE when it found both spellings canonical and the change not
    -- allowed, NULL when the change is still to be checked (no default,
    -- which would be one more expression on every call).
    allowed boolean;
BEGIN
    -- The blocks are labelled for EXIT: past the rules to the write of the
    -- state row, or past that to the INSERT of a new one.
    <<write_state>>
    BEGIN
        <<rules>>
        BEGIN
            -- The shortcut: a change of the status between two that differ
            -- as spelled, on a machine whose status has not changed yet in
            -- this transaction and is not error (leaving error clears the
            -- failure fields), with a process exactly when the new status is
            -- processing, or else none or the current one (a run that this
            -- change ends). Once the probe finds such a change allowed, both
            -- spellings are canonical and the general path below would come
            -- to the same: the clocks move to now(), a run that ends lets go
            -- of its process, and the state row, which holds the old
            -- status's since, is written. Anything else, or a probe that
            -- finds nothing, takes the general path, which decides as if the
            -- shortcut had not run (it sets both clocks again; the process
            -- is as given). OLD is NULL for a new machine: the comparisons
            -- with it are not true.
            IF
                TG_WHEN = 'BEFORE'
                AND NEW.status <> OLD.status
                AND NEW.id = OLD.id
                AND OLD.status <> 'error'
                AND OLD.status_since <> now()
                AND (
                    CASE
                        WHEN NEW.status = 'processing' THEN NEW.current_process_id IS NOT NULL
                        ELSE NEW.current_process_id IS NULL OR NEW.current_process_id = OLD.current_process_id
                    END
                )
            THEN
                -- The probe sets the clocks as it goes (to NULL when it finds
                -- nothing). `IS TRUE` keeps the primary key's index out of it:
                -- the table is a page or two, which a scan reads for less
                -- than an index scan costs to start.
                SELECT now(), now() INTO NEW.updated_at, NEW.status_since
                FROM machine_sync.allowed_transition AS t
                WHERE (t.from_status = OLD.status AND t.to_status = NEW.status) IS TRUE;
                IF FOUND THEN
                    IF NEW.status <> 'processing' THEN
                        NEW.current_process_id := NULL;  -- the run ends, if there was one
                    END IF;
                    EXIT rules;
                END IF;
            END IF;

            IF TG_WHEN = 'AFTER' THEN
                -- A new machine (zz_machine_sync_insert_state), or a row a logical
                -- replication subscriber applies (zz_machine_sync_applied): the
                -- publisher checked it and set its clocks, so it is mirrored as it is.
                -- In replica mode only a subscription's own workers apply rows: a
                -- restore of a subscriber's dump (data loaded with
                -- session_replication_role = replica, machine_state's rows with it)
                -- must not be mirrored a second time.
                IF pg_catalog.current_setting('session_replication_role') = 'replica' THEN
                    IF NOT EXISTS (
                        SELECT
                        FROM pg_catalog.pg_stat_get_subscription(NULL) AS w
                        WHERE w.pid = pg_catalog.pg_backend_pid()
                    ) THEN
                        RETURN NULL;
                    END IF;
                END IF;
                IF TG_OP = 'DELETE' THEN
                    -- The foreign key's cascade does not fire in replica mode.
                    DELETE FROM public.machine_state AS s WHERE s.machine_id = OLD.id;
                    RETURN NULL;
                END IF;
                IF TG_OP = 'INSERT' THEN
                    -- A new machine's status and process must go together. This is
                    -- checked here, for the rows actually inserted, rather than
                    -- BEFORE INSERT: there an upsert's row may still conflict and
                    -- become an UPDATE of an existing machine, where the same values
                    -- end or stop its run. It is the row as inserted (this trigger's
                    -- NEW) that is checked, not the machine as stored: a write of it
                    -- earlier in this statement met the rules with the
                    -- unchecked row as its OLD, where a process in another status
                    -- reads as a run to end and processing without one as a stop.
                    IF TG_NAME = 'zz_machine_sync_insert_state' THEN
                        IF NEW.status = 'processing' AND NEW.current_process_id IS NULL THEN
                            RAISE EXCEPTION 'new machine % cannot be processing without a process: insert it with its current_process_id',
                                NEW.id
                            USING ERRCODE = 'MS003';
                        ELSIF NEW.status <> 'processing' AND NEW.current_process_id IS NOT NULL THEN
                            RAISE EXCEPTION 'new machine % cannot take process % while its status is %: set status processing with it',
                                NEW.id, NEW.current_process_id, machine_sync.quote_bounded(NEW.status)
                            USING ERRCODE = 'MS003';
                        END IF;
                    END IF;
                    -- AFTER triggers fire when the statement is done, and it may
                    -- have changed the machine since this row was inserted (a
                    -- function or a CTE later in it, an AFTER trigger sorting before
                    -- this one; the mirror wrote the state row for that change) or
                    -- deleted it. So the state row is written from the machine as it
                    -- is now, as stored (a policy on machines must not hide it from
                    -- the mirror).
                    SELECT m.* INTO NEW FROM machine_sync.stored_machine(NEW.id) AS m;
                    IF NOT FOUND THEN
                        RETURN NULL;
                    END IF;
                END IF;
                -- (An UPDATE here is a subscriber's applied row: mirrored as applied.)
                EXIT write_state;
            END IF;

            IF TG_OP = 'UPDATE' THEN
                IF NEW.id IS DISTINCT FROM OLD.id THEN
                    RAISE EXCEPTION 'machines.id cannot change (machine %)', OLD.id
                    USING ERRCODE = 'MS003';
                END IF;
                was := OLD.status;
                IF NEW.status IS NOT DISTINCT FROM was THEN
                    -- The trigger fires when the SET names a watched column; when
                    -- none of them changes, nor updated_at, the write is left as
                    -- it is (so `SET status = status` moves no clock).
                    IF (
                        NEW.current_process_id, NEW.failure_description, NEW.failure_component,
                        NEW.status_since, NEW.updated_at
                    ) IS NOT DISTINCT FROM (
                        OLD.current_process_id, OLD.failure_description, OLD.failure_component,
                        OLD.status_since, OLD.updated_at
                    ) THEN
                        RETURN NEW;
                    END IF;
                ELSE
                    -- One probe proves both spellings canonical (the table's
                    -- foreign keys) and the change allowed.
                    SELECT TRUE INTO allowed
                    FROM machine_sync.allowed_transition AS t
                    WHERE t.from_status = was AND t.to_status = NEW.status;
                    IF allowed IS NOT TRUE THEN
                        -- Not allowed as spelled. When both spellings are
                        -- canonical (one query), the change is known refused
                        -- (below); else they are spelled canonically and the
                        -- change is checked again.
                        IF (
                            SELECT pg_catalog.count(*) FROM machine_sync.allowed_status AS a
                            WHERE a.status IN (was, NEW.status)
                        ) = 2 THEN
                            allowed := FALSE;
                        ELSE
                            NEW.status := machine_sync.normalize_status(NEW.status);
                            was := machine_sync.canonical_status(OLD.status);
                        END IF;
                    END IF;
                END IF;
            ELSIF NOT EXISTS (
                SELECT FROM machine_sync.allowed_status AS a WHERE a.status = NEW.status
            ) THEN
                NEW.status := machine_sync.normalize_status(NEW.status);
            END IF;

            -- A status and its process go together. (OLD is NULL for a new machine:
            -- a comparison with it is NULL, so never true.)
            IF NEW.status = 'processing' THEN
                IF NEW.current_process_id IS NULL THEN
                    IF was = 'processing' THEN
                        -- The run was cleared: the machine stopped.
                        NEW.status := 'idle';
                        allowed := NULL;
                    ELSIF TG_OP = 'UPDATE' THEN
                        RAISE EXCEPTION 'machine % cannot be processing without a process: set current_process_id with the status',
                            NEW.id
                        USING ERRCODE = 'MS003';
                    END IF;  -- (a new machine: checked once inserted, above)
                ELSIF was = 'processing' AND NEW.current_process_id <> OLD.current_process_id THEN
                    RAISE EXCEPTION 'machine % is busy: it is running process %', NEW.id, OLD.current_process_id
                    USING ERRCODE = 'MS002',
                          DETAIL = 'refused process ' || NEW.current_process_id::text,
                          HINT = 'End the running process first (status idle, error or offline).';
                END IF;
            ELSIF NEW.current_process_id IS NOT NULL THEN
                -- A process with a status other than processing names the run
                -- that this write ends, and it must be the machine's current run
                -- (so a late completion of an old run cannot end the new one).
                IF NEW.current_process_id = OLD.current_process_id THEN
                    -- The run ends with the status it ran in.
                    NEW.current_process_id := NULL;
                ELSIF TG_OP = 'UPDATE' THEN
                    -- (A stored status is canonical, so as it is; one stored
                    -- outside the vocabulary, bypassing the triggers, is quoted.)
                    RAISE EXCEPTION 'machine % is not running process %: its status is %, with %', NEW.id, NEW.current_process_id,
                        CASE
                            WHEN OLD.status ~ '^[a-z][a-z0-9_]{0,49}$' THEN OLD.status
                            ELSE machine_sync.quote_bounded(OLD.status)
                        END,
                        coalesce('process ' || OLD.current_process_id::text, 'no current process')
                    USING ERRCODE = 'MS005',
                          HINT = 'To end a run, name the machine''s current process; to start one, set status processing with it.';
                END IF;
            END IF;

            IF allowed IS NOT TRUE AND NEW.status IS DISTINCT FROM was AND was IS NOT NULL THEN
                IF allowed IS FALSE OR NOT EXISTS (
                    SELECT FROM machine_sync.allowed_transition AS t
                    WHERE t.from_status = was AND t.to_status = NEW.status
                ) THEN
                    RAISE EXCEPTION 'machine % cannot go from % to %', NEW.id, was, NEW.status
                    USING ERRCODE = 'MS003',
                          DETAIL = coalesce('allowed from ' || was || ': ' || (
                              SELECT string_agg(t.to_status, ', ' ORDER BY t.to_status COLLATE "C")
                              FROM machine_sync.allowed_transition AS t
                              WHERE t.from_status = was), 'nothing is allowed from ' || was),
                          HINT = 'The rules are the rows of machine_sync.allowed_transition.';
                END IF;
            END IF;

            IF was = 'error' AND NEW.status <> 'error' THEN
                NEW.failure_description := NULL;
                NEW.failure_component := NULL;
            END IF;
            NEW.updated_at := now();
            -- A new machine has no `was`: its status is new.
            NEW.status_since := CASE WHEN NEW.status IS DISTINCT FROM was THEN now() ELSE OLD.status_since END;

            -- The state row is written here, once per change. When the status
            -- changes, at once: the row holds the old status's since, so it
            -- cannot agree already (short of drift), and a filter would cost
            -- every change. It may agree when the status stays (the clock alone
            -- moved, or a carried legacy write wrote the row first), and when
            -- the status already changed in this transaction (the old since is
            -- now(), which a carried legacy write keeps): then it is written only
            -- if it differs. Both cases are the ones where the since does not
            -- move. (One condition with INSERT's: each costs the hot path the
            -- same.)
            IF TG_OP = 'INSERT' OR NEW.status_since = OLD.status_since THEN
                IF TG_OP = 'INSERT' THEN
                    RETURN NEW;  -- the state row is written AFTER, once the machine exists
                END IF;
                IF EXISTS (
                    SELECT FROM public.machine_state AS s
                    WHERE
                        s.machine_id = NEW.id
                        AND (
                            s.current_state, s.state_since, s.process_id, s.is_failure_mode,
                            s.failure_component, s.failure_description
                        ) IS NOT DISTINCT FROM (
                            NEW.status::varchar, NEW.status_since, NEW.current_process_id,
                            NEW.status = 'error', NEW.failure_component, NEW.failure_description
                        )
                ) THEN
                    RETURN NEW;  -- the row agrees already
                END IF;
            END IF;
        END rules;
        UPDATE public.machine_state AS s
        SET
            current_state = NEW.status,
            state_since = NEW.status_since,
            process_id = NEW.current_process_id,
            is_failure_mode = (NEW.status = 'error'),
            failure_component = NEW.failure_component,
            failure_description = NEW.failure_description,
            updated_at = NEW.updated_at
        WHERE s.machine_id = NEW.id;
        IF FOUND THEN
            RETURN NEW;
        END IF;
        -- The row is missing (drift made by bypassing triggers): this write
        -- repairs it, below.
    END write_state;

    -- A new machine's state row, an applied one, or a missing one. A state
    -- row left behind by a restore that bypassed triggers is overwritten;
    -- one that agrees already (the mirror wrote it for a change later in the
    -- inserting statement) is left as it is.
    INSERT INTO public.machine_state AS s (
        machine_id, current_state, state_since, process_id,
        is_failure_mode, failure_component, failure_description, updated_at
    ) VALUES (
        NEW.id, NEW.status, NEW.status_since, NEW.current_process_id,
        NEW.status = 'error', NEW.failure_component, NEW.failure_description,
        NEW.updated_at
    )
    ON CONFLICT (machine_id) DO UPDATE SET
        current_state = excluded.current_state,
        state_since = excluded.state_since,
        process_id = excluded.process_id,
        is_failure_mode = excluded.is_failure_mode,
        failure_component = excluded.failure_component,
        failure_description = excluded.failure_description,
        updated_at = excluded.updated_at
    WHERE (
        s.current_state, s.state_since, s.process_id, s.is_failure_mode,
        s.failure_component, s.failure_description, s.updated_at
    ) IS DISTINCT FROM (
        excluded.current_state, excluded.state_since, excluded.process_id,
        excluded.is_failure_mode, excluded.failure_component,
        excluded.failure_description, excluded.updated_at
    );
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION machine_sync.machines_sync() IS
'Checks and completes a write to machines, and writes its machine_state row.';

-- The function is the mirror role's (00_schema.sql), which needs CREATE on
-- the schema only while it is handed over.
DO $$
DECLARE
    mirror constant name := machine_sync.mirror_role();
BEGIN
    EXECUTE format('GRANT CREATE ON SCHEMA machine_sync TO %I', mirror);
    EXECUTE format('ALTER FUNCTION machine_sync.machines_sync() OWNER TO %I', mirror);
    EXECUTE format('REVOKE CREATE ON SCHEMA machine_sync FROM %I', mirror);
END
$$;

CREATE OR REPLACE TRIGGER zz_machine_sync
BEFORE UPDATE OF
status, current_process_id, failure_description, failure_component,
status_since, updated_at, id
ON public.machines
FOR EACH ROW EXECUTE FUNCTION machine_sync.machines_sync();

CREATE OR REPLACE TRIGGER zz_machine_sync_insert
BEFORE INSERT ON public.machines
FOR EACH ROW EXECUTE FUNCTION machine_sync.machines_sync();

CREATE OR REPLACE TRIGGER zz_machine_sync_insert_state
AFTER INSERT ON public.machines
FOR EACH ROW EXECUTE FUNCTION machine_sync.machines_sync();

-- A logical replication subscriber of machines alone applies rows with
-- session_replication_role = replica, where the triggers above do not fire
-- (and the foreign key's cascade neither). This one mirrors what it
-- applies, and only there: it is created disabled, and the subscriber's
-- set-up enables it for replica mode alone (ALTER TABLE public.machines
-- ENABLE REPLICA TRIGGER zz_machine_sync_applied; see MIGRATING.md). So it
-- costs a normal install nothing, and a migration run again leaves its
-- state as it is.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_trigger AS t
        WHERE t.tgrelid = 'public.machines'::regclass AND t.tgname = 'zz_machine_sync_applied'
    ) THEN
        CREATE TRIGGER zz_machine_sync_applied
        AFTER INSERT OR UPDATE OR DELETE ON public.machines
        FOR EACH ROW EXECUTE FUNCTION machine_sync.machines_sync();
        ALTER TABLE public.machines DISABLE TRIGGER zz_machine_sync_applied;
    END IF;
END
$$;
