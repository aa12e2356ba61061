"""Every statement the workload and the demo send, by name.

The text lives in ``workload.sql`` (loaded with :mod:`machine_sync._queries`,
so ``:name`` placeholders become psycopg's ``%(name)s``). Only the two
statements that compose an identifier stay here: they are
:class:`psycopg.sql.SQL` templates, not query text.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Final

from psycopg import sql

from machine_sync import _queries

_SQL: Final = _queries.parse(
    files("machine_sync.workload").joinpath("workload.sql").read_text(encoding="utf-8")
)

# The legacy call sites, exactly as production runs them.
LEGACY_READ_STATUS: Final = _SQL["legacy_read_status"].text
LEGACY_START_MACHINES: Final = _SQL["legacy_start_machines"].text
LEGACY_START_STATE: Final = _SQL["legacy_start_state"].text
LEGACY_COMPLETE_MACHINES: Final = _SQL["legacy_complete_machines"].text
LEGACY_COMPLETE_STATE: Final = _SQL["legacy_complete_state"].text
LEGACY_ERROR_STATE: Final = _SQL["legacy_error_state"].text
LEGACY_ERROR_MACHINES: Final = _SQL["legacy_error_machines"].text
LEGACY_STOP_MACHINES: Final = _SQL["legacy_stop_machines"].text
LEGACY_STOP_STATE: Final = _SQL["legacy_stop_state"].text

# Setup.
CREATE_MACHINES: Final = _SQL["create_machines"].text
CREATE_MISSING_STATE_ROWS: Final = _SQL["create_missing_state_rows"].text
HAS_PROCESS_TABLE: Final = _SQL["has_process_table"].text
CREATE_PROCESSES: Final = _SQL["create_processes"].text
SET_STATEMENT_TIMEOUT: Final = _SQL["set_statement_timeout"].text
SET_LOCK_TIMEOUT: Final = _SQL["set_lock_timeout"].text
SCHEMA_IS_MIGRATED: Final = _SQL["schema_is_migrated"].text

# Fault injection.
LOCK_STATE_ROW: Final = _SQL["lock_state_row"].text
LOCK_MACHINE_ROW: Final = _SQL["lock_machine_row"].text
IS_BLOCKING: Final = _SQL["is_blocking"].text
TERMINATE: Final = _SQL["terminate"].text

# Drift, before and after migration.
LEGACY_DRIFT: Final = _SQL["legacy_drift"].text
MIGRATED_DRIFT: Final = _SQL["migrated_drift"].text

# The audit of production's tables and the demo's checks.
AUDIT_COUNTS: Final = _SQL["audit_counts"].text
AUDIT_STATUSES: Final = _SQL["audit_statuses"].text
LEGACY_RPCS_PRESENT: Final = _SQL["legacy_rpcs_present"].text
AGREEING_MACHINES: Final = _SQL["agreeing_machines"].text
LIST_MACHINE_IDS: Final = _SQL["list_machine_ids"].text
MODE: Final = _queries.query("mode").text  # the package's own query

# The legacy RPCs, called the way PostgREST calls them: named arguments.
RPC_PROCESSING: Final = _SQL["rpc_processing"].text
RPC_COMPLETE: Final = _SQL["rpc_complete"].text
RPC_ERROR: Final = _SQL["rpc_error"].text
RPC_UPDATE: Final = _SQL["rpc_update"].text
STATE_ROW: Final = _SQL["state_row"].text

# Server management for the demo: identifiers are composed, never formatted,
# so these are psycopg templates rather than text in workload.sql.
CREATE_DATABASE: Final = sql.SQL("CREATE DATABASE {}")
DROP_DATABASE: Final = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
SERVER_VERSION: Final = _SQL["server_version"].text
