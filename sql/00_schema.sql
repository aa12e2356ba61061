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
