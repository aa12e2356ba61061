-- Revert machine-sync v1: back to two independently written tables.
-- Data is kept: failure details live on in machine_state, which v1 left
-- complete and agreeing with machines. The foreign key stops cascading, as
-- in the legacy schema.

BEGIN;
SET LOCAL lock_timeout = '5s';

DROP TRIGGER IF EXISTS machines_before_write ON public.machines;
DROP TRIGGER IF EXISTS machines_mirror_state ON public.machines;
DROP TRIGGER IF EXISTS machine_state_direct_write ON public.machine_state;
DROP TRIGGER IF EXISTS machine_state_carry_to_machines ON public.machine_state;
DROP TRIGGER IF EXISTS machine_state_direct_delete ON public.machine_state;
DROP TRIGGER IF EXISTS machine_state_truncate_alone ON public.machine_state;

DROP FUNCTION IF EXISTS public.atomic_processing_machine_state(uuid, uuid);
DROP FUNCTION IF EXISTS public.atomic_error_machine_state(uuid, text);
DROP FUNCTION IF EXISTS public.atomic_complete_machine_state(uuid);
DROP FUNCTION IF EXISTS public.atomic_update_machine_state(
    uuid, text, uuid, text, uuid, boolean, text
);

DROP SCHEMA IF EXISTS machine_sync CASCADE;

ALTER TABLE public.machines
DROP COLUMN IF EXISTS failure_description,
DROP COLUMN IF EXISTS failure_component;

ALTER TABLE public.machine_state
DROP CONSTRAINT IF EXISTS machine_state_machine_id_fkey,
ADD CONSTRAINT machine_state_machine_id_fkey
FOREIGN KEY (machine_id) REFERENCES public.machines (id);

COMMENT ON TABLE public.machines IS NULL;
COMMENT ON COLUMN public.machines.status IS NULL;
COMMENT ON TABLE public.machine_state IS NULL;

COMMIT;
