-- machine-sync v1: machines becomes the single write target; machine_state
-- follows it in the same transaction, and the state rules hold for every
-- writer. Takes the baseline (an empty install or the legacy production
-- database, with its data) to the schema described in sql/. Idempotent:
-- applying it again changes nothing.
--
-- Generated from sql/ by python_client/tools/build_migration.py: edit the
-- files there and run it; CI fails when this file is out of date.

-- squawk-ignore-file require-statement-timeout
-- (squawk) No statement_timeout: the lock_timeout below caps the only long
-- wait these statements have, another session's lock; their own work is
-- bounded by one row per lab machine.

BEGIN;
SET LOCAL lock_timeout = '5s';
-- Names resolve in pg_catalog alone (everything else here is schema
-- qualified): a function created in a schema on the caller's search_path
-- (public is writable by every role in a database made before PostgreSQL
-- 15) can neither stand in for a built-in one nor run as the migrating role.
SET LOCAL search_path = pg_catalog, pg_temp;

-- ---------------------------------------------------------------------------
-- sql/00_schema.sql
-- ---------------------------------------------------------------------------

-- machine-sync: the schema that holds every internal object, and the role
-- the mirror runs as.
--
-- Guarantees:
-- * Nothing internal lives in `public`, which PostgREST exposes. The two
--   legacy tables and the legacy RPC functions stay in `public` because
--   deployed clients name them.
-- * The mirror (50_mirror.sql) runs as the database's own mirror role,
--   `machine_sync_mirror_<database>` (machine_sync.mirror_role() names
--   it), a role nobody logs in as and no client role is granted. A write to
--   machine_state is the mirror's exactly when it runs as that role
--   (`current_user`), which no setting, foreign-key action or trigger of a
--   client's can fake. It is made by the first migration of the database
--   (it needs CREATEROLE, which Supabase's `postgres` has) and granted to
--   the migrating role, so that it can hand the mirror's function to it.
--   The role of one database has no privilege in another, so the owner of
--   another database of the cluster, a member of its own mirror role, is
--   an ordinary caller here. (On PostgreSQL 15 a CREATEROLE role may grant
--   itself any role that is not a superuser: there, owners that do not
--   trust each other must not have CREATEROLE.)
-- * Its schemas (machine_sync, machine_sync_revert, machine_sync_installed)
--   are its own: one that exists already and belongs to another role is
--   refused before anything is made. Its owner could drop and replace what
--   the migration puts in it (functions the mirror and the SECURITY DEFINER
--   functions call) or, in machine_sync_revert, read and rewrite the record
--   of the grants the down migration puts back.
-- * The mirror role, if made beforehand (by an administrator), must be a
--   role nobody else can be: not one that can log in, not a superuser, not
--   granted to an API role or to any role but the migrating one (nor held
--   with ADMIN OPTION by the CREATEROLE role that made it), and owning
--   nothing in the database but the mirror's function. Otherwise it is
--   refused, before anything is made.
-- * It is applied by the role that owns the two tables (Supabase's
--   `postgres`). Its SECURITY DEFINER functions run as the role that
--   creates them and must run as that owner: not as a superuser, which
--   would give them more than they need, nor as a member of the owner's
--   role, whose own privileges would decide. So any other role is refused
--   before anything is created.

DO $$
DECLARE
    owners text;
    squatted text;
BEGIN
    SELECT
        string_agg(
            format('%I.%I (owned by %I)', n.nspname, c.relname, pg_catalog.pg_get_userbyid(c.relowner)),
            ', ' ORDER BY c.relname COLLATE "C"
        )
    INTO owners
    FROM pg_catalog.pg_class AS c
    INNER JOIN pg_catalog.pg_namespace AS n ON c.relnamespace = n.oid
    WHERE
        c.oid IN (
            pg_catalog.to_regclass('public.machines'),
            pg_catalog.to_regclass('public.machine_state')
        )
        AND pg_catalog.pg_get_userbyid(c.relowner) <> current_user;
    IF owners IS NOT NULL THEN
        RAISE EXCEPTION 'machine-sync must be applied by the owner of its tables, not by %: %',
            current_user, owners
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Connect as the tables'' owner, or run SET ROLE to it first (with psql: PGOPTIONS=''-c role=<owner>'').';
    END IF;
    SELECT
        string_agg(
            format('%I exists and is owned by %I', n.nspname, pg_catalog.pg_get_userbyid(n.nspowner)),
            ', ' ORDER BY n.nspname COLLATE "C"
        )
    INTO squatted
    FROM pg_catalog.pg_namespace AS n
    WHERE
        n.nspname IN ('machine_sync', 'machine_sync_revert', 'machine_sync_installed')
        AND pg_catalog.pg_get_userbyid(n.nspowner) <> current_user;
    IF squatted IS NOT NULL THEN
        RAISE EXCEPTION 'machine-sync''s schema %, not by %: its owner could replace what machine-sync puts in it',
            squatted, current_user
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Check what is in it; drop it (or, if it is machine-sync''s own, give it to the tables'' owner with ALTER SCHEMA ... OWNER TO), then migrate again.';
    END IF;
END
$$;

CREATE SCHEMA IF NOT EXISTS machine_sync;

COMMENT ON SCHEMA machine_sync IS
'machine-sync internals: status vocabulary, transitions, mode, triggers, drift view.';

-- Locks the tables a migration changes before it changes any: machines
-- first, the order every writer takes them in, queueing for it at most half
-- of deadlock_timeout at a time (those that come after wait behind it only
-- so long), again 10 ms later, until lock_timeout; then machine_state and every table and view
-- of machine_sync (the drift view, the status vocabulary, the mode). Were
-- one busy, its holder may be a transaction that wrote it and will write
-- machines next (the legacy code's two statements in one transaction; a
-- reader of the drift view), and waiting for it while holding machines
-- closes a cycle. So for the first half of lock_timeout each is taken only
-- if free at once; else machines is let go (the subtransaction rolls back)
-- and the whole is tried again 10 ms later. Transactions on machine_state
-- that overlap without a gap (readers one after another) would keep it from
-- ever being free then; so for the second half the rest are waited for,
-- which queues the transactions that come after: all of those waits end
-- within half of deadlock_timeout from taking machines. A transaction in a
-- cycle with it began to wait for machines after that, so the migration
-- gives up its turn before that transaction's deadlock check can run, and
-- no one gets 40P01. When lock_timeout has passed since the first try: 55P03,
-- with nothing changed, which the migration runner retries. lock_timeout 0
-- waits on, in the second manner from the start.
-- Applying, re-applying and reverting call it first; it makes nothing.
CREATE OR REPLACE FUNCTION machine_sync.lock_tables()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    caller_lock_timeout text := current_setting('lock_timeout');
    patience interval := caller_lock_timeout::interval;
    began timestamptz := clock_timestamp();
    deadline timestamptz := began + patience;
    -- How long the tables after machines may be waited for, in all, once
    -- machines is held (the second half, above); under 1 ms: never.
    hold_bound interval := current_setting('deadlock_timeout')::interval / 2;
    machines_wait interval;
    queueing boolean;
    hold_until timestamptz;
    busy text;
BEGIN
    IF to_regclass('public.machines') IS NULL OR to_regclass('public.machine_state') IS NULL THEN
        RETURN;  -- a fresh install: nothing to wait for
    END IF;
    LOOP
        -- machines too is queued for at most hold_bound at a time (a
        -- transaction left open on it must not hold every reader and writer
        -- in the queue behind this one for all of lock_timeout), and not
        -- past the deadline; least() passes over the bound that does not
        -- apply (NULL), and with neither the caller's lock_timeout holds.
        machines_wait := least(
            CASE WHEN patience > interval '0' THEN deadline - clock_timestamp() END,
            CASE WHEN hold_bound >= interval '1 ms' THEN hold_bound END
        );
        PERFORM set_config(
            'lock_timeout',
            coalesce(
                greatest(ceil(extract(epoch FROM machines_wait) * 1000), 1)::text || 'ms',
                caller_lock_timeout
            ),
            true
        );
        queueing := hold_bound >= interval '1 ms'
            AND (patience <= interval '0' OR clock_timestamp() >= began + patience / 2);
        BEGIN
            LOCK TABLE public.machines IN ACCESS EXCLUSIVE MODE;
            hold_until := clock_timestamp() + hold_bound;
            IF patience > interval '0' AND deadline < hold_until THEN
                hold_until := deadline;
            END IF;
            -- machine_state first, then the drift view and the tables the
            -- triggers and legacy RPCs read (the status vocabulary, the
            -- mode): a transaction may have read one, or switched the mode,
            -- before it writes machines, and reverting drops them,
            -- re-applying writes them.
            FOR busy IN
                SELECT q.name
                FROM (
                    SELECT
                        0 AS rank,
                        'public.machine_state' AS name
                    UNION ALL
                    SELECT
                        1 AS rank,
                        format('%I.%I', n.nspname, c.relname) AS name
                    FROM pg_class AS c
                    INNER JOIN pg_namespace AS n ON c.relnamespace = n.oid
                    WHERE n.nspname = 'machine_sync' AND c.relkind IN ('r', 'v', 'p')
                ) AS q
                ORDER BY q.rank, q.name COLLATE "C"
            LOOP
                IF queueing THEN
                    PERFORM set_config(
                        'lock_timeout',
                        greatest(floor(extract(epoch FROM hold_until - clock_timestamp()) * 1000), 1)::text || 'ms',
                        true
                    );
                    EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', busy::regclass);
                ELSE
                    EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE NOWAIT', busy::regclass);
                END IF;
            END LOOP;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            IF patience > interval '0' AND clock_timestamp() >= deadline THEN
                RAISE EXCEPTION 'lock timeout: machine-sync waited % (lock_timeout) for its tables, and % stayed locked by another transaction',
                    caller_lock_timeout, coalesce(busy, 'public.machines')
                USING ERRCODE = 'lock_not_available',
                      HINT = 'Other transactions hold them (SELECT * FROM pg_locks); nothing was changed, retry.';
            END IF;
            busy := NULL;
        END;
        PERFORM pg_sleep(0.01);
    END LOOP;
    PERFORM set_config('lock_timeout', caller_lock_timeout, true);
END
$$;

DO $$
BEGIN
    PERFORM machine_sync.lock_tables();
END
$$;

-- Why role `mirror` could be someone's other than `trusted` (the tables'
-- owner): one line each, none when it is a role nobody else can be. The
-- migration refuses such a role (below); `machine-sync migrate status`
-- reports one that became so since (machine_sync_installed.problems_v1()).
CREATE OR REPLACE FUNCTION machine_sync.mirror_role_exposure(
    mirror pg_catalog.name, trusted pg_catalog.name
)
RETURNS SETOF text
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'it can log in' AS problem
    FROM pg_catalog.pg_roles AS r
    WHERE r.rolname = mirror_role_exposure.mirror AND r.rolcanlogin
    UNION ALL
    SELECT 'it is a superuser'
    FROM pg_catalog.pg_roles AS r
    WHERE r.rolname = mirror_role_exposure.mirror AND r.rolsuper
    UNION ALL
    SELECT format('%I is a member of it', r.rolname)
    FROM pg_catalog.pg_roles AS r
    WHERE
        r.rolname IN ('anon', 'authenticated', 'service_role', 'authenticator')
        AND pg_catalog.pg_has_role(r.oid, mirror_role_exposure.mirror, 'MEMBER')
    UNION ALL
    -- Any other role it is granted to may SET ROLE to it, and one with
    -- ADMIN OPTION (as the CREATEROLE role that made it has, PostgreSQL
    -- 16+) may grant it to itself when it likes: either could act as
    -- the mirror. (Members of the trusted role are that role already.)
    SELECT DISTINCT format(
        '%I is a member of it%s', r.rolname,
        CASE WHEN m.admin_option THEN ' (with ADMIN OPTION)' ELSE '' END
    )
    FROM pg_catalog.pg_auth_members AS m
    INNER JOIN pg_catalog.pg_roles AS r ON m.member = r.oid
    WHERE
        m.roleid = (SELECT o.oid FROM pg_catalog.pg_roles AS o WHERE o.rolname = mirror_role_exposure.mirror)
        AND r.rolname <> mirror_role_exposure.trusted
        AND r.rolname NOT IN ('anon', 'authenticated', 'service_role', 'authenticator')
    UNION ALL
    -- What it owns here, but for the mirror's function (a migration
    -- before this one handed it over): whoever could be the role before
    -- could have left, say, a SECURITY DEFINER function open to PUBLIC,
    -- which would write machine_state past the guard once the role may.
    SELECT format('it owns %s', pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid))
    FROM pg_catalog.pg_shdepend AS d
    INNER JOIN pg_catalog.pg_roles AS r ON d.refobjid = r.oid
    WHERE
        d.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass
        AND d.deptype = 'o'
        AND r.rolname = mirror_role_exposure.mirror
        AND d.dbid IN (
            0,
            (SELECT db.oid FROM pg_catalog.pg_database AS db WHERE db.datname = pg_catalog.current_database())
        )
        AND NOT (
            d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
            AND d.objid = coalesce(pg_catalog.to_regprocedure('machine_sync.machines_sync()')::pg_catalog.oid, 0)
        )
