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
