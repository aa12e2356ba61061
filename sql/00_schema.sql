-- machine-sync: the schema that holds every internal object.
--
-- Guarantees: nothing internal lives in `public`, which PostgREST exposes.
-- The two legacy tables (`public.machines`, `public.machine_state`) and the
-- legacy RPC functions stay in `public` because deployed clients name them.

CREATE SCHEMA IF NOT EXISTS machine_sync;

COMMENT ON SCHEMA machine_sync IS
'machine-sync internals: status vocabulary, mode, triggers, drift view.';

REVOKE ALL ON SCHEMA machine_sync FROM public;
