"""The sweep's terminal: one console for the controller and its progress lines (imports only rich)."""

from __future__ import annotations

import sys


def terminal_console():
    """The sweep's console: the terminal's width, or 160 columns when the output is piped to a file."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)
