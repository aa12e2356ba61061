-- What machine-sync changes on tables it did not create, recorded so that
-- its down migration puts them back exactly: the two tables' grants (of the
-- tables and of their columns: revoking a privilege on a table revokes it on
-- every column too), the foreign key's name and rule, the id default.
--
-- Guarantees:
-- * Recorded once, the first time machine-sync is applied; applying again
--   records nothing new. The down migration drops this schema.
-- * Nothing here is readable or writable by anyone but the owner.

CREATE SCHEMA IF NOT EXISTS machine_sync_revert;
REVOKE ALL ON SCHEMA machine_sync_revert FROM public;

-- Every privilege granted on the two tables (column_name NULL) or on one of
-- their columns, to anyone but the owner. The grantee by name and by OID
-- (NULL for PUBLIC): a role dropped while machine-sync is installed gets
-- nothing back, nor does another role made since under its name.
CREATE TABLE IF NOT EXISTS machine_sync_revert.privilege (
    table_name text NOT NULL,
    column_name text,
    grantee text NOT NULL,
    grantee_oid oid,
    privilege_type text NOT NULL,
    is_grantable boolean NOT NULL,
    UNIQUE NULLS NOT DISTINCT (table_name, column_name, grantee, privilege_type)
);

CREATE TABLE IF NOT EXISTS machine_sync_revert.foreign_key (
    constraint_name text PRIMARY KEY,
    definition text NOT NULL
);

CREATE TABLE IF NOT EXISTS machine_sync_revert.column_default (
    column_name text PRIMARY KEY,
    default_expression text
);

DO $$
BEGIN
    IF
        EXISTS (SELECT FROM machine_sync_revert.column_default)
        OR to_regclass('public.machine_state') IS NULL
    THEN
        RETURN;  -- recorded already, or a fresh install: nothing to put back
    END IF;
    INSERT INTO machine_sync_revert.privilege
    SELECT
        c.oid::regclass::text,
        granted.column_name,
        coalesce(r.rolname, 'PUBLIC'),
        r.oid,
        a.privilege_type,
        a.is_grantable
    FROM pg_catalog.pg_class AS c
    CROSS JOIN LATERAL (
        SELECT
            NULL::pg_catalog.name AS column_name,
            c.relacl AS acl
        UNION ALL
        SELECT
            col.attname,
            col.attacl
        FROM pg_catalog.pg_attribute AS col
        WHERE col.attrelid = c.oid AND col.attnum > 0 AND NOT col.attisdropped
    ) AS granted
    CROSS JOIN LATERAL aclexplode(granted.acl) AS a
    LEFT JOIN pg_catalog.pg_roles AS r ON a.grantee = r.oid
    WHERE
        c.oid IN (
            'public.machines'::pg_catalog.regclass,
            'public.machine_state'::pg_catalog.regclass
        )
        AND a.grantee <> c.relowner;
    INSERT INTO machine_sync_revert.foreign_key
    SELECT conname, pg_get_constraintdef(oid)
    FROM pg_catalog.pg_constraint
    WHERE
        conrelid = 'public.machine_state'::pg_catalog.regclass
        AND contype = 'f'
        AND confrelid = 'public.machines'::pg_catalog.regclass;
    INSERT INTO machine_sync_revert.column_default
    SELECT 'machines.id', pg_get_expr(d.adbin, d.adrelid)
    FROM pg_catalog.pg_attribute AS a
    LEFT JOIN pg_catalog.pg_attrdef AS d
        ON a.attrelid = d.adrelid AND a.attnum = d.adnum
    WHERE a.attrelid = 'public.machines'::pg_catalog.regclass AND a.attname = 'id';
END
$$;
