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