$$;

-- The database's own mirror role. A database migrated before keeps the one
-- it has (a copy restored from a dump keeps its source's: see MIGRATING.md);
-- else it is named after the database (a name too long for a role: after
-- its md5). Two migrations of one database at once may both try to make it:
-- whichever loses the race finds it made and granted by the other.
-- machine_sync.mirror_role() names it for the migrations, the down
-- migration and the tools; the guard's triggers on machine_state are given
-- the name as they are created (60_guard.sql), so that a write meets no
-- function call to learn it.
DO $$
DECLARE
    mirror name;
    exposed text;
BEGIN
    IF pg_catalog.to_regprocedure('machine_sync.mirror_role()') IS NOT NULL THEN
        EXECUTE 'SELECT machine_sync.mirror_role()' INTO mirror;
    ELSIF pg_catalog.octet_length(pg_catalog.current_database()) <= 43 THEN
        mirror := 'machine_sync_mirror_' || pg_catalog.current_database();
    ELSE
        mirror := 'machine_sync_mirror_' || pg_catalog.md5(pg_catalog.current_database());
    END IF;
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_roles AS r WHERE r.rolname = mirror
    ) THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', mirror);
            -- Only its maker may: a role another one made and granted
            -- without ADMIN OPTION cannot be commented on (PostgreSQL 16+).
            EXECUTE format(
                'COMMENT ON ROLE %I IS %L', mirror,
                format(
                    'machine-sync: the role the mirror trigger of database %s runs as. Nobody logs in as it.',
                    pg_catalog.current_database()
                )
            );
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    IF NOT pg_catalog.pg_has_role(mirror, 'USAGE') THEN
        BEGIN
            EXECUTE format('GRANT %I TO CURRENT_USER', mirror);
        EXCEPTION WHEN insufficient_privilege THEN
            IF NOT pg_catalog.pg_has_role(mirror, 'USAGE') THEN
                RAISE EXCEPTION 'role % exists, but % may not take it (it was made by another role)',
                    quote_ident(mirror), current_user
                USING ERRCODE = 'insufficient_privilege',
                      HINT = format('As a superuser: GRANT %I TO %I; then migrate again.', mirror, current_user);
            END IF;
        END;
    END IF;
    SELECT string_agg(found.problem, ', ' ORDER BY found.problem COLLATE "C")
    INTO exposed
    FROM machine_sync.mirror_role_exposure(mirror, current_user) AS found (problem);
    IF exposed IS NOT NULL THEN
        RAISE EXCEPTION 'role % must be one nobody else can be, and it is not: %', quote_ident(mirror), exposed
        USING ERRCODE = 'insufficient_privilege',
              HINT = format(
                  'As a superuser: ALTER ROLE %I NOLOGIN NOSUPERUSER, REVOKE it from the roles named, and drop (or give away) what it owns; then migrate again.',
                  mirror
              );
    END IF;
    EXECUTE format(
        $f$CREATE OR REPLACE FUNCTION machine_sync.mirror_role()
        RETURNS pg_catalog.name
        LANGUAGE sql
        IMMUTABLE
        PARALLEL SAFE
        SET search_path = pg_catalog, pg_temp
        RETURN %L::pg_catalog.name$f$,
        mirror
    );
