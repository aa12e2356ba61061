-- The mirror: every write to machines is checked against the rules and
-- reflected in machine_state by the same statement, in the same transaction.
--
-- Guarantees:
-- * machines.status is always canonical (20_status.sql) and changes only as
--   the rules allow (30_transitions.sql), for every writer.
-- * machines.updated_at is the database's clock, never the client's;
--   machines.status_since moves exactly when the status changes. Both are
--   set here and nowhere else.
-- * After every INSERT or UPDATE of a machine its machine_state row exists
--   and has current_state = status, state_since = status_since,
--   process_id = current_process_id, is_failure_mode = (status = 'error')
--   and the same failure fields. A write that changes none of these does
--   not rewrite machine_state.
-- * DELETE needs no trigger: the foreign key cascades (10_tables.sql).
--   (Except where the cascade does not fire: zz_machine_sync_delete.)
-- * On a logical replication subscriber of machines alone, with these
--   triggers set ENABLE ALWAYS, applied rows are mirrored as the
--   publisher wrote them: no rule is checked again, no clock is reset.
-- * One trigger call per UPDATE: the BEFORE trigger decides the row and
--   writes its state row. An UPDATE that touches none of the columns it
--   watches (status, current_process_id, the failure fields, status_since,
--   updated_at, id) calls no function at all (the trigger's WHEN). A new
--   machine takes two calls: its state row can only be written AFTER the
--   machine exists, because of the foreign key.
-- * The function runs as machine_sync_mirror (00_schema.sql): that is how
--   the guard on machine_state (60_guard.sql) knows the mirror's own
--   writes, and why they work when the writer may not write machine_state.
--   Its search_path puts pg_catalog before pg_temp, so no temporary type or
--   table can stand in for one it uses; every other name is qualified.
--
-- Ordering with the application's own triggers: BEFORE triggers fire in
-- name order and this one is named zz_machine_sync so that it fires after
-- the usual ones (an updated_at stamper, say) and sees their changes. A
-- BEFORE trigger that sorts after it must not change the columns above:
-- machine_state would miss that change (machine_sync.drift reports it).
-- AFTER triggers of the application's see both tables already written.

CREATE OR REPLACE FUNCTION machine_sync.machines_sync()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- The status before this write, canonical; NULL for a new machine or a
    -- stored status outside the vocabulary (which may be corrected freely).
    was text;
    -- Whether the change from `was` to NEW.status is known to be allowed.
    allowed boolean := FALSE;
    -- A row a logical replication subscriber applies (its apply worker runs
    -- with session_replication_role = replica, where this trigger fires
    -- only when set ENABLE ALWAYS): the publisher checked it and set its
    -- clocks already, so it is mirrored as it is.
    applied constant boolean := pg_catalog.current_setting('session_replication_role') = 'replica';
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- Only for an applied delete (see zz_machine_sync_delete): the foreign
        -- key's cascade does not fire in replica mode.
        DELETE FROM public.machine_state AS s WHERE s.machine_id = OLD.id;
        RETURN NULL;
    END IF;
    IF TG_WHEN = 'AFTER' THEN
        -- A new machine. A state row left behind by a restore that bypassed
        -- triggers is overwritten, not kept.
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
            updated_at = excluded.updated_at;
        RETURN NULL;
    END IF;

    IF applied THEN
        NULL;  -- as the publisher wrote it: straight to the state row below
    ELSIF TG_OP = 'INSERT' THEN
        IF NOT EXISTS (
            SELECT FROM machine_sync.allowed_status AS a WHERE a.status = NEW.status
        ) THEN
            NEW.status := machine_sync.normalize_status(NEW.status);
        END IF;
    ELSE
        IF NEW.id IS DISTINCT FROM OLD.id THEN
            RAISE EXCEPTION 'machines.id cannot change (machine %)', OLD.id
            USING ERRCODE = 'MS003';
        END IF;
        was := OLD.status;
        IF NEW.status IS DISTINCT FROM OLD.status THEN
            -- Hot path: one probe proves both spellings canonical (the
            -- table's foreign keys) and the change allowed.
            allowed := EXISTS (
                SELECT FROM machine_sync.allowed_transition AS t
                WHERE t.from_status = OLD.status AND t.to_status = NEW.status
            );
            IF NOT allowed THEN
                NEW.status := machine_sync.normalize_status(NEW.status);
                was := machine_sync.canonical_status(OLD.status);
            END IF;
        END IF;
    END IF;

    IF NOT applied THEN
        -- A status and its process go together.
        IF NEW.status = 'processing' THEN
            IF NEW.current_process_id IS NULL THEN
                IF was = 'processing' THEN
                    -- The run was cleared: the machine stopped.
                    NEW.status := 'idle';
                    allowed := FALSE;
                ELSE
                    RAISE EXCEPTION 'machine % cannot be processing without a process: set current_process_id with the status',
                        NEW.id
                    USING ERRCODE = 'MS003';
                END IF;
            ELSIF
                was = 'processing'
                AND OLD.current_process_id IS NOT NULL
                AND NEW.current_process_id <> OLD.current_process_id
            THEN
                RAISE EXCEPTION 'machine % is busy: it is running process %', NEW.id, OLD.current_process_id
                USING ERRCODE = 'MS002',
                      DETAIL = 'refused process ' || NEW.current_process_id::text,
                      HINT = 'End the running process first (status idle, error or offline).';
            END IF;
        ELSIF NEW.current_process_id IS NOT NULL THEN
            IF TG_OP = 'UPDATE' AND NEW.current_process_id = OLD.current_process_id THEN
                -- The run ends with the status it ran in.
                NEW.current_process_id := NULL;
            ELSE
                RAISE EXCEPTION 'machine % cannot take process % while its status is %: set status processing with it',
                    NEW.id, NEW.current_process_id, machine_sync.quote_bounded(NEW.status)
                USING ERRCODE = 'MS003';
            END IF;
        END IF;

        -- (Nested, so that the hot path, already allowed, runs no query here: a
        -- condition with a subquery is a whole query however it short-circuits.)
        IF NOT allowed AND NEW.status IS DISTINCT FROM was AND was IS NOT NULL THEN
            IF NOT EXISTS (
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
        IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM was THEN
            NEW.status_since := now();
        ELSE
            NEW.status_since := OLD.status_since;
        END IF;
        NEW.updated_at := now();
    END IF;

    IF TG_OP = 'UPDATE' THEN
        UPDATE public.machine_state AS s
        SET
            current_state = NEW.status,
            state_since = NEW.status_since,
            process_id = NEW.current_process_id,
            is_failure_mode = (NEW.status = 'error'),
            failure_component = NEW.failure_component,
            failure_description = NEW.failure_description,
            updated_at = NEW.updated_at
        WHERE
            s.machine_id = NEW.id
            AND (
                s.current_state, s.state_since, s.process_id, s.is_failure_mode,
                s.failure_component, s.failure_description
            ) IS DISTINCT FROM (
                NEW.status::varchar, NEW.status_since, NEW.current_process_id,
                NEW.status = 'error', NEW.failure_component, NEW.failure_description
            );
        IF NOT FOUND THEN
            -- Either the row agrees already, or it is missing (drift made by
            -- bypassing triggers): then this write repairs it.
            INSERT INTO public.machine_state AS s (
                machine_id, current_state, state_since, process_id,
                is_failure_mode, failure_component, failure_description, updated_at
            ) VALUES (
                NEW.id, NEW.status, NEW.status_since, NEW.current_process_id,
                NEW.status = 'error', NEW.failure_component, NEW.failure_description,
                NEW.updated_at
            )
            ON CONFLICT (machine_id) DO NOTHING;
        END IF;
    END IF;
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION machine_sync.machines_sync() IS
'Checks and completes a write to machines, and writes its machine_state row.';

-- The new owner needs CREATE on the schema only while it is handed over.
GRANT CREATE ON SCHEMA machine_sync TO machine_sync_mirror;
ALTER FUNCTION machine_sync.machines_sync() OWNER TO machine_sync_mirror;
REVOKE CREATE ON SCHEMA machine_sync FROM machine_sync_mirror;

-- The WHEN clauses and the drift view spell out each column's IS DISTINCT
-- FROM: PostgreSQL expands a row comparison into nested ORs, which pg_dump
-- writes out flat, and it writes every implicit cast as an explicit one, so
-- a restored database would hold another expression tree than the
-- migration made (and `migrate status` would call the restored trigger
-- changed). Written flat with the casts spelled out, the restore
-- reproduces it.
CREATE OR REPLACE TRIGGER zz_machine_sync
BEFORE UPDATE ON public.machines
FOR EACH ROW
WHEN (
    old.status IS DISTINCT FROM new.status
    OR old.current_process_id IS DISTINCT FROM new.current_process_id
    OR old.failure_description IS DISTINCT FROM new.failure_description
    OR old.failure_component IS DISTINCT FROM new.failure_component
    OR old.status_since IS DISTINCT FROM new.status_since
    OR old.updated_at IS DISTINCT FROM new.updated_at
    OR old.id IS DISTINCT FROM new.id
)
EXECUTE FUNCTION machine_sync.machines_sync();

CREATE OR REPLACE TRIGGER zz_machine_sync_insert
BEFORE INSERT ON public.machines
FOR EACH ROW EXECUTE FUNCTION machine_sync.machines_sync();

CREATE OR REPLACE TRIGGER zz_machine_sync_insert_state
AFTER INSERT ON public.machines
FOR EACH ROW EXECUTE FUNCTION machine_sync.machines_sync();

-- A deleted machine's state row goes with it by the foreign key's cascade,
-- which does not fire in replica mode: on a logical replication subscriber
-- of machines alone (this and the three above set ENABLE ALWAYS, see
-- MIGRATING.md) this trigger deletes it instead. Elsewhere its WHEN is
-- false, so no delete ever queues it.
CREATE OR REPLACE TRIGGER zz_machine_sync_delete
AFTER DELETE ON public.machines
FOR EACH ROW
WHEN (pg_catalog.current_setting('session_replication_role') = 'replica')
EXECUTE FUNCTION machine_sync.machines_sync();
