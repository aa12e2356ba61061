-- Supabase's roles and default privileges, for a plain PostgreSQL 15-18
-- server reached as a superuser. Re-runnable: every statement is idempotent.
--
-- The owner of the application's tables is named by the setting
-- machine_sync_test.owner: `postgres` where the server's superuser has
-- another name (as on Supabase, whose superuser is supabase_admin), another
-- name where the superuser is itself called postgres. Either way it is what
-- Supabase's `postgres` is: NOSUPERUSER CREATEDB CREATEROLE REPLICATION
-- BYPASSRLS, the role that applies migrations and owns the tables.
--
-- Mirrors supabase/postgres:
--   migrations/db/init-scripts/00000000000000-initial-schema.sql
--     (roles, authenticator memberships, USAGE on public, default privileges)
--   migrations/db/migrations/20230529180330_alter_api_roles_for_inherit.sql
--     (anon, authenticated and service_role are switched to INHERIT)
-- Supabase's unqualified ALTER DEFAULT PRIVILEGES run as postgres, so they
-- apply to objects that postgres creates: here FOR ROLE <owner>.
--
-- PostgreSQL itself grants EXECUTE on every new function to PUBLIC, and
-- Supabase does not revoke that: anon and authenticated can execute a new
-- function in public through PUBLIC as well as through the defaults below.

DO $roles$
DECLARE
    owner_role constant text := current_setting('machine_sync_test.owner');
    api_role text;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role', 'authenticator']
    LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = api_role) THEN
            EXECUTE format('CREATE ROLE %I', api_role);
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = owner_role) THEN
        EXECUTE format('CREATE ROLE %I', owner_role);
    END IF;
    EXECUTE format(
        'ALTER ROLE %I LOGIN NOSUPERUSER INHERIT CREATEDB CREATEROLE REPLICATION BYPASSRLS',
        owner_role
    );

    -- Attributes are set on every run, so a role created earlier with other
    -- attributes ends up as Supabase has it.
    ALTER ROLE anon NOLOGIN INHERIT;
    ALTER ROLE authenticated NOLOGIN INHERIT;
    ALTER ROLE service_role NOLOGIN INHERIT BYPASSRLS;
    ALTER ROLE authenticator LOGIN NOINHERIT;
    ALTER ROLE anon SET statement_timeout = '3s';
    ALTER ROLE authenticated SET statement_timeout = '8s';
    ALTER ROLE authenticator SET lock_timeout = '8s';

    -- PostgREST logs in as authenticator and switches to one of these roles;
    -- the owner may switch to them too (the SQL editor's "role" menu).
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role']
    LOOP
        IF NOT pg_catalog.pg_has_role('authenticator', api_role, 'MEMBER') THEN
            EXECUTE format('GRANT %I TO authenticator', api_role);
        END IF;
        IF NOT pg_catalog.pg_has_role(owner_role, api_role, 'MEMBER') THEN
            EXECUTE format('GRANT %I TO %I', api_role, owner_role);
        END IF;
    END LOOP;

    EXECUTE format(
        'GRANT USAGE ON SCHEMA public TO %I, anon, authenticated, service_role', owner_role
    );
    EXECUTE format(
        'ALTER DEFAULT PRIVILEGES FOR ROLE %1$I IN SCHEMA public '
        'GRANT ALL ON TABLES TO %1$I, anon, authenticated, service_role',
        owner_role
    );
    EXECUTE format(
        'ALTER DEFAULT PRIVILEGES FOR ROLE %1$I IN SCHEMA public '
        'GRANT ALL ON FUNCTIONS TO %1$I, anon, authenticated, service_role',
        owner_role
    );
    EXECUTE format(
        'ALTER DEFAULT PRIVILEGES FOR ROLE %1$I IN SCHEMA public '
        'GRANT ALL ON SEQUENCES TO %1$I, anon, authenticated, service_role',
        owner_role
    );
END
$roles$;
