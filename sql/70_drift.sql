-- Drift: machines whose machine_state row is missing or disagrees.
--
-- Drift cannot arise while the triggers run; it can only come from
-- bypassing them (session_replication_role = replica during a data-only
-- restore, ALTER TABLE ... DISABLE TRIGGER) or from data that predates
-- machine-sync.
--
-- Guarantees:
-- * machine_sync.drift lists every such machine, one row each, and is empty
--   in normal operation. It runs with the caller's privileges
--   (security_invoker), so it never shows rows RLS hides from the caller.
-- * machine_sync.reconcile_v1() repairs every drifted machine it can, from
--   machines, and returns one row per drifted machine saying whether it was
--   repaired and, when not, why (a status outside the vocabulary, a rule
--   the stored row breaks). One machine it cannot repair does not stop the
--   others.

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
            m.status <> s.current_state::text
            AND machine_sync.canonical_status(m.status)
            = machine_sync.canonical_status(s.current_state::text)
            THEN 'status_case'
        WHEN m.status NOT IN (SELECT a.status FROM machine_sync.allowed_status AS a)
            THEN 'noncanonical_status'
        ELSE 'value_mismatch'
    END AS problem
FROM public.machines AS m
FULL OUTER JOIN public.machine_state AS s ON m.id = s.machine_id
-- (Column by column, not a row comparison, and each cast written out, so
-- that a restore reproduces the view exactly: see zz_machine_sync in
-- 50_mirror.sql.) A status is canonical exactly when it is one of
-- allowed_status (which holds only lower-case, trimmed spellings): the
-- vocabulary is hashed once per query, rather than canonical_status() called
-- for every machine, which on a large legacy database is most of what the
-- migration's repair would cost.
WHERE
    m.id IS NULL
    OR s.machine_id IS NULL
    OR m.status NOT IN (SELECT a.status FROM machine_sync.allowed_status AS a)
    OR m.status IS DISTINCT FROM s.current_state::text
    OR m.status_since IS DISTINCT FROM s.state_since
    OR m.current_process_id IS DISTINCT FROM s.process_id
    OR (m.status = 'error') IS DISTINCT FROM s.is_failure_mode
    OR m.failure_description IS DISTINCT FROM s.failure_description
    OR m.failure_component IS DISTINCT FROM s.failure_component;

COMMENT ON VIEW machine_sync.drift IS
'Machines whose machine_state row is missing, orphaned or disagrees. '
'Empty in normal operation; repair with SELECT * FROM machine_sync.reconcile_v1().';

-- It runs as the owner of the tables, whom their policies do not filter.
-- Where they would (FORCE ROW LEVEL SECURITY and an owner without
-- BYPASSRLS), a machine they hide would look missing and its state row
-- orphaned, to be deleted: then it refuses (42501) and changes nothing.
-- (Not row_security = off, which would hold for the mirror's own writes
-- of machine_state, nested in its repairs, too.)
CREATE OR REPLACE FUNCTION machine_sync.reconcile_v1()
RETURNS TABLE (machine_id uuid, problem text, repaired boolean, reason text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found record;
    failure text;
BEGIN
    IF current_setting('session_replication_role') = 'replica' THEN
        RAISE EXCEPTION 'reconcile needs the machine-sync triggers, which do not fire while session_replication_role = replica'
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = 'SET session_replication_role = origin; then call it again.';
    END IF;
    IF row_security_active('public.machines') OR row_security_active('public.machine_state') THEN
        RAISE EXCEPTION 'reconcile must see every machine and state row, and row-level security policies filter what % sees: a machine they hide would look missing, its state row orphaned',
            current_user
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'The tables force row-level security on their owner: give it BYPASSRLS (or ALTER TABLE ... NO FORCE ROW LEVEL SECURITY), then call it again.';
    END IF;
    FOR found IN
        SELECT d.machine_id, d.problem, d.status, machine_sync.canonical_status(d.status) AS canonical
        FROM machine_sync.drift AS d
        ORDER BY d.machine_id
    LOOP
        failure := NULL;
        BEGIN
            IF found.problem = 'orphaned_state' THEN
                -- Foreign keys are not checked in replica mode. The delete
                -- guard allows it: the machine does not exist.
                DELETE FROM public.machine_state AS s WHERE s.machine_id = found.machine_id;
            ELSIF found.canonical IS NULL THEN
                failure := format(
                    'status %s is not in machine_sync.allowed_status: add it there '
                    '(or an alias to machine_sync.status_alias), or correct the machine',
                    machine_sync.quote_bounded(found.status)
                );
            ELSE
                -- Any write of a watched column re-runs the mirror, which
                -- canonicalizes the status and rewrites the state row.
                -- (updated_at must differ from the stored one to fire it.
                -- The status as found unless a writer changed it since.)
                UPDATE public.machines AS m
                SET
                    status = CASE
                        WHEN m.status = found.status THEN found.canonical
                        ELSE machine_sync.canonical_status(m.status)
                    END,
                    updated_at = CASE
                        WHEN m.updated_at = now() THEN now() - interval '1 microsecond'
                        ELSE now()
                    END
                WHERE m.id = found.machine_id;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            failure := SQLERRM;
        END;
        machine_id := found.machine_id;
        problem := found.problem;
        repaired := failure IS NULL AND NOT EXISTS (
            SELECT FROM machine_sync.drift AS d WHERE d.machine_id = found.machine_id
        );
        reason := CASE
            WHEN failure IS NOT NULL THEN failure
            WHEN NOT repaired THEN 'still drifting after the repair: is a machine-sync trigger disabled?'
        END;
        RETURN NEXT;
    END LOOP;
END
$$;

COMMENT ON FUNCTION machine_sync.reconcile_v1() IS
'Repairs every row of machine_sync.drift from machines; one result row per drifted machine.';
