"""machine-sync: machines is the one table anyone writes; PostgreSQL keeps machine_state equal."""

__version__ = "0.1.0"