END
$$;

COMMENT ON FUNCTION machine_sync.mirror_role() IS
'The role this database''s mirror runs as (made by the migration for this database).';

-- ---------------------------------------------------------------------------
-- sql/05_revert.sql
-- ---------------------------------------------------------------------------

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

-- ---------------------------------------------------------------------------
-- sql/10_tables.sql
-- ---------------------------------------------------------------------------

-- The two tables, as production has them, plus what machine-sync adds.
--
-- Guarantees:
-- * On an empty database the tables are created; on production's they are
--   kept with their data, and only the additions below are made.
-- * `machines` holds everything `machine_state` shows: it gains nullable
--   `failure_description` and `failure_component`, and `status_since`, the
--   moment its status last changed (machine_state.state_since mirrors it).
-- * A `machine_state` row lives and dies with its machine: exactly one
--   foreign key to machines, named machine_state_machine_id_fkey, cascading
--   on delete, whatever production called its own.
-- * Foreign keys to tables outside this product (`process_executions`,
--   `machine_components`) are left as they are; a fresh install does not
--   invent those tables.
-- * `id` defaults to the core gen_random_uuid() (production used
--   uuid-ossp's uuid_generate_v4(), which not every server has).
-- * Row Level Security: a fresh install creates both tables with it on and
--   no policy (a table in an exposed schema without it is open to every API
--   role). On an existing database, whether machines has it stays the
--   application's choice.

-- The rules compare statuses as text, one spelling against another. A
-- nondeterministic collation on either status column (one under which
-- 'IDLE' equals 'idle') would let one spelling pass for another, so an
-- existing database with one is refused before anything changes.
DO $$
DECLARE
    columns text;
BEGIN
    SELECT string_agg(format('%s.%I (collation %I)', a.attrelid::regclass, a.attname, c.collname), ', ')
    INTO columns
    FROM pg_catalog.pg_attribute AS a
    INNER JOIN pg_catalog.pg_collation AS c ON a.attcollation = c.oid
    WHERE
        a.attrelid IN (to_regclass('public.machines'), to_regclass('public.machine_state'))
        AND a.attname IN ('status', 'current_state')
        AND NOT a.attisdropped
        AND NOT c.collisdeterministic;
    IF columns IS NOT NULL THEN
        RAISE EXCEPTION 'machine-sync needs a deterministic collation on %: a nondeterministic one lets one status spelling pass for another',
            columns
        USING ERRCODE = 'feature_not_supported',
              HINT = 'Give the column the database''s collation (ALTER TABLE ... ALTER COLUMN ... TYPE <its type> COLLATE "default"), then migrate again.';
    END IF;
END
$$;

-- Remember, for the end of this file, whether this is a fresh install.
SELECT set_config(
    'machine_sync.creating_machines',
    (to_regclass('public.machines') IS NULL)::text,
    TRUE
) AS fresh_install;

CREATE TABLE IF NOT EXISTS public.machines (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    serial_number text NOT NULL,
    location text NOT NULL,
    lab_name text NOT NULL,
    lab_institution text NOT NULL,
    model text NOT NULL,
    machine_type text NOT NULL,
    install_date timestamptz NOT NULL,
    last_maintenance_date timestamptz NOT NULL,
    status text NOT NULL DEFAULT 'offline',
    current_operator_id uuid,
    admin_id uuid NOT NULL,
    is_active boolean NOT NULL DEFAULT TRUE,
    current_process_id uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    is_virtual boolean NOT NULL DEFAULT FALSE,
    virtual_config jsonb
);

CREATE TABLE IF NOT EXISTS public.machine_state (
    machine_id uuid PRIMARY KEY
    CONSTRAINT machine_state_machine_id_fkey
    REFERENCES public.machines (id) ON DELETE CASCADE,
    -- (squawk) varchar(50) is production's column type, kept so that a fresh
    -- install has the table production has; it is created, never resized.
    -- squawk-ignore prefer-text-field
    current_state varchar(50) NOT NULL DEFAULT 'idle',
    state_since timestamptz NOT NULL DEFAULT now(),
    process_id uuid,
    is_failure_mode boolean NOT NULL DEFAULT FALSE,
    failure_component uuid,
    failure_description text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE public.machine_state ENABLE ROW LEVEL SECURITY;

DO $$
BEGIN
    IF current_setting('machine_sync.creating_machines') = 'true' THEN
        ALTER TABLE public.machines ENABLE ROW LEVEL SECURITY;
    END IF;
END
$$;

-- Adding a nullable column, or one whose default is the transaction's
-- now() (a stable expression), rewrites no rows.
ALTER TABLE public.machines
ADD COLUMN IF NOT EXISTS failure_description text,
ADD COLUMN IF NOT EXISTS failure_component uuid,
ADD COLUMN IF NOT EXISTS status_since timestamptz NOT NULL DEFAULT now();

-- The new columns start from what only machine_state held: failure details
-- where machines has none, and state_since where the state row shows the
-- same status (in any case). On a database that has them already, or an
-- empty one, nothing matches.
UPDATE public.machines AS m
SET
    failure_description = coalesce(m.failure_description, s.failure_description),
    failure_component = coalesce(m.failure_component, s.failure_component),
    status_since = CASE
        WHEN lower(m.status COLLATE "C") = lower(s.current_state COLLATE "C")
            THEN s.state_since
        ELSE m.status_since
    END
FROM public.machine_state AS s
WHERE
    s.machine_id = m.id
    AND (
        (
            m.failure_description IS NULL
            AND m.failure_component IS NULL
            AND (s.failure_description IS NOT NULL OR s.failure_component IS NOT NULL)
        )
        OR (
            lower(m.status COLLATE "C") = lower(s.current_state COLLATE "C")
            AND m.status_since IS DISTINCT FROM s.state_since
        )
    );

ALTER TABLE public.machines ALTER COLUMN id SET DEFAULT gen_random_uuid();

DO $$
DECLARE
    fk record;
BEGIN
    FOR fk IN
        SELECT c.conname, c.confdeltype
        FROM pg_catalog.pg_constraint AS c
        WHERE
            c.conrelid = 'public.machine_state'::pg_catalog.regclass
            AND c.contype = 'f'
            AND c.confrelid = 'public.machines'::pg_catalog.regclass
    LOOP
        IF fk.conname <> 'machine_state_machine_id_fkey' OR fk.confdeltype <> 'c' THEN
            EXECUTE format('ALTER TABLE public.machine_state DROP CONSTRAINT %I', fk.conname);
        END IF;
    END LOOP;
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_constraint AS c
        WHERE
            c.conrelid = 'public.machine_state'::pg_catalog.regclass
            AND c.conname = 'machine_state_machine_id_fkey'
    ) THEN
        ALTER TABLE public.machine_state
        ADD CONSTRAINT machine_state_machine_id_fkey
        FOREIGN KEY (machine_id) REFERENCES public.machines (id)
        ON DELETE CASCADE;
    END IF;
END
$$;

COMMENT ON TABLE public.machines IS
'One row per tool. The only table clients write; machine-sync mirrors it '
'into machine_state in the same transaction.';
COMMENT ON COLUMN public.machines.status IS
'Canonical status (machine_sync.allowed_status); input is trimmed and '
'lower-cased, aliases are resolved, transitions are checked '
'(machine_sync.allowed_transition).';
COMMENT ON COLUMN public.machines.status_since IS
'When status last changed; set by the database.';
COMMENT ON TABLE public.machine_state IS
'Read-only mirror of machines, kept by machine-sync for legacy readers '
'(dashboard, Realtime, reports).';

-- ---------------------------------------------------------------------------
-- sql/20_status.sql
-- ---------------------------------------------------------------------------

-- The status vocabulary: which statuses exist and which spellings mean them.
--
-- Guarantees:
-- * Every stored status is one of machine_sync.allowed_status.
-- * Input is trimmed of ASCII white space and its ASCII letters are
--   lower-cased, then aliases are resolved, so a legacy writer sending
--   'IDLE' or 'running' keeps working. Nothing else is folded: the rule is
--   the same in every database locale ('İDLE', full-width letters or a
--   zero-width space are not a status).
-- * Anything else is refused with SQLSTATE 23514 naming the allowed values,
--   listed in code-point order (COLLATE "C") whatever the database's
--   collation, as every list in a message is.
--   Error messages quote at most 40 characters of a bad value and give its
--   length, so a huge value cannot make a huge message or log line.
-- * Operators extend the vocabulary with plain INSERTs into these two
--   tables; no function needs editing.

CREATE TABLE IF NOT EXISTS machine_sync.allowed_status (
    -- machine_state.current_state is varchar(50), so no longer than that.
    status text PRIMARY KEY CHECK (status ~ '^[a-z][a-z0-9_]{0,49}$'),
    description text NOT NULL
);

COMMENT ON TABLE machine_sync.allowed_status IS
'Canonical machine statuses. Extend with INSERT; the triggers read it.';

CREATE TABLE IF NOT EXISTS machine_sync.status_alias (
    alias text PRIMARY KEY CHECK (
        alias = lower(btrim(alias, E' \t\n\r\f\x0b') COLLATE "C")
    ),
    status text NOT NULL REFERENCES machine_sync.allowed_status (status)
);

COMMENT ON TABLE machine_sync.status_alias IS
'Other spellings accepted on input (after trimming and ASCII lower-casing) '
'and the canonical status each one means.';

INSERT INTO machine_sync.allowed_status (status, description) VALUES
('offline', 'Powered off or not connected (the default).'),
('idle', 'Ready to start a process.'),
('processing', 'Running a recipe; current_process_id names the run.'),
('error', 'Failed; failure_description says why.'),
('maintenance', 'Taken out of service by an operator.')
ON CONFLICT (status) DO NOTHING;

INSERT INTO machine_sync.status_alias (alias, status) VALUES
('running', 'processing')
ON CONFLICT (alias) DO NOTHING;

-- A value for an error message: quoted, at most 40 characters of it, and
-- its length when it is longer. Control characters (ESC, BEL, newline, ...)
-- are shown as ?, and said to be: a message goes to terminals and logs,
-- where they would act (a terminal's escape sequences) or forge lines.
CREATE OR REPLACE FUNCTION machine_sync.quote_bounded(value text)
RETURNS text
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN value IS NULL THEN 'NULL'
        ELSE
            quote_literal(regexp_replace(p.shown, '[[:cntrl:]]', '?', 'g'))
            || CASE WHEN p.cut THEN '...' ELSE '' END
            || CASE
                WHEN p.cut OR p.controls THEN
                    ' (' || length(value) || ' characters'
                    || CASE WHEN p.controls THEN ', control characters shown as ?' ELSE '' END
                    || ')'
                ELSE ''
            END
    END
    FROM (
        SELECT
            s.shown,
            length(value) > 40 AS cut,
            s.shown ~ '[[:cntrl:]]' AS controls
        FROM (SELECT left(value, 40) COLLATE "C" AS shown) AS s
    ) AS p
$$;

-- The canonical spelling of a status, or NULL when it is not known.
-- (The vertical tab is written \x0b: before PostgreSQL 16, E'\v' is a 'v'.)
CREATE OR REPLACE FUNCTION machine_sync.canonical_status(raw text)
RETURNS text
LANGUAGE sql
STABLE
PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH spelled AS (
        SELECT lower(btrim(raw, E' \t\n\r\f\x0b') COLLATE "C") AS spelling
    )
    SELECT coalesce(
        (SELECT a.status FROM machine_sync.allowed_status AS a, spelled
         WHERE a.status = spelled.spelling),
        (SELECT s.status FROM machine_sync.status_alias AS s, spelled
         WHERE s.alias = spelled.spelling)
    )
$$;

-- The canonical spelling of a status; raises 23514 when it is not known.
CREATE OR REPLACE FUNCTION machine_sync.normalize_status(raw text)
RETURNS text
LANGUAGE plpgsql
STABLE
PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    canonical text := machine_sync.canonical_status(raw);
BEGIN
    IF canonical IS NULL THEN
        RAISE EXCEPTION 'invalid machine status %: allowed statuses are %',
            machine_sync.quote_bounded(raw),
            (SELECT string_agg(a.status, ', ' ORDER BY a.status COLLATE "C")
             FROM machine_sync.allowed_status AS a)
        USING ERRCODE = 'check_violation',
              CONSTRAINT = 'machines_status_allowed',
              DETAIL = coalesce('accepted aliases: ' || (
                  SELECT string_agg(s.alias || ' -> ' || s.status, ', ' ORDER BY s.alias COLLATE "C")
                  FROM machine_sync.status_alias AS s), 'no aliases'),
              HINT = 'Add a status with INSERT INTO machine_sync.allowed_status.';
    END IF;
    RETURN canonical;
END
$$;

-- ---------------------------------------------------------------------------
-- sql/30_transitions.sql
-- ---------------------------------------------------------------------------

-- The transition rules, enforced for every writer by the trigger on
-- machines (50_mirror.sql): the Python client, supabase-py, the legacy
-- code, the legacy RPCs, psql and the SQL editor alike.
--
-- Guarantees:
-- * A status changes only along a row of machine_sync.allowed_transition;
--   anything else is refused with SQLSTATE MS003 naming both statuses and
--   what is allowed from the first. Operators tighten or widen the rules
--   with DELETE and INSERT; no function needs editing.
-- * A machine that runs process P cannot be given another process: refused
--   with SQLSTATE MS002, the message naming P (two operators pressing start
--   together get one start and one MS002, whichever client they use).
-- * `processing` and a process id go together. Leaving `processing` ends
--   the run (current_process_id becomes NULL); clearing the process of a
--   processing machine stops it (status becomes `idle`, the legacy stop
--   path); entering `processing` without a process, or inserting a machine
--   with a process and another status, is refused with MS003. (A new
--   machine is checked once inserted: an upsert whose row conflicts updates
--   the existing machine, where the same values end or stop its run.)
-- * A write that leaves a machine in a status other than `processing` with
--   a process id ends that run: it must be the machine's current run, else
--   it is refused with SQLSTATE MS005 naming what the machine runs instead
--   (a late completion of an old run cannot end the new one).
-- * Leaving `error` clears the failure fields.
--
-- The default rules are the ones the client always had: a process starts
-- only from idle or offline; from any status a machine may go offline,
-- idle, into maintenance or into error.

CREATE TABLE IF NOT EXISTS machine_sync.allowed_transition (
    from_status text NOT NULL REFERENCES machine_sync.allowed_status (status),
    to_status text NOT NULL REFERENCES machine_sync.allowed_status (status),
    PRIMARY KEY (from_status, to_status),
    CHECK (from_status <> to_status)
);

COMMENT ON TABLE machine_sync.allowed_transition IS
'Status changes the database allows. Tighten with DELETE, widen with INSERT.';

-- Seeded only into an empty table, so that applying the migrations again
-- never brings back a transition an operator deleted.
INSERT INTO machine_sync.allowed_transition (from_status, to_status)
SELECT
    f.status AS from_status,
    t.status AS to_status
FROM machine_sync.allowed_status AS f
CROSS JOIN machine_sync.allowed_status AS t
WHERE
    f.status IN ('offline', 'idle', 'processing', 'error', 'maintenance')
    AND f.status <> t.status
    AND (
        t.status IN ('offline', 'idle', 'maintenance', 'error')
        OR (t.status = 'processing' AND f.status IN ('idle', 'offline'))
    )
    AND NOT EXISTS (SELECT FROM machine_sync.allowed_transition);

-- ---------------------------------------------------------------------------
-- sql/40_mode.sql
-- ---------------------------------------------------------------------------

-- The transition mode: how direct writes to machine_state are treated.
--
-- Guarantees:
-- * 'compat' (the default after migrating): a legacy UPDATE or INSERT on
--   machine_state is carried into machines as if written there.
-- * 'strict': any direct write to machine_state is refused.
-- * The mode is one row in one table. set_mode_v1() validates and switches it;
--   its UPDATE names its row, so it works under safeupdate (PostgREST on
--   Supabase), which refuses an UPDATE without WHERE.

CREATE TABLE IF NOT EXISTS machine_sync.settings (
    singleton boolean PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    mode text NOT NULL DEFAULT 'compat' CHECK (mode IN ('compat', 'strict'))
);

COMMENT ON TABLE machine_sync.settings IS
'One row: the machine-sync mode. Change it with machine_sync.set_mode_v1().';

INSERT INTO machine_sync.settings (singleton) VALUES (TRUE)
ON CONFLICT (singleton) DO NOTHING;

-- The current mode: 'compat' or 'strict'.
CREATE OR REPLACE FUNCTION machine_sync.mode_v1()
RETURNS text
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.mode FROM machine_sync.settings AS s WHERE s.singleton
$$;

-- Switch the mode; returns the mode now in force. Runs with the caller's
-- privileges: who may switch is who may UPDATE machine_sync.settings.
CREATE OR REPLACE FUNCTION machine_sync.set_mode_v1(new_mode text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wanted text := lower(btrim(new_mode, E' \t\n\r\f\x0b') COLLATE "C");
BEGIN
    IF wanted IS NULL OR wanted NOT IN ('compat', 'strict') THEN
        RAISE EXCEPTION 'invalid machine-sync mode %: use ''compat'' or ''strict''',
            machine_sync.quote_bounded(new_mode)
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE machine_sync.settings AS s SET mode = wanted WHERE s.singleton;
    RETURN wanted;
END
$$;

-- ---------------------------------------------------------------------------
-- sql/50_mirror.sql
-- ---------------------------------------------------------------------------

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

-- ---------------------------------------------------------------------------
-- sql/60_guard.sql
-- ---------------------------------------------------------------------------

-- The guard: writes to machine_state that the mirror did not make.
--
-- A write is the mirror's exactly when it runs as the database's mirror
-- role (machine_sync.mirror_role(), 00_schema.sql); every other write to
-- machine_state is "direct", whoever makes it: a client, a function, an
-- application's trigger, a foreign-key action, the mirror role of another
-- database of the cluster. The two triggers the mirror's UPDATE meets have
-- no WHEN clause: PostgreSQL reads a WHEN clause anew for every statement,
-- and the mirror's write is a statement per machine, where a function that
-- returns at once costs less. The triggers on rarer writes (INSERT, DELETE) keep theirs.
--
-- Guarantees:
-- * mode 'compat': a direct UPDATE or INSERT succeeds with the caller's own
--   privileges and policies on machines deciding, reports its row as
--   before, and lands in machines as if written there, rules included (a
--   legacy start on a busy machine is refused like any other, MS002). Both
--   tables agree when the statement ends. A direct write that changes
--   nothing mirrored neither writes nor locks machines. INSERT keeps
--   PostgreSQL's meaning: a machine's state row exists from the moment the
--   machine does, so a plain INSERT of it fails (23505) and an upsert
--   (INSERT ... ON CONFLICT DO UPDATE) updates it.
-- * Lock order without a table lock. PostgreSQL locks a machine_state row
--   before any trigger on it runs, and every machines writer locks its
--   machines row first: a legacy write and a machines write of the same
--   machine, each in the instant between its two row locks, would wait for
--   each other. So a legacy write never waits for a lock while it holds the
--   state row: it takes its machine's row at once or polls for it, for at
--   most half of deadlock_timeout (or the caller's lower lock_timeout), and
--   gives up the moment another transaction waits for it; any lock wait on
--   the way (SKIP LOCKED does not skip them all) is cut short at 1 ms,
--   long before deadlock_timeout lets a cycle form. It then fails
--   with a retryable error (40001 in a cycle, 55P03 when time is up) and
--   nothing is half-applied. No mix of writers can deadlock, nothing takes a
--   table lock, and only writers of that one machine ever wait.
-- * mode 'strict': a direct INSERT or UPDATE fails with SQLSTATE MS001.
-- * A direct DELETE fails while the machine exists (delete the machine).
-- * TRUNCATE of machine_state alone fails; TRUNCATE machines CASCADE works.

-- Checks a direct write and locks its machine for the carry below (or, when
-- it changes nothing mirrored, so that a later write of machines in the same
-- transaction takes no lock while it holds this row). Runs with the
-- caller's privileges.
CREATE OR REPLACE FUNCTION machine_sync.machine_state_direct_write()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    since timestamptz;
    in_strict boolean;
    canonical boolean;
    caller_lock_timeout text;
BEGIN
    IF current_user = 'machine_sync_mirror' THEN  -- (the mirror role: named below)
        RETURN NEW;  -- the mirror's own write
    END IF;
    -- One query for the mode and the spelling. (The setting itself, not
    -- machine_sync.mode_v1(): a SQL function with a SET clause is never
    -- inlined, and this runs on every legacy write.)
    SELECT
        s.mode = 'strict',
        EXISTS (SELECT FROM machine_sync.allowed_status AS a WHERE a.status = NEW.current_state)
    INTO in_strict, canonical
    FROM machine_sync.settings AS s
    WHERE s.singleton;
    IF in_strict THEN
        RAISE EXCEPTION 'machine_state is maintained by machine-sync and is read-only in strict mode: write public.machines instead'
        USING ERRCODE = 'MS001',
              HINT = 'UPDATE public.machines SET status = ... WHERE id = ...; machine_state follows in the same transaction.';
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.machine_id IS DISTINCT FROM OLD.machine_id THEN
        RAISE EXCEPTION 'machine_state.machine_id cannot change (from % to %)',
            OLD.machine_id, NEW.machine_id
        USING ERRCODE = 'MS001';
    END IF;
    IF canonical IS NOT TRUE THEN  -- (NULL too: no settings row to read)
        NEW.current_state := machine_sync.normalize_status(NEW.current_state);
    END IF;
    NEW.is_failure_mode := (NEW.current_state = 'error');
    NEW.updated_at := now();
    IF NEW.machine_id IS NULL THEN
        RETURN NEW;  -- the NOT NULL constraint answers (23502)
    END IF;
    -- The machine's row, at once when no other transaction holds it (and
    -- the caller may see and lock it); else lock_machine decides. SKIP
    -- LOCKED and NOWAIT do not cover every wait of a row lock: having
    -- locked a version, PostgreSQL follows the row's update chain and waits
    -- for a writer of a later version, and the caller's policies may wait
    -- for anything. So every lock wait here is cut short at 1 ms (55P03,
    -- retry), long before deadlock_timeout lets a cycle be found; so is a
    -- wait for a table lock that DDL on machines holds (DDL that wants
    -- machine_state next would close a cycle too). An INSERT whose row
    -- exists locks the machine as well: as an upsert whose DO UPDATE ...
    -- WHERE finds nothing to do, it keeps the state row locked with no
    -- UPDATE trigger fired, and a later write of machines in the same
    -- transaction could then close a cycle. So a plain INSERT of an existing
    -- row on a busy machine gives up as any legacy write does (55P03), where
    -- on an idle one it fails on the duplicate key (23505).
    caller_lock_timeout := current_setting('lock_timeout');
    PERFORM set_config('lock_timeout', '1ms', true);
    SELECT m.status_since INTO since
    FROM public.machines AS m
    WHERE m.id = NEW.machine_id
    FOR NO KEY UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        since := machine_sync.lock_machine(NEW.machine_id, caller_lock_timeout);
    END IF;
    PERFORM set_config('lock_timeout', caller_lock_timeout, true);
    IF TG_OP = 'UPDATE' AND (
        NEW.current_state, NEW.process_id, NEW.failure_description, NEW.failure_component
    ) IS NOT DISTINCT FROM (
        OLD.current_state, OLD.process_id, OLD.failure_description, OLD.failure_component
    ) THEN
        -- Nothing mirrored changes: machines is not written.
        NEW.state_since := OLD.state_since;
    ELSE
        -- The carry changes the machine, and its mirror rewrites this row
        -- when the status changes; until then it keeps the machine's since.
        -- (A machine the caller could not lock, hidden, not writable or
        -- missing, is refused by the carry, or first by the foreign key.)
        NEW.state_since := coalesce(since, NEW.state_since);
    END IF;
    RETURN NEW;
END
$$;

-- Locks a machine's row for a legacy write without ever waiting for a lock:
-- the caller holds the machine's state row already, and every writer of
-- machines takes the two rows the other way round, so a wait here could
-- close a cycle (and the guard's 1 ms lock_timeout cuts short the waits
-- that SKIP LOCKED and NOWAIT leave). It polls instead, every millisecond,
-- for at most half of
-- deadlock_timeout (or the caller's own lower lock_timeout), and gives up at
-- once when some transaction is waiting for this one (that transaction holds
-- the machine and wants the state row: neither could go on). Either way it
-- raises a retryable error and nothing is half-applied: 40001 for the cycle,
-- 55P03 when the time is up. Returns the machine's status_since, or NULL
-- when the caller may not lock the row (not visible, or not writable).
-- Called only when the row could not be taken at once (the guard tries
-- that itself, with no call, first).
CREATE OR REPLACE FUNCTION machine_sync.lock_machine(machine_id uuid, caller_lock_timeout text)
RETURNS timestamptz
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    caller_ms numeric;
    bound_ms numeric;
    deadline timestamptz;
    since timestamptz;
BEGIN
    -- The caller's SKIP LOCKED found nothing: locked by another
    -- transaction, or not ours to lock. NOWAIT tells.
    BEGIN
        SELECT m.status_since INTO since
        FROM public.machines AS m
        WHERE m.id = lock_machine.machine_id
        FOR NO KEY UPDATE NOWAIT;
        RETURN since;  -- NULL when not found: not visible or not writable
    EXCEPTION WHEN lock_not_available THEN
        NULL;
    END;
    caller_ms := extract(epoch FROM caller_lock_timeout::interval) * 1000;
    bound_ms := extract(epoch FROM current_setting('deadlock_timeout')::interval) * 500;
    IF caller_ms > 0 AND caller_ms < bound_ms THEN
        bound_ms := caller_ms;
    END IF;
    deadline := clock_timestamp() + make_interval(secs => bound_ms / 1000);
    LOOP
        IF EXISTS (
            SELECT
            FROM pg_catalog.pg_locks AS l
            WHERE
                NOT l.granted
                AND pg_catalog.pg_backend_pid() = ANY (pg_catalog.pg_blocking_pids(l.pid))
        ) THEN
            RAISE EXCEPTION 'machine % is being written by another transaction that waits for this one: this write to machine_state gave up; retry',
                lock_machine.machine_id
            USING ERRCODE = 'serialization_failure',
                  HINT = 'In compat mode a write to machine_state also writes machines; write public.machines directly and no such conflict arises.';
        END IF;
        IF clock_timestamp() >= deadline THEN
            RAISE EXCEPTION 'machine % is being written by another transaction: this write to machine_state waited % ms for it and gave up; retry',
                lock_machine.machine_id, ceil(bound_ms)::bigint
            USING ERRCODE = 'lock_not_available',
                  HINT = 'In compat mode a write to machine_state also writes machines; write public.machines directly to wait as long as any writer.';
        END IF;
        PERFORM pg_catalog.pg_sleep(0.001);
        BEGIN
            SELECT m.status_since INTO since
            FROM public.machines AS m
            WHERE m.id = lock_machine.machine_id
            FOR NO KEY UPDATE SKIP LOCKED;
            EXIT WHEN FOUND;
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- a wait SKIP LOCKED did not skip, cut short: poll on
        END;
    END LOOP;
    RETURN since;
END
$$;

-- Carries a direct write into machines. SECURITY INVOKER on purpose: the
-- caller's own grants and RLS policies on machines decide whether it may.
-- The machines trigger then applies the rules and rewrites this row only
-- where they changed what was written (a run ends, a failure clears).
CREATE OR REPLACE FUNCTION machine_sync.machine_state_carry_to_machines()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_user = 'machine_sync_mirror' THEN  -- (the mirror role: named below)
        RETURN NULL;  -- the mirror's own write
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF (
            NEW.current_state, NEW.process_id, NEW.failure_description, NEW.failure_component
        ) IS NOT DISTINCT FROM (
            OLD.current_state, OLD.process_id, OLD.failure_description, OLD.failure_component
        ) THEN
            RETURN NULL;  -- nothing mirrored changed: machines is not written
        END IF;
    END IF;
    UPDATE public.machines AS m
    SET
        status = NEW.current_state,
        current_process_id = NEW.process_id,
        failure_description = NEW.failure_description,
        failure_component = NEW.failure_component
    WHERE m.id = NEW.machine_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cannot carry this machine_state write into machines: machine % is not visible or not writable for role %',
            NEW.machine_id, current_user
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Write public.machines directly.';
    END IF;
    RETURN NULL;
END
$$;

-- Runs as the owner: whether the machine still exists must not depend on
-- what the caller may see.
CREATE OR REPLACE FUNCTION machine_sync.machine_state_direct_delete()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT FROM public.machines AS m WHERE m.id = OLD.machine_id) THEN
        RAISE EXCEPTION 'machine_state rows are deleted with their machine: DELETE FROM public.machines WHERE id = %',
            quote_literal(OLD.machine_id)
        USING ERRCODE = 'MS001';
    END IF;
    RETURN OLD;
END
$$;

CREATE OR REPLACE FUNCTION machine_sync.machine_state_after_truncate()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT FROM public.machines) THEN
        RAISE EXCEPTION 'TRUNCATE of machine_state alone would leave machines without state: use TRUNCATE public.machines CASCADE'
        USING ERRCODE = 'MS001';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER machine_state_direct_write
BEFORE INSERT OR UPDATE ON public.machine_state
FOR EACH ROW
EXECUTE FUNCTION machine_sync.machine_state_direct_write();

CREATE OR REPLACE TRIGGER machine_state_carry_update
AFTER UPDATE ON public.machine_state
FOR EACH ROW
EXECUTE FUNCTION machine_sync.machine_state_carry_to_machines();

-- The mirror's own writes are told by the name of the database's mirror
-- role (machine_sync.mirror_role(), 00_schema.sql), written into the two
-- functions above as a constant where they say 'machine_sync_mirror' (any
-- lookup of it would cost every write of machines), and into the WHEN
-- clauses of the triggers on rarer writes.
DO $$
DECLARE
    mirror constant name := machine_sync.mirror_role();
    placeholder constant text := $p$current_user = 'machine_sync_mirror'$p$;
    guard regprocedure;
    definition text;
BEGIN
    FOREACH guard IN ARRAY ARRAY[
        'machine_sync.machine_state_direct_write()'::regprocedure,
        'machine_sync.machine_state_carry_to_machines()'::regprocedure
    ] LOOP
        definition := pg_get_functiondef(guard);
        IF array_length(string_to_array(definition, placeholder), 1) <> 2 THEN
            RAISE EXCEPTION 'cannot name the mirror role in %: "%" is not in it exactly once', guard, placeholder;
        END IF;
        EXECUTE replace(definition, placeholder, format('current_user = %L', mirror));
    END LOOP;
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER machine_state_carry_insert
        AFTER INSERT ON public.machine_state
        FOR EACH ROW
        WHEN (current_user <> %L)
        EXECUTE FUNCTION machine_sync.machine_state_carry_to_machines()', mirror
    );
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER machine_state_direct_delete
        BEFORE DELETE ON public.machine_state
        FOR EACH ROW
        WHEN (current_user <> %L)
        EXECUTE FUNCTION machine_sync.machine_state_direct_delete()', mirror
    );
