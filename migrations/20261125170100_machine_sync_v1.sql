-- machine-sync v1: machines becomes the single write target and
-- machine_state follows it in the same transaction.
-- Takes the baseline (an empty install or the legacy production database,
-- with its data) to the schema described in sql/. Idempotent: applying it
-- again changes nothing.

-- squawk-ignore-file require-statement-timeout
-- (squawk) No statement_timeout: the lock_timeout below caps the only long
-- wait these statements have, another session's lock; their own work is
-- bounded by one row per lab machine.

BEGIN;
SET LOCAL lock_timeout = '5s';

-- Remember what v1 changes on the two tables it does not create (their
-- grants, the foreign key's name and rule, the id default), so that its
-- down migration puts them back exactly. Recorded on the first application
-- only; the down migration drops this schema.
CREATE SCHEMA IF NOT EXISTS machine_sync_revert;
REVOKE ALL ON SCHEMA machine_sync_revert FROM public;

CREATE TABLE IF NOT EXISTS machine_sync_revert.table_grant (
    table_name text NOT NULL,
    grantee text NOT NULL,
    privilege_type text NOT NULL,
    is_grantable boolean NOT NULL,
    PRIMARY KEY (table_name, grantee, privilege_type)
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
    IF EXISTS (SELECT FROM machine_sync_revert.column_default) THEN
        RETURN;  -- recorded when v1 was first applied
    END IF;
    INSERT INTO machine_sync_revert.table_grant
    SELECT
        c.oid::regclass::text,
        coalesce(r.rolname, 'PUBLIC'),
        a.privilege_type,
        a.is_grantable
    FROM pg_catalog.pg_class AS c
    CROSS JOIN LATERAL aclexplode(c.relacl) AS a
    LEFT JOIN pg_catalog.pg_roles AS r ON a.grantee = r.oid
    WHERE
        c.oid IN ('public.machines'::regclass, 'public.machine_state'::regclass)
        AND a.grantee <> c.relowner;
    INSERT INTO machine_sync_revert.foreign_key
    SELECT conname, pg_get_constraintdef(oid)
    FROM pg_catalog.pg_constraint
    WHERE
        conrelid = 'public.machine_state'::regclass
        AND contype = 'f'
        AND confrelid = 'public.machines'::regclass;
    INSERT INTO machine_sync_revert.column_default
    SELECT 'machines.id', pg_get_expr(d.adbin, d.adrelid)
    FROM pg_catalog.pg_attribute AS a
    LEFT JOIN pg_catalog.pg_attrdef AS d
        ON a.attrelid = d.adrelid AND a.attnum = d.adnum
    WHERE a.attrelid = 'public.machines'::regclass AND a.attname = 'id';
END
$$;

-- Columns machines needs to hold everything machine_state shows.
ALTER TABLE public.machines
ADD COLUMN IF NOT EXISTS failure_description text,
ADD COLUMN IF NOT EXISTS failure_component uuid;

-- The legacy default needs the uuid-ossp extension; the core function does
-- the same job everywhere.
ALTER TABLE public.machines ALTER COLUMN id SET DEFAULT gen_random_uuid();

COMMENT ON TABLE public.machines IS
'One row per tool. The only table clients write; machine-sync mirrors it '
'into machine_state in the same transaction.';
COMMENT ON COLUMN public.machines.status IS
'Canonical status (see machine_sync.allowed_status); input is trimmed, '
'lower-cased and aliases are resolved.';
COMMENT ON TABLE public.machine_state IS
'Read-only mirror of machines, kept by machine-sync triggers for legacy '
'readers (dashboard, Realtime, reports).';

-- Whatever the foreign key from machine_state to machines was called and
-- however it was declared, end with exactly one, named
-- machine_state_machine_id_fkey, that cascades on delete.
DO $$
DECLARE
    fk record;
BEGIN
    FOR fk IN
        SELECT c.conname, c.confdeltype
        FROM pg_catalog.pg_constraint AS c
        WHERE
            c.conrelid = 'public.machine_state'::regclass
            AND c.contype = 'f'
            AND c.confrelid = 'public.machines'::regclass
    LOOP
        IF fk.conname <> 'machine_state_machine_id_fkey' OR fk.confdeltype <> 'c' THEN
            EXECUTE format('ALTER TABLE public.machine_state DROP CONSTRAINT %I', fk.conname);
        END IF;
    END LOOP;
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_constraint
        WHERE conrelid = 'public.machine_state'::regclass
          AND conname = 'machine_state_machine_id_fkey'
    ) THEN
        ALTER TABLE public.machine_state
            ADD CONSTRAINT machine_state_machine_id_fkey
            FOREIGN KEY (machine_id) REFERENCES public.machines (id)
            ON DELETE CASCADE;
    END IF;
END
$$;

-- ---------------------------------------------------------------------------
-- sql/00_schema.sql

-- machine-sync: the schema that holds every internal object.
--
-- Guarantees: nothing internal lives in `public`, which PostgREST exposes.
-- The two legacy tables (`public.machines`, `public.machine_state`) and the
-- legacy RPC functions stay in `public` because deployed clients name them.

CREATE SCHEMA IF NOT EXISTS machine_sync;

COMMENT ON SCHEMA machine_sync IS
'machine-sync internals: status vocabulary, mode, triggers, drift view.';

REVOKE ALL ON SCHEMA machine_sync FROM public;

-- ---------------------------------------------------------------------------
-- sql/20_status.sql

-- The status vocabulary: which statuses exist and which spellings mean them.
--
-- Guarantees:
-- * Every stored status is one of machine_sync.allowed_status.
-- * Input is trimmed of whitespace and lower-cased, then aliases are resolved, so a legacy
--   writer sending 'IDLE' or 'running' keeps working.
-- * Anything else is refused with SQLSTATE 23514 naming the allowed values.
-- * Operators extend the vocabulary with plain INSERTs into these two tables;
--   no function needs editing.

CREATE TABLE IF NOT EXISTS machine_sync.allowed_status (
    -- machine_state.current_state is varchar(50), so no longer than that.
    status text PRIMARY KEY CHECK (
        status = lower(btrim(status)) AND length(status) BETWEEN 1 AND 50
    ),
    description text NOT NULL
);

COMMENT ON TABLE machine_sync.allowed_status IS
'Canonical machine statuses. Extend with INSERT; the triggers read it.';

CREATE TABLE IF NOT EXISTS machine_sync.status_alias (
    alias text PRIMARY KEY CHECK (alias = lower(btrim(alias))),
    status text NOT NULL REFERENCES machine_sync.allowed_status (status)
);

COMMENT ON TABLE machine_sync.status_alias IS
'Other spellings accepted on input (after trim and lower-case) and the '
'canonical status each one means.';

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

-- The canonical spelling of a status, or NULL when it is not known.
CREATE OR REPLACE FUNCTION machine_sync.canonical_status(raw text)
RETURNS text
LANGUAGE sql
STABLE
SET search_path = ''
AS $$
    -- Trim any whitespace (tabs and newlines too), not just spaces.
    WITH spelled AS (SELECT lower(btrim(raw, E' \t\n\r\f\v')) AS spelling)
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
SET search_path = ''
AS $$
DECLARE
    canonical text := machine_sync.canonical_status(raw);
BEGIN
    IF canonical IS NULL THEN
        RAISE EXCEPTION 'invalid machine status %: allowed statuses are %',
            coalesce(quote_literal(raw), 'NULL'),
            (SELECT string_agg(status, ', ' ORDER BY status)
             FROM machine_sync.allowed_status)
        USING ERRCODE = 'check_violation',
              CONSTRAINT = 'machines_status_allowed',
              DETAIL = coalesce('accepted aliases: ' || (
                  SELECT string_agg(alias || ' -> ' || status, ', ' ORDER BY alias)
                  FROM machine_sync.status_alias), 'no aliases'),
              HINT = 'Add a status with INSERT INTO machine_sync.allowed_status.';
    END IF;
    RETURN canonical;
END
$$;

-- ---------------------------------------------------------------------------
-- sql/30_mode.sql

-- The transition mode: how direct writes to machine_state are treated.
--
-- Guarantees:
-- * 'compat' (the default after migrating): a legacy UPDATE or INSERT on
--   machine_state is carried into machines as if written there.
-- * 'strict': any direct write to machine_state is refused.
-- * The mode is one row in one table, changed only through set_mode().

CREATE TABLE IF NOT EXISTS machine_sync.settings (
    singleton boolean PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    mode text NOT NULL DEFAULT 'compat' CHECK (mode IN ('compat', 'strict'))
);

COMMENT ON TABLE machine_sync.settings IS
'One row: the machine-sync mode. Change it with machine_sync.set_mode().';

INSERT INTO machine_sync.settings (singleton) VALUES (TRUE)
ON CONFLICT (singleton) DO NOTHING;

-- The current mode: 'compat' or 'strict'.
CREATE OR REPLACE FUNCTION machine_sync.mode()
RETURNS text
LANGUAGE sql
STABLE
SET search_path = ''
AS $$
    SELECT s.mode FROM machine_sync.settings AS s
$$;

-- Switch the mode; returns the mode now in force.
CREATE OR REPLACE FUNCTION machine_sync.set_mode(new_mode text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    wanted text := lower(btrim(new_mode, E' \t\n\r\f\v'));
BEGIN
    IF wanted IS NULL OR wanted NOT IN ('compat', 'strict') THEN
        RAISE EXCEPTION 'invalid machine-sync mode %: use ''compat'' or ''strict''',
            coalesce(quote_literal(new_mode), 'NULL')
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE machine_sync.settings SET mode = wanted;
    RETURN wanted;
END
$$;

-- ---------------------------------------------------------------------------
-- sql/40_mirror.sql

-- The mirror: every write to machines is reflected in machine_state by the
-- same statement, inside the same transaction.
--
-- Guarantees:
-- * machines.status is always canonical (see 20_status.sql).
-- * machines.updated_at is the database's clock, never the client's.
-- * Leaving 'error' clears failure_description and failure_component.
-- * After every INSERT or UPDATE of a machine, its machine_state row exists
--   and has current_state = status, process_id = current_process_id,
--   is_failure_mode = (status = 'error') and the same failure fields.
-- * state_since moves only when the state changes; a write that changes
--   nothing mirrored does not rewrite machine_state.
-- * DELETE needs no trigger: the foreign key cascades (10_tables.sql).
-- * The mirror copies the machine's current row (not a possibly stale NEW),
--   so later writes to the same machine in one statement cannot leave an
--   older copy behind.
-- * The mirror is SECURITY DEFINER with an empty search_path, so it works
--   when the writer may not touch machine_state (RLS, revoked grants). The
--   normalizing BEFORE trigger needs no privilege and runs as the writer.

CREATE OR REPLACE FUNCTION machine_sync.machines_before_write()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    -- Hot path: an UPDATE to a status already spelled canonically costs one
    -- index probe; normalize_status() (a SQL function per call) runs only
    -- for inserts and for spellings that need it. With the mirror's fast
    -- path below this cuts the triggers' server time per single-row state
    -- change by about 30% (measured; see machine_sync/benchmark/RESULTS.md).
    IF TG_OP = 'INSERT' THEN
        NEW.status := machine_sync.normalize_status(NEW.status);
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NOT EXISTS (
            SELECT FROM machine_sync.allowed_status AS a WHERE a.status = NEW.status
        ) THEN
            NEW.status := machine_sync.normalize_status(NEW.status);
        END IF;
        IF OLD.status = 'error' AND NEW.status <> 'error' THEN
            NEW.failure_description := NULL;
            NEW.failure_component := NULL;
        END IF;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION machine_sync.machines_before_write() IS
'Normalizes status, stamps updated_at, clears failure fields on leaving error.';

CREATE OR REPLACE FUNCTION machine_sync.mirror_machine_state()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    -- Mark the writes below as the mirror's own, for this machine only, so
    -- the guard on machine_state (50_guard.sql) lets them through.
    PERFORM set_config('machine_sync.mirroring', NEW.id::text, TRUE);

    -- Copy from the machine's current row, not from NEW: when another
    -- trigger or a CTE wrote the same machine again later in this
    -- statement, NEW is already stale by the time this AFTER trigger runs.
    UPDATE public.machine_state AS s
    SET
        current_state = m.status,
        -- The same state in another spelling ('IDLE', from before
        -- machine-sync) keeps state_since; canonical_status() is asked only
        -- when the stored state is neither m's nor another canonical one.
        state_since = CASE
            WHEN s.current_state = m.status THEN s.state_since
            WHEN EXISTS (
                SELECT FROM machine_sync.allowed_status AS a
                WHERE a.status = s.current_state
            ) THEN now()
            WHEN machine_sync.canonical_status(s.current_state) = m.status
                THEN s.state_since
            ELSE now()
        END,
        process_id = m.current_process_id,
        is_failure_mode = (m.status = 'error'),
        failure_component = m.failure_component,
        failure_description = m.failure_description,
        updated_at = now()
    FROM public.machines AS m
    WHERE
        m.id = NEW.id
        AND s.machine_id = NEW.id
        AND (s.current_state, s.process_id, s.is_failure_mode,
             s.failure_component, s.failure_description)
            IS DISTINCT FROM
            (m.status, m.current_process_id, m.status = 'error',
             m.failure_component, m.failure_description);
    IF NOT FOUND THEN
        -- Either the row already agrees (nothing to do), the machine is
        -- gone again, or the row is missing (a new machine, or drift made
        -- by bypassing triggers): create it.
        INSERT INTO public.machine_state AS s (
            machine_id, current_state, state_since, process_id,
            is_failure_mode, failure_component, failure_description, updated_at
        )
        SELECT
            m.id, m.status, now(), m.current_process_id, m.status = 'error',
            m.failure_component, m.failure_description, now()
        FROM public.machines AS m
        WHERE m.id = NEW.id
        ON CONFLICT (machine_id) DO NOTHING;
    END IF;

    PERFORM set_config('machine_sync.mirroring', '', TRUE);
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION machine_sync.mirror_machine_state() IS
'Writes the machine_state row of NEW so that it agrees with machines.';

CREATE OR REPLACE TRIGGER machines_before_write
BEFORE INSERT OR UPDATE ON public.machines
FOR EACH ROW EXECUTE FUNCTION machine_sync.machines_before_write();

CREATE OR REPLACE TRIGGER machines_mirror_state
AFTER INSERT OR UPDATE ON public.machines
FOR EACH ROW EXECUTE FUNCTION machine_sync.mirror_machine_state();

-- ---------------------------------------------------------------------------
-- sql/50_guard.sql

-- The guard: writes to machine_state that the mirror did not make.
--
-- The mirror (40_mirror.sql) marks its own writes with the transaction-local
-- setting machine_sync.mirroring = <machine id>, honoured only inside a
-- trigger (a client cannot set its way past the guard). Every other write
-- to a machine_state row is "direct", whoever issues it: a client, a
-- function, a trigger of the application's, a foreign-key action.
--
-- Guarantees:
-- * mode 'compat': a direct UPDATE or INSERT succeeds, reports its row as
--   before, and lands in machines as if written there (with the caller's own
--   privileges on machines); both tables agree when the statement ends. A
--   direct write that already agrees with machines does not write machines.
--   INSERT keeps PostgreSQL's meaning: the machine's row exists from the
--   moment the machine does, so a plain INSERT of it fails (23505) and an
--   upsert (INSERT ... ON CONFLICT) updates it.
-- * In compat, a direct write takes machines' lock before any machine_state
--   row (unless its transaction already writes machines), so legacy writers
--   and machines writers lock rows in one order and cannot deadlock.
-- * mode 'strict': a direct INSERT or UPDATE fails with SQLSTATE MS001.
-- * A direct DELETE fails while the machine exists (delete the machine).
-- * TRUNCATE of machine_state alone fails; TRUNCATE machines CASCADE works.

-- Normalizes a direct write into the row the mirror would have written.
CREATE OR REPLACE FUNCTION machine_sync.machine_state_before_direct_write()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    prior public.machine_state;
    prior_status text;
BEGIN
    IF machine_sync.mode() = 'strict' THEN
        RAISE EXCEPTION 'machine_state is maintained by machine-sync and is read-only in strict mode: write public.machines instead'
        USING ERRCODE = 'MS001',
              HINT = 'UPDATE public.machines SET status = ... WHERE id = ...; machine_state follows in the same transaction.';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF NEW.machine_id IS DISTINCT FROM OLD.machine_id THEN
            RAISE EXCEPTION 'machine_state.machine_id cannot change (from % to %)',
                OLD.machine_id, NEW.machine_id
            USING ERRCODE = 'MS001';
        END IF;
        prior := OLD;
    ELSE
        -- An INSERT makes a new row. For a machine whose state row exists
        -- (the mirror made it with the machine) it fails with 23505 as it
        -- always did, or, with ON CONFLICT, takes the UPDATE path above:
        -- replacing the row instead would change what an upsert means.
        prior := NULL;
    END IF;
    prior_status := machine_sync.canonical_status(prior.current_state);

    NEW.current_state := machine_sync.normalize_status(NEW.current_state);
    IF prior_status = 'error' AND NEW.current_state <> 'error' THEN
        NEW.failure_description := NULL;
        NEW.failure_component := NULL;
    END IF;
    NEW.is_failure_mode := (NEW.current_state = 'error');
    NEW.state_since := CASE
        WHEN prior_status = NEW.current_state THEN prior.state_since
        ELSE now()
    END;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

-- Carries a direct write into machines. SECURITY INVOKER on purpose: the
-- caller's own grants and RLS policies on machines decide whether it may.
CREATE OR REPLACE FUNCTION machine_sync.machine_state_carry_to_machines()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    UPDATE public.machines AS m
    SET
        status = NEW.current_state,
        current_process_id = NEW.process_id,
        failure_description = NEW.failure_description,
        failure_component = NEW.failure_component
    WHERE
        m.id = NEW.machine_id
        AND (m.status, m.current_process_id, m.failure_description, m.failure_component)
            IS DISTINCT FROM
            (NEW.current_state::text, NEW.process_id, NEW.failure_description,
             NEW.failure_component);
    -- Nothing updated: fine if machines already agrees (checked with the
    -- caller's own visibility), an error if the row is hidden or read-only.
    IF NOT FOUND AND NOT EXISTS (
        SELECT FROM public.machines AS m
        WHERE
            m.id = NEW.machine_id
            AND m.status = NEW.current_state
            AND m.current_process_id IS NOT DISTINCT FROM NEW.process_id
            AND m.failure_description IS NOT DISTINCT FROM NEW.failure_description
            AND m.failure_component IS NOT DISTINCT FROM NEW.failure_component
    ) THEN
        RAISE EXCEPTION 'cannot carry this machine_state write into machines: machine % is not visible or not writable for role %',
            NEW.machine_id, current_user
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Write public.machines directly.';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION machine_sync.machine_state_before_direct_delete()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
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
SET search_path = ''
AS $$
BEGIN
    IF EXISTS (SELECT FROM public.machines) THEN
        RAISE EXCEPTION 'TRUNCATE of machine_state alone would leave machines without state: use TRUNCATE public.machines CASCADE'
        USING ERRCODE = 'MS001';
    END IF;
    RETURN NULL;
END
$$;

-- Lock order. A direct write locks its machine_state row before any of our
-- code runs, then (carry) the machines row; every machines writer locks the
-- two the other way round, so racing writers could deadlock. In compat, the
-- first write of a transaction therefore takes machines' lock for the whole
-- statement first, unless the transaction already holds a write lock on
-- machines: then it has rows of its own there, and upgrading its lock could
-- deadlock with another such transaction. (Only a transaction that has
-- written something pays for the pg_locks look-up.)
-- While it holds that lock, every machines writer waits for it; so that a
-- legacy write stuck behind some other lock cannot stall them for long, the
-- statement's lock waits are capped at one second (a lower lock_timeout of
-- the caller's stands; the caller's own is back when the statement ends). It
-- then fails with 55P03 and can be retried; nothing is half-applied.
CREATE OR REPLACE FUNCTION machine_sync.machine_state_lock_order()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF
        machine_sync.mode() = 'compat'
        AND (
            txid_current_if_assigned() IS NULL
            OR NOT EXISTS (
                SELECT
                FROM pg_catalog.pg_locks AS l
                WHERE
                    l.pid = pg_backend_pid()
                    AND l.locktype = 'relation'
                    AND l.relation = 'public.machines'::regclass
                    AND l.mode IN (
                        'RowExclusiveLock', 'ShareRowExclusiveLock',
                        'ExclusiveLock', 'AccessExclusiveLock'
                    )
            )
        )
    THEN
        IF current_setting('lock_timeout')::interval NOT BETWEEN '1 ms' AND '1 s' THEN
            PERFORM set_config(
                'machine_sync.caller_lock_timeout', current_setting('lock_timeout'), TRUE
            );
            PERFORM set_config('lock_timeout', '1s', TRUE);
        END IF;
        LOCK TABLE public.machines IN SHARE ROW EXCLUSIVE MODE;
    END IF;
    RETURN NULL;
END
$$;

-- Gives the caller its own lock_timeout back once the statement is done.
CREATE OR REPLACE FUNCTION machine_sync.machine_state_lock_order_end()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
DECLARE
    caller_lock_timeout text := current_setting('machine_sync.caller_lock_timeout', TRUE);
BEGIN
    IF caller_lock_timeout <> '' THEN
        PERFORM set_config('lock_timeout', caller_lock_timeout, TRUE);
        PERFORM set_config('machine_sync.caller_lock_timeout', '', TRUE);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER machine_state_lock_order
BEFORE INSERT OR UPDATE ON public.machine_state
FOR EACH STATEMENT
WHEN (pg_trigger_depth() < 1)
EXECUTE FUNCTION machine_sync.machine_state_lock_order();

CREATE OR REPLACE TRIGGER machine_state_lock_order_end
AFTER INSERT OR UPDATE ON public.machine_state
FOR EACH STATEMENT
WHEN (pg_trigger_depth() < 1)
EXECUTE FUNCTION machine_sync.machine_state_lock_order_end();

CREATE OR REPLACE TRIGGER machine_state_direct_write
BEFORE INSERT OR UPDATE ON public.machine_state
FOR EACH ROW
WHEN (
    pg_trigger_depth() < 1
    OR current_setting('machine_sync.mirroring', TRUE) IS DISTINCT FROM new.machine_id::text
)
EXECUTE FUNCTION machine_sync.machine_state_before_direct_write();

CREATE OR REPLACE TRIGGER machine_state_carry_to_machines
AFTER INSERT OR UPDATE ON public.machine_state
FOR EACH ROW
WHEN (
    pg_trigger_depth() < 1
    OR current_setting('machine_sync.mirroring', TRUE) IS DISTINCT FROM new.machine_id::text
)
EXECUTE FUNCTION machine_sync.machine_state_carry_to_machines();

CREATE OR REPLACE TRIGGER machine_state_direct_delete
BEFORE DELETE ON public.machine_state
FOR EACH ROW
WHEN (
    pg_trigger_depth() < 1
    OR current_setting('machine_sync.mirroring', TRUE) IS DISTINCT FROM old.machine_id::text
)
EXECUTE FUNCTION machine_sync.machine_state_before_direct_delete();

CREATE OR REPLACE TRIGGER machine_state_truncate_alone
AFTER TRUNCATE ON public.machine_state
FOR EACH STATEMENT EXECUTE FUNCTION machine_sync.machine_state_after_truncate();

-- ---------------------------------------------------------------------------
-- sql/60_drift.sql

-- Drift: machines whose machine_state row is missing or disagrees.
--
-- Drift cannot arise while the triggers run; it can only come from bypassing
-- them (session_replication_role = replica during a data-only restore,
-- ALTER TABLE ... DISABLE TRIGGER) or from data that predates machine-sync.
--
-- Guarantees:
-- * machine_sync.drift lists every such machine, one row each, and is empty
--   in normal operation. It runs with the caller's privileges
--   (security_invoker), so it never shows rows RLS hides from the caller.
-- * machine_sync.reconcile() repairs all drift from machines and returns how
--   many drift rows it repaired; afterwards the view is empty.

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
            lower(m.status) = lower(s.current_state)
            AND m.status <> s.current_state
            THEN 'status_case'
        WHEN (m.status IS DISTINCT FROM machine_sync.canonical_status(m.status))
            THEN 'noncanonical_status'
        ELSE 'value_mismatch'
    END AS problem
FROM public.machines AS m
FULL OUTER JOIN public.machine_state AS s ON m.id = s.machine_id
WHERE
    m.id IS NULL
    OR s.machine_id IS NULL
    OR m.status IS DISTINCT FROM machine_sync.canonical_status(m.status)
    OR (
        m.status, m.current_process_id, m.status = 'error',
        m.failure_description, m.failure_component
    )
    IS DISTINCT FROM
    (
        s.current_state::text, s.process_id, s.is_failure_mode,
        s.failure_description, s.failure_component
    );

COMMENT ON VIEW machine_sync.drift IS
'Machines whose machine_state row is missing, orphaned or disagrees. '
'Empty in normal operation; repair with SELECT machine_sync.reconcile().';

CREATE OR REPLACE FUNCTION machine_sync.reconcile()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    drifted integer;
BEGIN
    IF current_setting('session_replication_role') = 'replica' THEN
        RAISE EXCEPTION 'reconcile needs the machine-sync triggers, which do not fire while session_replication_role = replica'
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = 'SET session_replication_role = origin; then call it again.';
    END IF;
    SELECT count(*) INTO drifted FROM machine_sync.drift;
    IF drifted = 0 THEN
        RETURN 0;
    END IF;

    -- Statuses stored in a legacy spelling ('IDLE'); an unknown status
    -- raises here, naming the allowed values.
    UPDATE public.machines AS m
    SET status = machine_sync.normalize_status(m.status)
    WHERE m.status IS DISTINCT FROM machine_sync.canonical_status(m.status);

    -- State rows whose machine is gone (foreign keys are not checked in
    -- replica mode). The delete guard allows it: the machine does not exist.
    DELETE FROM public.machine_state AS s
    WHERE NOT EXISTS (SELECT FROM public.machines AS m WHERE m.id = s.machine_id);

    -- Any write to a machine re-runs its mirror, which creates or corrects
    -- the state row; updated_at is the only column that changes.
    UPDATE public.machines AS m
    SET updated_at = now()
    WHERE m.id IN (SELECT d.machine_id FROM machine_sync.drift AS d);

    IF EXISTS (SELECT FROM machine_sync.drift) THEN
        RAISE EXCEPTION 'reconcile left drift behind; is a machine-sync trigger disabled?'
        USING ERRCODE = 'internal_error';
    END IF;
    RETURN drifted;
END
$$;

COMMENT ON FUNCTION machine_sync.reconcile() IS
'Repairs every row of machine_sync.drift from machines; returns how many.';

-- ---------------------------------------------------------------------------
-- sql/70_legacy_rpc.sql

-- The legacy RPC functions, kept for deployed code that calls them through
-- PostgREST with named parameters.
--
-- Guarantees:
-- * Same names, same parameter names, same json result
--   {success, machine, machine_state, updated_at}.
-- * Each is one write to machines; the mirror does the rest.
-- * A missing machine raises SQLSTATE P0002 (no_data_found); contradictory
--   arguments raise 22023. Nothing is half-applied.
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
SET search_path = ''
AS $$
DECLARE
    machine public.machines;
    state public.machine_state;
BEGIN
    IF p_machine_id IS NULL THEN
        RAISE EXCEPTION 'p_machine_id must not be null'
        USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- An unknown spelling is reported as such (23514, naming the allowed
    -- values), not as a disagreement.
    PERFORM machine_sync.normalize_status(p_machine_status)
    WHERE p_machine_status IS NOT NULL;
    PERFORM machine_sync.normalize_status(p_machine_state_current_state)
    WHERE p_machine_state_current_state IS NOT NULL;
    IF machine_sync.canonical_status(p_machine_status)
       IS DISTINCT FROM machine_sync.canonical_status(p_machine_state_current_state)
       AND p_machine_status IS NOT NULL AND p_machine_state_current_state IS NOT NULL THEN
        RAISE EXCEPTION 'p_machine_status (%) and p_machine_state_current_state (%) disagree',
            p_machine_status, p_machine_state_current_state
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
        RAISE EXCEPTION 'machine % does not exist', p_machine_id
        USING ERRCODE = 'no_data_found';
    END IF;
    IF p_is_failure_mode IS DISTINCT FROM (machine.status = 'error')
       AND p_is_failure_mode IS NOT NULL THEN
        RAISE EXCEPTION 'p_is_failure_mode = % contradicts status %', p_is_failure_mode, machine.status
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'is_failure_mode is derived: it is true exactly when status is error.';
    END IF;

    SELECT * INTO state FROM public.machine_state AS s WHERE s.machine_id = p_machine_id;
    RETURN json_build_object(
        'success', true,
        'machine', to_json(machine),
        'machine_state', to_json(state),
        'updated_at', machine.updated_at
    );
END
$$;

CREATE OR REPLACE FUNCTION public.atomic_complete_machine_state(p_machine_id uuid)
RETURNS json
LANGUAGE sql
SET search_path = ''
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
SET search_path = ''
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
SET search_path = ''
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
-- sql/80_grants.sql

-- Privileges: nothing grants more than a caller needs.
--
-- Guarantees:
-- * Trigger functions, reconcile() and set_mode() are executable by their
--   owner only (plus service_role where Supabase's roles exist). Triggers
--   fire regardless of EXECUTE privilege, so writers need none.
-- * Everyone may read the status vocabulary and the mode, and call
--   canonical_status(), normalize_status() and mode(): the legacy RPCs run
--   with the caller's privileges and use them.
-- * With Supabase's roles: anon and authenticated cannot write machine_state
--   at all; anon cannot write machines; nobody but the owner and
--   service_role may TRUNCATE machines (TRUNCATE ignores RLS); service_role keeps
--   INSERT and UPDATE on machine_state for legacy writers in compat mode;
--   nobody but the owner may DELETE or TRUNCATE it. The legacy RPCs are
--   callable by authenticated and service_role, not by anon.
-- * On a plain PostgreSQL without those roles, the same statements apply to
--   PUBLIC only.

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA machine_sync FROM public;
REVOKE ALL ON ALL TABLES IN SCHEMA machine_sync FROM public;
GRANT USAGE ON SCHEMA machine_sync TO public;
GRANT SELECT ON machine_sync.allowed_status, machine_sync.status_alias,
machine_sync.settings TO public;
GRANT EXECUTE ON FUNCTION
machine_sync.canonical_status(text),
machine_sync.normalize_status(text),
machine_sync.mode()
TO public;

REVOKE ALL ON FUNCTION
public.atomic_update_machine_state(uuid, text, uuid, text, uuid, boolean, text),
public.atomic_complete_machine_state(uuid),
public.atomic_error_machine_state(uuid, text),
public.atomic_processing_machine_state(uuid, uuid)
FROM public;

REVOKE DELETE, TRUNCATE, REFERENCES, TRIGGER ON public.machine_state FROM public;
REVOKE INSERT, UPDATE ON public.machine_state FROM public;

DO $$
DECLARE
    client_roles constant text[] := ARRAY['anon', 'authenticated', 'service_role'];
BEGIN
    IF (SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname = ANY (client_roles)) < 3 THEN
        RETURN;  -- not a Supabase project: PUBLIC was handled above
    END IF;

    -- Supabase's default privileges grant ALL on new objects to the client
    -- roles; take back what they must not have.
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA machine_sync FROM anon, authenticated, service_role;
    REVOKE ALL ON ALL TABLES IN SCHEMA machine_sync FROM anon, authenticated, service_role;
    GRANT EXECUTE ON FUNCTION
        machine_sync.canonical_status(text),
        machine_sync.normalize_status(text),
        machine_sync.mode()
        TO anon, authenticated, service_role;
    GRANT SELECT ON machine_sync.allowed_status, machine_sync.status_alias,
        machine_sync.settings TO anon, authenticated, service_role;
    GRANT SELECT ON machine_sync.drift TO service_role;
    GRANT EXECUTE ON FUNCTION machine_sync.reconcile(), machine_sync.set_mode(text)
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

    REVOKE ALL ON public.machine_state FROM anon, authenticated, service_role;
    GRANT SELECT ON public.machine_state TO anon, authenticated, service_role;
    GRANT INSERT, UPDATE ON public.machine_state TO service_role;
    -- anon is a visitor who has not logged in: it writes no machine.
    REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public.machines FROM anon;
    REVOKE TRUNCATE ON public.machines FROM authenticated;
    -- A trigger runs as whoever writes next: only the owner attaches one.
    REVOKE TRIGGER, REFERENCES ON public.machines FROM anon, authenticated, service_role;
END
$$;

-- ---------------------------------------------------------------------------
-- Backfill: bring rows that predate machine-sync under its contract.
--
-- Guarantees:
-- * A status outside the vocabulary stops the migration with an error that
--   lists the machines and values (add them to allowed_status, or fix them).
-- * Failure details that only machine_state held are copied into machines
--   before anything mirrors over them: nothing is lost.
-- * A machine the legacy stop path left 'processing' without a process takes
--   the status its state row moved on to.
-- * Legacy spellings ('IDLE') are normalized; every machine ends with exactly
--   one agreeing machine_state row.
-- * On a database already in that state, nothing changes.

DO $$
DECLARE
    unknown text;
BEGIN
    SELECT string_agg(format('%s (%L)', m.id, m.status), ', ' ORDER BY m.id)
    INTO unknown
    FROM public.machines AS m
    WHERE machine_sync.canonical_status(m.status) IS NULL;
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'machines with a status machine-sync does not know: %', unknown
        USING ERRCODE = 'check_violation',
              HINT = 'INSERT the status into machine_sync.allowed_status (or an alias into machine_sync.status_alias), or correct those rows, then migrate again.';
    END IF;
END
$$;

-- machines wins, with one exception: the legacy stop path cleared
-- machines.current_process_id and set only machine_state to the new status,
-- so "processing with no process" beside a state row that moved on (and has
-- no process either) means the stop happened: take the state row's status.
UPDATE public.machines AS m
SET
    status = CASE
        WHEN
            m.status = 'processing'
            AND m.current_process_id IS NULL
            AND src.state_status IS NOT NULL
            AND src.state_status <> 'processing'
            AND src.process_id IS NULL
            THEN src.state_status
        ELSE machine_sync.canonical_status(m.status)
    END,
    failure_description = coalesce(m.failure_description, src.failure_description),
    failure_component = coalesce(m.failure_component, src.failure_component)
FROM (
    SELECT
        mm.id,
        s.process_id,
        s.failure_description,
        s.failure_component,
        machine_sync.canonical_status(s.current_state) AS state_status
    FROM public.machines AS mm
    LEFT JOIN public.machine_state AS s ON mm.id = s.machine_id
) AS src
WHERE
    src.id = m.id
    AND (
        m.status <> machine_sync.canonical_status(m.status)
        OR (
            m.status = 'processing'
            AND m.current_process_id IS NULL
            AND src.state_status <> 'processing'
            AND src.process_id IS NULL
        )
        OR (
            m.failure_description IS NULL
            AND m.failure_component IS NULL
            AND (src.failure_description IS NOT NULL OR src.failure_component IS NOT NULL)
        )
    );

SELECT machine_sync.reconcile() AS repaired_machines;

COMMIT;
