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
