-- Privileges: nothing grants more than a caller needs, and nothing a legacy
-- writer needs is taken away.
--
-- Guarantees:
-- * Everyone may read the status vocabulary, the transitions and the mode,
--   and call the helpers the triggers and legacy RPCs use with the caller's
--   privileges. Trigger functions are executable by their owners only:
--   triggers fire regardless, and nobody can attach ours to a table of
--   their own.
-- * The database's mirror role (machine_sync.mirror_role()) may read and
--   write machine_state (a row-level policy lets it see every row) and call
--   stored_machine(), its one read of machines: its one function is the
--   mirror. It has nothing in any other database.
-- * On both tables, only the owner may TRUNCATE, attach triggers
--   (TRIGGER), reference them from foreign keys (REFERENCES) or VACUUM
--   FULL, CLUSTER and REINDEX them (MAINTAIN, PostgreSQL 17 and later),
--   whichever roles they were granted to before;
--   only the owner deletes machine_state rows directly. (LOCK TABLE in the
--   modes that stop writers comes with UPDATE and DELETE too: a writer of
--   machines keeps it, anon, which writes neither table, has it not.)
-- * Every other grant the tables had stays. In compat, legacy writers keep
--   INSERT and UPDATE on machine_state, and their own privileges and
--   policies on machines decide what their writes may do.
-- * With Supabase's roles: anon (a visitor who has not logged in) only
--   reads; only service_role may see drift, call reconcile_v1() and switch the
--   mode; authenticated and service_role may call the legacy RPCs.
-- * On a plain PostgreSQL without those roles, the same statements apply to
--   PUBLIC only; the owner grants the rest as the application needs.

