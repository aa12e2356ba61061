"""The rich console every command prints through."""

from __future__ import annotations

import sys

from rich.console import Console

# Piped or redirected output has no terminal width to fit: rich would assume
# 80 columns and cut table cells ("comple…"); this is wide enough for every
# table the commands print, so ids, names and figures come out whole. A line
# of text is not wrapped at all there (soft wrap), so that grep and scripts
# see each line whole.
PIPED_WIDTH = 200


def console() -> Console:
    """A console for stdout: the terminal's width, or :data:`PIPED_WIDTH` and
    unwrapped lines when piped."""
    piped = not sys.stdout.isatty()
    return Console(highlight=False, width=PIPED_WIDTH if piped else None, soft_wrap=piped)
