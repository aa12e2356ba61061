-- Revert machine-sync v1: back to two independently written tables, with
-- the grants (on the tables and on their columns), foreign key and id
-- default the tables had before v1 (recorded by v1 in machine_sync_revert).
-- Data is kept: machine_state holds every value machines gained (failure
-- details, status_since as state_since), so dropping those columns loses
-- nothing. That holds only without drift, so
-- while any machine drifts this refuses and changes nothing.

-- squawk-ignore-file require-statement-timeout
-- (squawk) No statement_timeout: the lock_timeout below caps the only long
-- wait these statements have, another session's lock; their own work is
-- bounded by one row per lab machine.
-- squawk-ignore-file ban-drop-function, ban-drop-schema, ban-drop-column
-- (squawk) Reverting drops what v1 added: its legacy RPC definitions, the
-- machine_sync, machine_sync_installed and machine_sync_revert schemas, and
-- machines' two failure columns, whose values machine_state keeps.

BEGIN;
SET LOCAL lock_timeout = '5s';
-- Names resolve in pg_catalog alone (everything else here is schema
-- qualified): a function created in a schema on the caller's search_path
-- (public is writable by every role in a database made before PostgreSQL
-- 15) can neither stand in for a built-in one nor run as the migrating role.
SET LOCAL search_path = pg_catalog, pg_temp;
-- The drift check below must see every row: where policies would hide some
-- from this role (FORCE ROW LEVEL SECURITY, no BYPASSRLS), it fails with
-- PostgreSQL's 42501 instead of finding no drift in what it cannot see.
SET LOCAL row_security = off;

-- Nothing in a schema of machine-sync's name that another role owns is
-- called (its owner could have put a lock_tables() of its own there, after a
-- revert, to run as this role). Then the tables, machines before
-- machine_state, as the migration takes them (machine_sync.lock_tables): a
-- transaction that read the drift view or wrote machine_state, and goes on,
-- never deadlocks with this one.
DO $$
DECLARE
    squatted text;
BEGIN
    SELECT
        string_agg(
            format('%I exists and is owned by %I', n.nspname, pg_get_userbyid(n.nspowner)),
            ', ' ORDER BY n.nspname COLLATE "C"
        )
    INTO squatted
    FROM pg_namespace AS n
    WHERE
        n.nspname IN ('machine_sync', 'machine_sync_revert', 'machine_sync_installed')
        AND pg_get_userbyid(n.nspowner) <> current_user;
    IF squatted IS NOT NULL THEN
        RAISE EXCEPTION 'machine-sync''s schema %, not by %: nothing in it is run, nothing is changed',
            squatted, current_user
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Revert as the owner of machine-sync''s schemas; a schema another role made is not machine-sync''s: check what is in it and drop it.';
    END IF;
    IF to_regprocedure('machine_sync.lock_tables()') IS NOT NULL THEN
        PERFORM machine_sync.lock_tables();
    END IF;
    -- The mirror role, for the end (its name goes with the schema). Set
    -- here in any case, empty where there is none: a value the session
    -- brought (set for the database or the role) must not name the role the
    -- end drops.
    IF to_regprocedure('machine_sync.mirror_role()') IS NOT NULL THEN
        PERFORM set_config('machine_sync.reverted_mirror_role', machine_sync.mirror_role(), true);
    ELSE
        PERFORM set_config('machine_sync.reverted_mirror_role', '', true);
    END IF;
END
$$;

DO $$
DECLARE
    drifting bigint;
BEGIN
    IF to_regclass('machine_sync.drift') IS NULL THEN
        RETURN;
    END IF;
    SELECT count(*) INTO drifting FROM machine_sync.drift;
    IF drifting > 0 THEN
        RAISE EXCEPTION 'refusing to revert machine-sync: %, and reverting drops machines columns that may hold the only copy of their values',
            CASE WHEN drifting = 1 THEN '1 machine drifts' ELSE drifting || ' machines drift' END
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = 'Repair first (machine-sync reconcile, or SELECT * FROM machine_sync.reconcile_v1()), then revert again.';
    END IF;
END
$$;

-- The drops below say nothing: PostgreSQL's notices of what a schema's
-- drop cascades to, or of what is gone already when this runs again, would
-- bury the ones this file raises itself (after them).
SET LOCAL client_min_messages = warning;

