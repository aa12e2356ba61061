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
