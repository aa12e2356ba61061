-- Revert the baseline: drop the two tables, but only when they hold no
-- rows. On a database that had them before machine-sync (production),
-- reverting the baseline would destroy data, so it is refused.

-- squawk-ignore-file require-statement-timeout
-- (squawk) No statement_timeout: the lock_timeout below caps the only long
-- wait these statements have, another session's lock; their own work is
-- bounded by one row per lab machine.
-- squawk-ignore-file ban-drop-table
-- (squawk) Dropping the tables is this file's purpose; the check below
-- refuses it while they hold rows.

BEGIN;
SET LOCAL lock_timeout = '5s';
-- Names resolve in pg_catalog alone (everything else here is schema
-- qualified): a function created in a schema on the caller's search_path
-- (public is writable by every role in a database made before PostgreSQL
-- 15) can neither stand in for a built-in one nor run as the migrating role.
SET LOCAL search_path = pg_catalog, pg_temp;

DO $$
BEGIN
    IF EXISTS (SELECT FROM public.machines) OR EXISTS (SELECT FROM public.machine_state) THEN
        RAISE EXCEPTION 'refusing to drop public.machines and public.machine_state: they hold rows'
        USING HINT = 'The baseline only created these tables on an empty database; keep it applied.';
    END IF;
END
$$;

DROP TABLE IF EXISTS public.machine_state;
DROP TABLE IF EXISTS public.machines;

COMMIT;