END
$$;

CREATE OR REPLACE TRIGGER machine_state_truncate_alone
AFTER TRUNCATE ON public.machine_state
FOR EACH STATEMENT EXECUTE FUNCTION machine_sync.machine_state_after_truncate();

-- ---------------------------------------------------------------------------
-- sql/70_drift.sql
-- ---------------------------------------------------------------------------

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

-- ---------------------------------------------------------------------------
-- sql/80_legacy_rpc.sql
-- ---------------------------------------------------------------------------

-- The legacy RPC functions, kept for deployed code that calls them through
-- PostgREST with named parameters.
--
-- Guarantees:
-- * Same names, same parameter names, same json result
--   {success, machine, machine_state, updated_at}; machine_state is null
--   when the caller may not see the state row.
-- * Each is one write to machines; the mirror does the rest, and the rules
--   apply as to any writer (a start on a busy machine raises MS002).
-- * A missing (or hidden) machine raises SQLSTATE MS004, which PostgREST
--   answers with HTTP 400, not 500; contradictory arguments raise 22023.
--   Nothing is half-applied.
-- * SECURITY INVOKER: the caller's own privileges and RLS policies apply.

CREATE OR REPLACE FUNCTION public.atomic_update_machine_state(
    p_machine_id uuid,
    p_machine_status text DEFAULT NULL,
    p_current_process_id uuid DEFAULT NULL,
    p_machine_state_current_state text DEFAULT NULL,
    p_machine_state_process_id uuid DEFAULT NULL,
    p_is_failure_mode boolean DEFAULT NULL,
    p_failure_description text DEFAULT NULL
)
RETURNS json
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    machine public.machines;
    state json;
