-- Rows that predate machine-sync, brought under its contract.
--
-- Guarantees:
-- * A status outside the vocabulary stops the migration with an error that
--   names the machines and values (add them to allowed_status, or fix
--   them); nothing is applied.
-- * Every other machine ends with exactly one agreeing machine_state row,
--   its status canonical ('IDLE' becomes 'idle'), under the rules: a
--   machine the legacy stop path left 'processing' without a process is
--   idle.
-- * On a database already in that state, nothing changes.

DO $$
DECLARE
    unknown text;
    unrepaired text;
BEGIN
    SELECT string_agg(
        format('%s (%s)', m.id, machine_sync.quote_bounded(m.status)), ', ' ORDER BY m.id
    )
    INTO unknown
    FROM public.machines AS m
    WHERE machine_sync.canonical_status(m.status) IS NULL;
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'machines with a status machine-sync does not know: %', unknown
        USING ERRCODE = 'check_violation',
              HINT = 'INSERT the status into machine_sync.allowed_status (or an alias into machine_sync.status_alias), or correct those rows, then migrate again.';
    END IF;

    SELECT string_agg(format('%s: %s', r.machine_id, r.reason), '; ' ORDER BY r.machine_id)
    INTO unrepaired
    FROM machine_sync.reconcile() AS r
    WHERE NOT r.repaired;
    IF unrepaired IS NOT NULL THEN
        RAISE EXCEPTION 'machines that could not be brought into agreement: %', unrepaired
        USING ERRCODE = 'check_violation';
    END IF;
END
$$;
