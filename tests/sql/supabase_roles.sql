-- Supabase API roles and default privileges, for a plain PostgreSQL 15-18
-- server reached as a superuser. Re-runnable: every statement is idempotent.
--
-- Mirrors supabase/postgres:
--   migrations/db/init-scripts/00000000000000-initial-schema.sql
--     (roles, authenticator memberships, USAGE on public, default privileges)
--   migrations/db/migrations/20230529180330_alter_api_roles_for_inherit.sql
--     (anon, authenticated and service_role are switched to INHERIT)
-- Supabase runs the init scripts as `postgres` (migrate.sh: psql -U postgres),
-- so its unqualified ALTER DEFAULT PRIVILEGES belong to role postgres: they
-- apply to objects that postgres creates. Here that role is named explicitly
-- (FOR ROLE postgres), because our migrations also run as postgres.
-- Left out: supabase_admin (its own default privileges only matter for
-- objects it creates) and the extensions, auth and storage schemas.
--
-- PostgreSQL itself grants EXECUTE on every new function to PUBLIC, and
-- Supabase does not revoke that: anon and authenticated can execute a new
-- function in public through PUBLIC as well as through the defaults below.

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon;
    END IF;
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_roles WHERE rolname = 'authenticated'
    ) THEN
        CREATE ROLE authenticated;
    END IF;
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_roles WHERE rolname = 'service_role'
    ) THEN
        CREATE ROLE service_role;
    END IF;
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_roles WHERE rolname = 'authenticator'
    ) THEN
        CREATE ROLE authenticator;
    END IF;
END
$roles$;

-- Attributes are set on every run, so a role created earlier with other
-- attributes ends up as Supabase has it.
ALTER ROLE anon NOLOGIN INHERIT;
ALTER ROLE authenticated NOLOGIN INHERIT;
ALTER ROLE service_role NOLOGIN INHERIT BYPASSRLS;
ALTER ROLE authenticator LOGIN NOINHERIT;

-- Short statement timeouts for the API roles, as Supabase sets them.
ALTER ROLE anon SET statement_timeout = '3s';
ALTER ROLE authenticated SET statement_timeout = '8s';

-- PostgREST logs in as authenticator and switches to one of these roles.
-- Granted only when missing, so a re-run prints no notice.
DO $memberships$
DECLARE
    api_role text;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role']
    LOOP
        IF NOT EXISTS (
            SELECT
            FROM pg_catalog.pg_auth_members AS m
            WHERE
                m.roleid = api_role::regrole
                AND m.member = 'authenticator'::regrole
        ) THEN
            EXECUTE format('GRANT %I TO authenticator', api_role);
        END IF;
    END LOOP;
END
$memberships$;

GRANT USAGE ON SCHEMA public TO postgres, anon, authenticated, service_role;

ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
GRANT ALL ON TABLES TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
GRANT ALL ON FUNCTIONS TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
GRANT ALL ON SEQUENCES TO postgres, anon, authenticated, service_role;