BEGIN
    IF p_machine_id IS NULL THEN
        RAISE EXCEPTION 'p_machine_id must not be null'
        USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- An unknown spelling is reported as such (23514, naming the allowed
    -- values), not as a disagreement.
    IF
        p_machine_status IS NOT NULL
        AND p_machine_state_current_state IS NOT NULL
        AND machine_sync.normalize_status(p_machine_status)
        <> machine_sync.normalize_status(p_machine_state_current_state)
    THEN
        RAISE EXCEPTION 'p_machine_status (%) and p_machine_state_current_state (%) disagree',
            machine_sync.quote_bounded(p_machine_status),
            machine_sync.quote_bounded(p_machine_state_current_state)
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_current_process_id <> p_machine_state_process_id THEN
        RAISE EXCEPTION 'p_current_process_id (%) and p_machine_state_process_id (%) disagree',
            p_current_process_id, p_machine_state_process_id
        USING ERRCODE = 'invalid_parameter_value';
    END IF;

    UPDATE public.machines AS m
    SET
        status = coalesce(p_machine_status, p_machine_state_current_state, m.status),
        current_process_id = coalesce(p_current_process_id, p_machine_state_process_id),
        failure_description = p_failure_description
    WHERE m.id = p_machine_id
    RETURNING m.* INTO machine;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'machine % does not exist or is not writable for role %',
            p_machine_id, current_user
        USING ERRCODE = 'MS004';
    END IF;
    IF p_is_failure_mode IS DISTINCT FROM (machine.status = 'error')
       AND p_is_failure_mode IS NOT NULL THEN
        RAISE EXCEPTION 'p_is_failure_mode = % contradicts status %', p_is_failure_mode, machine.status
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'is_failure_mode is derived: it is true exactly when status is error.';
    END IF;

    SELECT to_json(s) INTO state
    FROM public.machine_state AS s WHERE s.machine_id = p_machine_id;
    RETURN json_build_object(
        'success', TRUE,
        'machine', to_json(machine),
        'machine_state', state,
        'updated_at', machine.updated_at
    );
