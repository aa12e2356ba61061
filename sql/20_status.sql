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
