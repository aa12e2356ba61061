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