END
$$;

CREATE OR REPLACE FUNCTION public.atomic_complete_machine_state(p_machine_id uuid)
RETURNS json
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT public.atomic_update_machine_state(
        p_machine_id => p_machine_id,
        p_machine_status => 'idle'
    )
$$;

CREATE OR REPLACE FUNCTION public.atomic_error_machine_state(
    p_machine_id uuid, p_error_message text
)
RETURNS json
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT public.atomic_update_machine_state(
        p_machine_id => p_machine_id,
        p_machine_status => 'error',
        p_failure_description
        => 'Recipe execution error: ' || coalesce(p_error_message, '(no message)')
    )
$$;

CREATE OR REPLACE FUNCTION public.atomic_processing_machine_state(
    p_machine_id uuid, p_process_id uuid
)
RETURNS json
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_process_id IS NULL THEN
        RAISE EXCEPTION 'p_process_id must not be null'
        USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN public.atomic_update_machine_state(
        p_machine_id => p_machine_id,
        p_machine_status => 'processing',
        p_current_process_id => p_process_id
    );
END
$$;

-- ---------------------------------------------------------------------------
-- sql/90_grants.sql
-- ---------------------------------------------------------------------------

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

-- ---------------------------------------------------------------------------
-- sql/95_backfill.sql
-- ---------------------------------------------------------------------------

