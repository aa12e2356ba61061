-- The catalog's record of what the migration installs, appended to it by
-- build_migration.py (after every object of sql/, in the same transaction).
--
-- machine_sync_installed.definition holds an md5 of each function, trigger
-- (with its enabled state) and view machine-sync installs, as the migration
-- left them. machine_sync_installed.problems_v1() compares the live catalog
-- with it: it reads the catalog only (ACCESS SHARE on catalogs and the
-- record, none on machines or machine_state, nothing replayed), so
-- `machine-sync migrate status` and `migrate verify` can look
-- at a production database at any time. The record lives beside
-- machine_sync, not in it, so that machine_sync holds exactly what sql/
-- describes; the revert of the migration drops it with the objects.

CREATE SCHEMA IF NOT EXISTS machine_sync_installed;

COMMENT ON SCHEMA machine_sync_installed IS
'machine-sync: md5 of each function, trigger and view as the migrations installed them.';

REVOKE ALL ON SCHEMA machine_sync_installed FROM public;

CREATE TABLE IF NOT EXISTS machine_sync_installed.definition (
    kind text NOT NULL,
    object_name text NOT NULL,
    digest text NOT NULL,
    migration text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, object_name)
);

COMMENT ON TABLE machine_sync_installed.definition IS
'One row per function, trigger and view a migration installed: md5 of its definition.';

-- The objects a catalog object depends on, by name, in a fixed order: the
-- part of a trigger's or a view's definition that its stored tree names by
-- oid, which a restore changes.
CREATE OR REPLACE FUNCTION machine_sync_installed.depends_on(catalog regclass, object_id oid)
RETURNS text
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(described.name, ', ' ORDER BY described.name COLLATE "C")
    FROM (
        SELECT pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid) AS name
        FROM pg_depend AS d
        WHERE d.classid = depends_on.catalog AND d.objid = depends_on.object_id
    ) AS described
$$;

