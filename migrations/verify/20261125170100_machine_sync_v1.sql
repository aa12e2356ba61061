-- Verify machine-sync v1: every function, trigger and view it installed is
-- there, enabled and as it installed it (the md5 record v1 writes at its end,
-- machine_sync_installed.definition). Reads the catalog only, writes nothing;
-- fails with the list of what is missing, changed or disabled.
-- psql -v ON_ERROR_STOP=1 -f migrations/verify/20261125170100_machine_sync_v1.sql

DO $$
DECLARE
    found text;
    restorable boolean;
BEGIN
    IF to_regprocedure('machine_sync_installed.problems_v1()') IS NULL THEN
        RAISE EXCEPTION 'machine-sync v1 is not installed: its record of definitions (schema machine_sync_installed) is missing'
        USING ERRCODE = 'undefined_object',
              HINT = 'Apply it: machine-sync migrate apply (or psql -f the migration).';
    END IF;
    IF NOT EXISTS (
        SELECT FROM machine_sync_installed.definition AS d
        WHERE d.kind = 'trigger' AND d.object_name = 'zz_machine_sync on public.machines'
    ) OR NOT EXISTS (
        SELECT FROM machine_sync_installed.definition AS d
        WHERE d.kind = 'function' AND d.object_name = 'machine_sync.machines_sync()'
    ) THEN
        RAISE EXCEPTION 'machine-sync v1: the record of its definitions lacks the mirror'
        USING ERRCODE = 'undefined_object',
              HINT = 'Re-apply the migrations: machine-sync migrate apply --force.';
    END IF;
    -- A mirror role that others can be is not a definition: apply --force
    -- would not change it, so it is not offered for it.
    SELECT
        string_agg(
            CASE
                WHEN p.kind = 'role' THEN
                    'role ' || p.object_name || ', which the mirror runs as, is one others can be ('
                    || substr(p.problem, length('exposed: ') + 1)
                    || '): REVOKE it from them, ALTER ROLE ... NOLOGIN NOSUPERUSER'
                ELSE p.kind || ' ' || p.object_name || ': ' || p.problem
            END,
            '; '
        ),
        bool_or(p.kind <> 'role')
    INTO found, restorable
    FROM machine_sync_installed.problems_v1() AS p;
    IF restorable THEN
        RAISE EXCEPTION 'machine-sync v1 does not verify: %', found
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = 'Restore the shipped definitions: machine-sync migrate apply --force.';
    ELSIF found IS NOT NULL THEN
        RAISE EXCEPTION 'machine-sync v1 does not verify: %', found
        USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
END
$$;