DROP TRIGGER IF EXISTS zz_machine_sync ON public.machines;
DROP TRIGGER IF EXISTS zz_machine_sync_insert ON public.machines;
DROP TRIGGER IF EXISTS zz_machine_sync_insert_state ON public.machines;
DROP TRIGGER IF EXISTS zz_machine_sync_applied ON public.machines;
DROP TRIGGER IF EXISTS machine_state_direct_write ON public.machine_state;
DROP TRIGGER IF EXISTS machine_state_carry_update ON public.machine_state;
DROP TRIGGER IF EXISTS machine_state_carry_insert ON public.machine_state;
DROP TRIGGER IF EXISTS machine_state_direct_delete ON public.machine_state;
DROP TRIGGER IF EXISTS machine_state_truncate_alone ON public.machine_state;
DROP POLICY IF EXISTS machine_sync_mirror ON public.machine_state;

DROP FUNCTION IF EXISTS public.atomic_processing_machine_state(uuid, uuid);
DROP FUNCTION IF EXISTS public.atomic_error_machine_state(uuid, text);
DROP FUNCTION IF EXISTS public.atomic_complete_machine_state(uuid);
DROP FUNCTION IF EXISTS public.atomic_update_machine_state(
    uuid, text, uuid, text, uuid, boolean, text
);

-- Nothing but machine-sync's own may use what is in its schemas: their
-- drops cascade (silently, above), and would take along an application's
-- view of them, a foreign key to the vocabulary, a column of one of their
-- types with its data. Such objects are named, at most ten, and nothing is
-- changed.
DO $$
DECLARE
    schemas constant name[] := ARRAY['machine_sync', 'machine_sync_installed', 'machine_sync_revert'];
    dependents text;
BEGIN
    WITH own AS (
        SELECT
            'pg_class'::regclass AS classid,
            c.oid AS objid
        FROM pg_class AS c
        INNER JOIN pg_namespace AS n ON c.relnamespace = n.oid
        WHERE n.nspname = ANY (schemas)
        UNION ALL
        SELECT
            'pg_proc'::regclass,
            p.oid
        FROM pg_proc AS p
        INNER JOIN pg_namespace AS n ON p.pronamespace = n.oid
        WHERE n.nspname = ANY (schemas)
        UNION ALL
        SELECT
            'pg_type'::regclass,
            t.oid
        FROM pg_type AS t
        INNER JOIN pg_namespace AS n ON t.typnamespace = n.oid
        WHERE n.nspname = ANY (schemas)
    ),

    outside AS (
        SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) AS object
        FROM pg_depend AS d
        WHERE
            d.deptype = 'n'
            AND (d.refclassid, d.refobjid) IN (SELECT o.classid, o.objid FROM own AS o)
            AND (d.classid, d.objid) NOT IN (SELECT o.classid, o.objid FROM own AS o)
            -- The parts of machine-sync's own tables and views.
            AND NOT EXISTS (
                SELECT FROM pg_rewrite AS r
                WHERE
                    d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
                    AND r.ev_class IN (SELECT o.objid FROM own AS o)
            )
            AND NOT EXISTS (
                SELECT FROM pg_constraint AS k
                WHERE
                    d.classid = 'pg_constraint'::regclass AND k.oid = d.objid
                    AND (k.conrelid IN (SELECT o.objid FROM own AS o) OR k.contypid IN (SELECT o.objid FROM own AS o))
            )
            AND NOT EXISTS (
                SELECT FROM pg_attrdef AS a
                WHERE
                    d.classid = 'pg_attrdef'::regclass AND a.oid = d.objid
                    AND a.adrelid IN (SELECT o.objid FROM own AS o)
            )
    )

    SELECT
        string_agg(q.object, ', ' ORDER BY q.object COLLATE "C")
        || CASE WHEN max(q.total) > 10 THEN format(' and %s more', max(q.total) - 10) ELSE '' END
    INTO dependents
    FROM (
        SELECT
            x.object,
            count(*) OVER () AS total
        FROM outside AS x
        ORDER BY x.object COLLATE "C"
        LIMIT 10
    ) AS q;
    IF dependents IS NOT NULL THEN
        RAISE EXCEPTION 'refusing to revert machine-sync: objects of the application use it, and dropping it would drop them (and a column''s data): %',
            dependents
        USING ERRCODE = 'dependent_objects_still_exist',
              HINT = 'Drop them, or change them not to use machine_sync, then revert again.';
    END IF;
END
$$;

DROP SCHEMA IF EXISTS machine_sync CASCADE;
-- The record of what v1 installed (written at the end of v1).
DROP SCHEMA IF EXISTS machine_sync_installed CASCADE;