-- The definitions as the catalog holds them now: functions and views in
-- schema machine_sync, the legacy RPCs in public, and the triggers that call
-- machine_sync functions (a disabled trigger is not the shipped trigger).
-- The fixed search_path makes names and digests independent of the caller's.
CREATE OR REPLACE FUNCTION machine_sync_installed.live()
RETURNS TABLE (kind text, object_name text, digest text, enabled boolean)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT
        'function' AS kind,
        p.oid::regprocedure::text AS object_name,
        -- Who owns it too: the mirror works only as the mirror role's, and
        -- a restore by a non-superuser (or with --no-owner) leaves it the
        -- restorer's. By name as it is: to_regrole() would read it as SQL
        -- spells one (a capital folded, a dot or a quote refused), and a
        -- role is named after its database, which may hold any of them.
        md5(concat_ws(
            '|',
            pg_catalog.pg_get_functiondef(p.oid),
            (pg_catalog.pg_get_userbyid(p.proowner) = machine_sync.mirror_role())::text
        )) AS digest,
        NULL::boolean AS enabled
    FROM pg_catalog.pg_proc AS p
    WHERE
        p.prokind IN ('f', 'p')
        AND (
            p.pronamespace = to_regnamespace('machine_sync')
            OR (
                p.pronamespace = 'public'::regnamespace
                AND p.proname IN (
                    'atomic_update_machine_state',
                    'atomic_complete_machine_state',
                    'atomic_error_machine_state',
                    'atomic_processing_machine_state'
                )
            )
        )
    UNION ALL
    SELECT
        'trigger' AS kind,
        t.tgname || ' on ' || t.tgrelid::regclass::text AS object_name,
        -- The catalog row, not pg_get_triggerdef(): deparsing a WHEN clause
        -- takes ACCESS SHARE on the table, and looking must lock nothing.
        md5(
            concat_ws(
                '|',
                t.tgfoid::regprocedure::text,
                t.tgtype::text,
                -- ENABLE ALWAYS fires wherever ENABLE (origin) does. The
                -- applied-row trigger is installed disabled, and a subscriber
                -- of machines alone enables it for replica mode only (its
                -- documented set-up): both are as installed.
                CASE
                    WHEN t.tgenabled = 'A' THEN 'O'
                    WHEN t.tgname = 'zz_machine_sync_applied' AND t.tgenabled = 'R' THEN 'D'
                    ELSE t.tgenabled
                END,
                -- The column list by name: a restored table may number its
                -- columns otherwise.
                (
                    SELECT string_agg(a.attname::text, ',' ORDER BY a.attname::text COLLATE "C")
                    FROM pg_catalog.pg_attribute AS a
                    WHERE a.attrelid = t.tgrelid AND a.attnum = ANY(t.tgattr)
                ),
                encode(t.tgargs, 'hex'),
                -- Parse positions and object ids left out: a restore (pg_dump)
                -- re-parses the WHEN clause from its deparsed text, with other
                -- positions, in a database whose objects have other oids.
                regexp_replace(
                    t.tgqual::text,
                    ' :(location|stmt_location|stmt_len|relid|resorigtbl|funcid|checkAsUser) -?[0-9]+', '', 'g'
                ),
                t.tgdeferrable::text,
                t.tginitdeferred::text,
                t.tgoldtable::text,
                t.tgnewtable::text,
                -- What the trigger refers to, by name (the oids were left out).
                machine_sync_installed.depends_on('pg_catalog.pg_trigger'::regclass, t.oid)
            )
        ) AS digest,
        t.tgenabled IN ('O', 'A') OR t.tgname = 'zz_machine_sync_applied' AS enabled
    FROM pg_catalog.pg_trigger AS t
    INNER JOIN pg_catalog.pg_proc AS p ON t.tgfoid = p.oid
    WHERE
        NOT t.tgisinternal
        AND p.pronamespace = to_regnamespace('machine_sync')
    UNION ALL
    SELECT
        'view' AS kind,
        c.oid::regclass::text AS object_name,
        -- The stored query tree, not pg_get_viewdef(): deparsing a view takes
        -- ACCESS SHARE on every table it reads, and looking must lock nothing.
        -- (Without parse positions and object ids, as a trigger's WHEN.)
        md5(concat_ws(
            '|',
            regexp_replace(
                r.ev_action::text,
                ' :(location|stmt_location|stmt_len|relid|resorigtbl|funcid|checkAsUser) -?[0-9]+', '', 'g'
            ),
            -- What the view reads and calls, by name (the oids were left out).
            machine_sync_installed.depends_on('pg_catalog.pg_rewrite'::regclass, r.oid)
        )) AS digest,
        NULL::boolean AS enabled
    FROM pg_catalog.pg_class AS c
    INNER JOIN pg_catalog.pg_rewrite AS r ON c.oid = r.ev_class AND r.rulename = '_RETURN'
    WHERE
        c.relkind IN ('v', 'm')
        AND c.relnamespace = to_regnamespace('machine_sync')
$$;

-- Each object that is not as recorded: changed, disabled, missing (dropped)
-- or unexpected (in machine_sync but installed by no migration).
CREATE OR REPLACE FUNCTION machine_sync_installed.problems_v1()
RETURNS TABLE (kind text, object_name text, problem text)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT found.kind, found.object_name, found.problem
    FROM (
        SELECT
            coalesce(r.kind, l.kind) AS kind,
            coalesce(r.object_name, l.object_name) AS object_name,
            CASE
                WHEN l.digest IS NULL THEN 'missing'
                WHEN r.digest IS NULL THEN 'unexpected'
                WHEN l.enabled IS FALSE THEN 'disabled'
                ELSE 'changed'
            END AS problem
        FROM machine_sync_installed.definition AS r
        FULL JOIN machine_sync_installed.live() AS l
            ON r.kind = l.kind AND r.object_name = l.object_name
        WHERE r.digest IS DISTINCT FROM l.digest
        UNION ALL
        -- The mirror role, if it became one that others can be since the
        -- migration checked it (granted to a role, made able to log in):
        -- those others could write machine_state past the guard.
        SELECT
            'role' AS kind,
            machine_sync.mirror_role()::text AS object_name,
            'exposed: ' || string_agg(e.problem, ', ' ORDER BY e.problem COLLATE "C") AS problem
        FROM machine_sync.mirror_role_exposure(
            machine_sync.mirror_role(),
            (SELECT pg_get_userbyid(c.relowner) FROM pg_class AS c WHERE c.oid = 'public.machines'::regclass)
        ) AS e (problem)
        HAVING count(*) > 0
    ) AS found
    ORDER BY 1, 2
$$;

-- Replace the record with the catalog as it is now (the end of a migration).
CREATE OR REPLACE FUNCTION machine_sync_installed.record(migration text)
RETURNS bigint
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM machine_sync_installed.definition;
    WITH recorded AS (
        INSERT INTO machine_sync_installed.definition (kind, object_name, digest, migration)
        SELECT l.kind, l.object_name, l.digest, record.migration
        FROM machine_sync_installed.live() AS l
        RETURNING 1
    )
    SELECT count(*) FROM recorded;
$$;

REVOKE ALL ON FUNCTION machine_sync_installed.depends_on(regclass, oid) FROM public;
REVOKE ALL ON FUNCTION machine_sync_installed.live() FROM public;
REVOKE ALL ON FUNCTION machine_sync_installed.problems_v1() FROM public;
REVOKE ALL ON FUNCTION machine_sync_installed.record(text) FROM public;

-- What the owner's default privileges for every schema granted here to
-- anyone (its record and functions are the owner's alone: 90_grants.sql).
DO $$
BEGIN
    PERFORM machine_sync.revoke_all_but_owners(ARRAY['machine_sync_installed']);
END
$$;
