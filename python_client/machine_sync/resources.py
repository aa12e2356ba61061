"""Where the shipped SQL lives: inside the wheel, or in the source tree."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE.parent.parent  # python_client/machine_sync -> repository root


def _shipped(name: str) -> Path:
    # A wheel carries the top-level folders under machine_sync/_sql (see
    # pyproject.toml); an editable install or a checkout reads them in place.
    inside = _PACKAGE / "_sql" / name
    return inside if inside.is_dir() else _SOURCE_ROOT / name


def migrations_dir() -> Path:
    """The folder of ordered ``<UTC timestamp>_<name>.sql`` migrations."""
    return _shipped("migrations")


def sql_dir() -> Path:
    """The folder of readable object definitions (``sql/``)."""
    return _shipped("sql")


def fixture(name: str) -> Path:
    """A SQL fixture shipped with the package, e.g. ``legacy_schema.sql``."""
    return _PACKAGE / "fixtures" / name