ALTER TABLE public.machines
DROP COLUMN IF EXISTS failure_description,
DROP COLUMN IF EXISTS failure_component,
DROP COLUMN IF EXISTS status_since;

COMMENT ON TABLE public.machines IS NULL;
COMMENT ON COLUMN public.machines.status IS NULL;
COMMENT ON TABLE public.machine_state IS NULL;

SET LOCAL client_min_messages = notice;

DO $$
DECLARE
    item record;
    grantee text;
BEGIN
    IF to_regnamespace('machine_sync_revert') IS NULL THEN
        RETURN;  -- v1 is not applied: nothing to put back
    END IF;

    ALTER TABLE public.machine_state
    DROP CONSTRAINT IF EXISTS machine_state_machine_id_fkey;
    FOR item IN SELECT * FROM machine_sync_revert.foreign_key LOOP
        EXECUTE format(
            'ALTER TABLE public.machine_state ADD CONSTRAINT %I %s',
            item.constraint_name, item.definition
        );
    END LOOP;

    FOR item IN SELECT * FROM machine_sync_revert.column_default LOOP
        EXECUTE format(
            'ALTER TABLE public.machines ALTER COLUMN id %s',
            coalesce('SET DEFAULT ' || item.default_expression, 'DROP DEFAULT')
        );
    END LOOP;

    -- Every grantee of a table or of one of its columns: REVOKE ALL on the
    -- table revokes its column privileges too.
    FOR item IN
        SELECT DISTINCT c.oid::regclass::text AS table_name, a.grantee
        FROM pg_catalog.pg_class AS c
        LEFT JOIN pg_catalog.pg_attribute AS col
            ON c.oid = col.attrelid AND col.attnum > 0 AND NOT col.attisdropped
        CROSS JOIN LATERAL (
            SELECT x.grantee FROM aclexplode(c.relacl) AS x
            UNION
            SELECT x.grantee FROM aclexplode(col.attacl) AS x
        ) AS a
        WHERE
            c.oid IN ('public.machines'::regclass, 'public.machine_state'::regclass)
            AND a.grantee <> c.relowner
    LOOP
        EXECUTE format(
            'REVOKE ALL ON %s FROM %s', item.table_name,
            CASE WHEN item.grantee = 0 THEN 'PUBLIC' ELSE item.grantee::regrole::text END
        );
    END LOOP;
    -- A grantee is found by its OID, under its name now: a role dropped
    -- since gets nothing back (nor does another role made under its name).
    FOR item IN SELECT * FROM machine_sync_revert.privilege LOOP
        IF item.grantee_oid IS NULL THEN
            grantee := 'PUBLIC';
        ELSE
            SELECT quote_ident(r.rolname) INTO grantee
            FROM pg_roles AS r WHERE r.oid = item.grantee_oid;
            IF NOT FOUND THEN
                RAISE NOTICE 'role % (granted before machine-sync) no longer exists: % on % is not put back',
                    item.grantee, item.privilege_type,
                    item.table_name || coalesce('.' || quote_ident(item.column_name), '');
                CONTINUE;
            END IF;
        END IF;
        EXECUTE format(
            'GRANT %s%s ON %s TO %s%s', item.privilege_type,
            coalesce(' (' || quote_ident(item.column_name) || ')', ''), item.table_name,
            grantee,
            CASE WHEN item.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END
        );
    END LOOP;
END
$$;

SET LOCAL client_min_messages = warning;
DROP SCHEMA IF EXISTS machine_sync_revert CASCADE;
SET LOCAL client_min_messages = notice;

-- The database's mirror role. A copy of this database restored from a dump
-- into another database of the cluster uses it too; then it is kept. One
-- that another role made (an administrator, beforehand) and granted without
-- ADMIN OPTION is its maker's to drop (PostgreSQL 16+).
DO $$
DECLARE
    mirror constant text := current_setting('machine_sync.reverted_mirror_role', true);
BEGIN
    IF mirror <> '' AND EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = mirror) THEN
        EXECUTE format('DROP OWNED BY %I', mirror);
        BEGIN
            EXECUTE format('DROP ROLE %I', mirror);
        EXCEPTION
            WHEN dependent_objects_still_exist THEN
                RAISE NOTICE 'role % is kept: another database still uses it', quote_ident(mirror);
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'role % is kept: % may not drop it (another role made it); its maker can',
                    quote_ident(mirror), current_user;
        END;
    END IF;
END
$$;

COMMIT;