-- Rows that predate machine-sync, brought under its contract.
--
-- Guarantees:
-- * A status outside the vocabulary stops the migration with an error that
--   names the machines and values (add them to allowed_status, or fix
--   them), the first ten of them and how many more; nothing is applied.
-- * Every other machine ends with exactly one agreeing machine_state row,
--   its status canonical ('IDLE' becomes 'idle'), under the rules, also
--   where both tables agreed: a machine the legacy stop path left
--   'processing' without a process is idle, and one that holds a process in
--   another status lets it go.
-- * On a database already in that state, nothing changes.
-- * It says what it did, as a NOTICE: the drift it repaired, by kind (as
--   machine_sync.drift names them), and how many machines the rules
--   corrected.

DO $$
DECLARE
    unknown text;
    unrepaired text;
    drifted text;
    corrected bigint;
BEGIN
    -- The first ten by id, and how many more: the message stays short
    -- however many there are.
    SELECT
        string_agg(format('%s (%s)', u.id, machine_sync.quote_bounded(u.status)), ', ' ORDER BY u.id)
        || CASE WHEN max(u.total) > 10 THEN format(' and %s more', max(u.total) - 10) ELSE '' END
    INTO unknown
    FROM (
        SELECT
            m.id,
            m.status,
            count(*) OVER () AS total
        FROM public.machines AS m
        WHERE
            -- (canonical_status() only for a status not canonical already)
            (m.status IS NULL OR m.status NOT IN (SELECT a.status FROM machine_sync.allowed_status AS a))
            AND machine_sync.canonical_status(m.status) IS NULL
        ORDER BY m.id
        LIMIT 10
    ) AS u;
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'machines with a status machine-sync does not know: %', unknown
        USING ERRCODE = 'check_violation',
              HINT = 'INSERT the status into machine_sync.allowed_status (or an alias into machine_sync.status_alias), or correct those rows, then migrate again.';
    END IF;

    SELECT string_agg(format('%s %s', d.n, d.problem), ', ' ORDER BY d.n DESC, d.problem)
    INTO drifted
    FROM (
        SELECT dr.problem, count(*) AS n FROM machine_sync.drift AS dr GROUP BY dr.problem
    ) AS d;

    -- Rows both tables agree on may still break the rules: a machine
    -- processing without a process, or holding one in another status. A
    -- write of a watched column runs the rules on them.
    UPDATE public.machines AS m
    SET
        status = machine_sync.canonical_status(m.status),
        updated_at = CASE
            WHEN m.updated_at = now() THEN now() - interval '1 microsecond'
            ELSE now()
        END
    WHERE
        (machine_sync.canonical_status(m.status) = 'processing')
        IS DISTINCT FROM (m.current_process_id IS NOT NULL)
        -- (Only these can: a machine without a process whose status is a
        -- canonical one other than processing is as the rules want it.)
        AND (
            m.current_process_id IS NOT NULL
            OR m.status IS NULL
            OR m.status NOT IN (
                SELECT a.status FROM machine_sync.allowed_status AS a WHERE a.status <> 'processing'
            )
        );
    GET DIAGNOSTICS corrected = ROW_COUNT;

    SELECT
        string_agg(format('%s: %s', u.machine_id, u.reason), '; ' ORDER BY u.machine_id)
        || CASE WHEN max(u.total) > 10 THEN format('; and %s more', max(u.total) - 10) ELSE '' END
    INTO unrepaired
    FROM (
        SELECT
            r.machine_id,
            r.reason,
            count(*) OVER () AS total
        FROM machine_sync.reconcile_v1() AS r
        WHERE NOT r.repaired
        ORDER BY r.machine_id
        LIMIT 10
    ) AS u;
    IF unrepaired IS NOT NULL THEN
        RAISE EXCEPTION 'machines that could not be brought into agreement: %', unrepaired
        USING ERRCODE = 'check_violation';
    END IF;
    RAISE NOTICE 'machine-sync: drift repaired from machines: %; machines the rules corrected (processing without a process, or a process held in another status): %; all % machines agree',
        coalesce(drifted, 'none'), corrected, (SELECT count(*) FROM public.machines);
END
$$;

-- ---------------------------------------------------------------------------
-- What this migration installed, recorded in the catalog
-- (python_client/tools/record_definitions.sql)
-- ---------------------------------------------------------------------------

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

SELECT machine_sync_installed.record('20261125170100_machine_sync_v1.sql') AS recorded_definitions;

COMMIT;