-- Default privileges the owner has for every schema (ALTER DEFAULT
-- PRIVILEGES without IN SCHEMA) gave what the migration made to the roles
-- they name: one could call stored_machine() (every machine, past row-level
-- security) or the mirror's function, write the rules, create objects in
-- these schemas, or rewrite the record of grants that the down migration
-- replays as the owner. So everything granted on machine-sync's schemas and
-- what they hold, to anyone but its owner, is taken back first; the grants
-- below are all there are. (The record of definitions, made last, calls
-- this for its own schema.)
CREATE OR REPLACE FUNCTION machine_sync.revoke_all_but_owners(schemas text[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    granted record;
BEGIN
    -- (Each name of its own type, so that each is quoted as its kind is.
    -- PUBLIC is the grantee 0, spelled public.)
    FOR granted IN
        SELECT DISTINCT
            o.schema_name,
            o.target,
            o.routine,
            coalesce(pg_catalog.pg_get_userbyid(nullif(a.grantee, 0)), 'public') AS grantee
        FROM (
            SELECT n.nspname AS schema_name, NULL::regclass AS target, NULL::regprocedure AS routine, n.nspacl AS acl, n.nspowner AS owner
            FROM pg_catalog.pg_namespace AS n
            WHERE n.nspname = ANY (schemas)
            UNION ALL
            SELECT NULL, c.oid::regclass, NULL, c.relacl, c.relowner
            FROM pg_catalog.pg_class AS c
            INNER JOIN pg_catalog.pg_namespace AS n ON c.relnamespace = n.oid
            WHERE n.nspname = ANY (schemas) AND c.relkind IN ('r', 'v', 'p', 'S')
            UNION ALL
            SELECT NULL, NULL, p.oid::regprocedure, p.proacl, p.proowner
            FROM pg_catalog.pg_proc AS p
            INNER JOIN pg_catalog.pg_namespace AS n ON p.pronamespace = n.oid
            WHERE n.nspname = ANY (schemas)
        ) AS o
        CROSS JOIN LATERAL pg_catalog.aclexplode(o.acl) AS a
        WHERE a.grantee <> o.owner
    LOOP
        IF granted.target IS NOT NULL THEN
            EXECUTE format('REVOKE ALL ON TABLE %s FROM %I CASCADE', granted.target, granted.grantee);
        ELSIF granted.routine IS NOT NULL THEN
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I CASCADE', granted.routine, granted.grantee);
        ELSE
            EXECUTE format('REVOKE ALL ON SCHEMA %I FROM %I CASCADE', granted.schema_name, granted.grantee);
        END IF;
    END LOOP;
END
$$;

DO $$
BEGIN
    PERFORM machine_sync.revoke_all_but_owners(ARRAY['machine_sync', 'machine_sync_revert']);
END
$$;

REVOKE ALL ON SCHEMA machine_sync FROM public;
GRANT USAGE ON SCHEMA machine_sync TO public;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA machine_sync FROM public;
REVOKE ALL ON ALL TABLES IN SCHEMA machine_sync FROM public;
GRANT SELECT ON
machine_sync.allowed_status,
machine_sync.status_alias,
machine_sync.allowed_transition,
machine_sync.settings
TO public;
GRANT EXECUTE ON FUNCTION
machine_sync.quote_bounded(text),
machine_sync.canonical_status(text),
machine_sync.normalize_status(text),
machine_sync.mode_v1(),
machine_sync.mirror_role(),
machine_sync.lock_machine(uuid, text)
TO public;

REVOKE ALL ON FUNCTION
public.atomic_update_machine_state(uuid, text, uuid, text, uuid, boolean, text),
public.atomic_complete_machine_state(uuid),
public.atomic_error_machine_state(uuid, text),
public.atomic_processing_machine_state(uuid, uuid)
FROM public;

-- DELETE on machine_state: only for a delete a logical replication
-- subscriber applies (zz_machine_sync_applied); the guard keeps refusing
-- everyone else's.
DO $$
DECLARE
    mirror constant name := machine_sync.mirror_role();
BEGIN
    EXECUTE format(
        'GRANT EXECUTE ON FUNCTION machine_sync.stored_machine(pg_catalog.uuid) TO %I', mirror
    );
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON public.machine_state TO %I', mirror);
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_policy AS p
        WHERE
            p.polrelid = 'public.machine_state'::pg_catalog.regclass
            AND p.polname = 'machine_sync_mirror'
    ) THEN
        EXECUTE format(
            'CREATE POLICY machine_sync_mirror ON public.machine_state TO %I USING (TRUE) WITH CHECK (TRUE)',
            mirror
        );
    END IF;
END
$$;

-- The owner's alone on both tables, taken from every role they are granted
-- to, PUBLIC, the API roles and any other (an application's own reporting
-- role, say): a trigger fires as the role that writes, so one attached to
-- machine_state would run as the mirror for the mirror's writes and write
-- machine_state past the guard, and one attached to machines would run as
-- the owner when reconcile_v1() repairs a machine. (Revoking a privilege of
-- a table revokes it on every column too. PUBLIC is the grantee 0, spelled
-- public.)
DO $$
DECLARE
    mirror constant name := machine_sync.mirror_role();
    owner_only text := 'TRUNCATE, TRIGGER, REFERENCES';
    grantee name;
BEGIN
    IF current_setting('server_version_num')::integer >= 170000 THEN
        owner_only := owner_only || ', MAINTAIN';
    END IF;
    FOR grantee IN
        SELECT DISTINCT coalesce(r.rolname, 'public')
        FROM pg_catalog.pg_class AS c
        LEFT JOIN pg_catalog.pg_attribute AS col
            ON c.oid = col.attrelid AND col.attnum > 0 AND NOT col.attisdropped
        CROSS JOIN LATERAL (
            SELECT x.grantee FROM pg_catalog.aclexplode(c.relacl) AS x
            UNION
            SELECT x.grantee FROM pg_catalog.aclexplode(col.attacl) AS x
        ) AS a
        LEFT JOIN pg_catalog.pg_roles AS r ON a.grantee = r.oid
        WHERE
            c.oid IN ('public.machines'::pg_catalog.regclass, 'public.machine_state'::pg_catalog.regclass)
            AND a.grantee <> c.relowner
            AND r.rolname IS DISTINCT FROM mirror
    LOOP
        EXECUTE format('REVOKE %s ON public.machines, public.machine_state FROM %I CASCADE', owner_only, grantee);
        EXECUTE format('REVOKE DELETE ON public.machine_state FROM %I CASCADE', grantee);
    END LOOP;
END
$$;

DO $$
DECLARE
    client_roles constant text[] := ARRAY['anon', 'authenticated', 'service_role'];
    supabase boolean := (
        SELECT count(*) = 3 FROM pg_catalog.pg_roles AS r WHERE r.rolname = ANY (client_roles)
    );
BEGIN
    IF NOT supabase THEN
        RETURN;  -- not a Supabase project: PUBLIC was handled above
    END IF;

    -- (What Supabase's default privileges gave them in machine_sync was
    -- taken back with every other grant there, above.)
    GRANT SELECT ON machine_sync.drift TO service_role;
    GRANT UPDATE (mode) ON machine_sync.settings TO service_role;
    GRANT EXECUTE ON FUNCTION machine_sync.reconcile_v1(), machine_sync.set_mode_v1(text)
    TO service_role;

    REVOKE ALL ON FUNCTION
    public.atomic_update_machine_state(uuid, text, uuid, text, uuid, boolean, text),
    public.atomic_complete_machine_state(uuid),
    public.atomic_error_machine_state(uuid, text),
    public.atomic_processing_machine_state(uuid, uuid)
    FROM anon, authenticated, service_role;
    GRANT EXECUTE ON FUNCTION
    public.atomic_update_machine_state(uuid, text, uuid, text, uuid, boolean, text),
    public.atomic_complete_machine_state(uuid),
    public.atomic_error_machine_state(uuid, text),
    public.atomic_processing_machine_state(uuid, uuid)
    TO authenticated, service_role;

    REVOKE INSERT, UPDATE, DELETE ON public.machines, public.machine_state FROM anon;
END
$$;
