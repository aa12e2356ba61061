-- Five Supabase database-linter (splinter) security lints, one row per
-- violation: (lint, object, detail). Needs the roles of supabase_roles.sql.
--
-- Adapted from supabase/splinter:
--   lints/0010_security_definer_view.sql
--   lints/0011_function_search_path_mutable.sql
--   lints/0013_rls_disabled_in_public.sql
--   lints/0028_anon_security_definer_function_executable.sql
--   lints/0029_authenticated_security_definer_function_executable.sql
-- Splinter reads the exposed schemas from pgrst.db_schemas (default
-- 'public'); here they are the `exposed` constant below.
-- Scope, as in splinter:
--   0010, 0028, 0029: exposed schemas only, minus the system list.
--   0011: every schema except the system list (exposed or not), and any
--         search_path setting passes, not only search_path = ''.
--   0010, 0011 skip objects that belong to an extension; splinter's
--   0028 and 0029 do not, and neither do they here.

WITH exposed (schema_name) AS (
    VALUES ('public')
),

-- The schemas splinter never lints (Supabase and extension internals).
system_schemas (schema_name) AS (
    VALUES
    ('_timescaledb_cache'), ('_timescaledb_catalog'),
    ('_timescaledb_config'), ('_timescaledb_internal'),
    ('auth'), ('cron'), ('extensions'), ('graphql'), ('graphql_public'),
    ('information_schema'), ('net'), ('pgmq'), ('pgroonga'), ('pgsodium'),
    ('pgsodium_masks'), ('pgtle'), ('pgbouncer'), ('pg_catalog'),
    ('realtime'), ('repack'), ('storage'), ('supabase_functions'),
    ('supabase_migrations'), ('tiger'), ('topology'), ('vault')
),

-- Objects that belong to an extension.
extension_members AS (
    SELECT
        dep.classid,
        dep.objid
    FROM pg_catalog.pg_depend AS dep
    WHERE dep.deptype = 'e'
),

-- Views that anon or authenticated can read and that run with the
-- privileges of their owner (no security_invoker option).
definer_views AS (
    SELECT
        n.nspname AS schema_name,
        c.relname AS view_name
    FROM pg_catalog.pg_class AS c
    INNER JOIN pg_catalog.pg_namespace AS n ON c.relnamespace = n.oid
    WHERE
        c.relkind = 'v'
        AND (
            pg_catalog.has_table_privilege('anon', c.oid, 'SELECT')
            OR pg_catalog.has_table_privilege('authenticated', c.oid, 'SELECT')
        )
        AND n.nspname IN (SELECT e.schema_name FROM exposed AS e)
        AND n.nspname NOT IN (SELECT s.schema_name FROM system_schemas AS s)
        AND NOT EXISTS (
            SELECT
            FROM extension_members AS x
            WHERE
                x.classid = 'pg_catalog.pg_class'::regclass
                AND x.objid = c.oid
        )
        AND NOT (
            lower(coalesce(c.reloptions::text, '{}'))::text[]
            && ARRAY[
                'security_invoker=1',
                'security_invoker=true',
                'security_invoker=yes',
                'security_invoker=on'
            ]
        )
),

-- Every function, procedure and aggregate outside the system schemas.
functions AS (
    SELECT
        p.oid,
        p.proname AS function_name,
        p.prosecdef AS is_security_definer,
        p.proconfig,
        n.nspname AS schema_name,
        pg_catalog.pg_get_function_identity_arguments(p.oid) AS function_args,
        p.oid IN (
            SELECT x.objid
            FROM extension_members AS x
            WHERE x.classid = 'pg_catalog.pg_proc'::regclass
        ) AS is_extension_member
    FROM pg_catalog.pg_proc AS p
    INNER JOIN pg_catalog.pg_namespace AS n ON p.pronamespace = n.oid
    WHERE n.nspname NOT IN (SELECT s.schema_name FROM system_schemas AS s)
),

-- SECURITY DEFINER functions in an exposed schema, with who can run them
-- (directly, through PUBLIC, or through a role they inherit).
exposed_definer_functions AS (
    SELECT
        f.schema_name,
        f.function_name,
        f.function_args,
        pg_catalog.has_function_privilege('anon', f.oid, 'EXECUTE')
            AS anon_can_execute,
        pg_catalog.has_function_privilege('authenticated', f.oid, 'EXECUTE')
            AS authenticated_can_execute
    FROM functions AS f
    WHERE
        f.is_security_definer
        AND f.schema_name IN (SELECT e.schema_name FROM exposed AS e)
),

-- One row per violation.
violations (lint, object, detail) AS (
    SELECT
        '0010_security_definer_view',
        format('%s.%s', v.schema_name, v.view_name),
        format(
            'View `%s.%s` is defined with the SECURITY DEFINER property',
            v.schema_name,
            v.view_name
        )
    FROM definer_views AS v

    UNION ALL

    -- splinter 0013_rls_disabled_in_public: tables in an exposed schema
    -- without Row Level Security are open to every API role.
    SELECT
        '0013_rls_disabled_in_public',
        format('%s.%s', n.nspname, c.relname),
        format(
            'Table `%s.%s` is public, but RLS has not been enabled.',
            n.nspname,
            c.relname
        )
    FROM pg_catalog.pg_class AS c
    INNER JOIN pg_catalog.pg_namespace AS n ON c.relnamespace = n.oid
    WHERE
        c.relkind = 'r'
        AND NOT c.relrowsecurity
        AND n.nspname IN (SELECT e.schema_name FROM exposed AS e)

    UNION ALL

    SELECT
        '0011_function_search_path_mutable',
        format('%s.%s(%s)', f.schema_name, f.function_name, f.function_args),
        format(
            'Function `%s.%s` has a role mutable search_path',
            f.schema_name,
            f.function_name
        )
    FROM functions AS f
    WHERE
        NOT f.is_extension_member
        AND NOT EXISTS (
            SELECT
            FROM unnest(coalesce(f.proconfig, '{}')) AS config (setting)
            WHERE config.setting LIKE 'search_path=%'
        )

    UNION ALL

    SELECT
        '0028_anon_security_definer_function_executable',
        format('%s.%s(%s)', d.schema_name, d.function_name, d.function_args),
        format(
            'Function `%s.%s(%s)` can be executed by the `anon` role as a '
            '`SECURITY DEFINER` function via `/rest/v1/rpc/%s`.',
            d.schema_name,
            d.function_name,
            d.function_args,
            d.function_name
        )
    FROM exposed_definer_functions AS d
    WHERE d.anon_can_execute

    UNION ALL

    SELECT
        '0029_authenticated_security_definer_function_executable',
        format('%s.%s(%s)', d.schema_name, d.function_name, d.function_args),
        format(
            'Function `%s.%s(%s)` can be executed by the `authenticated` '
            'role as a `SECURITY DEFINER` function via `/rest/v1/rpc/%s`.',
            d.schema_name,
            d.function_name,
            d.function_args,
            d.function_name
        )
    FROM exposed_definer_functions AS d
    WHERE d.authenticated_can_execute
)

SELECT
    v.lint,
    v.object,
    v.detail
FROM violations AS v
ORDER BY v.lint, v.object;
